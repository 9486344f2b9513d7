"""The package itself: lazy public API (PEP 562), nothing imported by ``import seq2seq``."""

from __future__ import annotations

import ctypes.util
import importlib
import importlib.metadata
import os
import subprocess
import sys
from pathlib import Path

import pytest

import seq2seq


def _run(code_or_args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-W", "error", *code_or_args], capture_output=True, text=True, timeout=120
    )


def test_import_seq2seq_loads_no_submodule_and_no_torch():
    code = (
        "import sys, seq2seq; "
        "print(sorted(m for m in sys.modules if m.startswith(('seq2seq.', 'torch'))))"
    )
    result = _run(["-c", code])
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


@pytest.mark.parametrize("module", ["seq2seq.translate", "seq2seq.average", "seq2seq.sample"])
def test_running_a_module_as_main_gives_no_runtime_warning(module):
    # -W error turns runpy's "found in sys.modules after import of package" warning into a failure
    result = _run(["-m", module, "--help"])
    assert result.returncode == 0, result.stderr
    assert "RuntimeWarning" not in result.stderr and "usage:" in result.stdout


def test_every_public_name_resolves_to_its_module():
    assert set(seq2seq.__all__) == set(seq2seq._MODULE_OF)
    assert len(seq2seq.__all__) == len(set(seq2seq.__all__))
    for name in seq2seq.__all__:
        module = importlib.import_module(seq2seq._MODULE_OF[name])
        assert getattr(seq2seq, name) is getattr(module, name), name
        assert name in dir(seq2seq)
    assert seq2seq.__version__ == importlib.metadata.version("seq2seq")  # pyproject.toml's
    from seq2seq import Transformer, translate_lines  # the form users write

    assert Transformer.__module__ == "seq2seq.model"
    assert translate_lines.__module__ == "seq2seq.translate"


def test_unknown_name_raises_attribute_error():
    with pytest.raises(AttributeError, match="no attribute 'not_public'"):
        seq2seq.not_public  # noqa: B018
    with pytest.raises(ImportError):
        from seq2seq import not_public  # noqa: F401


def _huge_pages_possible() -> bool:
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled", encoding="ascii") as handle:
            return "[never]" not in handle.read()
    except OSError:
        return False


def test_import_seq2seq_changes_no_environment_variable():
    code = "import os, json; before = dict(os.environ); import seq2seq; print(dict(os.environ) == before)"
    env = {
        k: v for k, v in os.environ.items() if k not in ("THP_MEM_ALLOC_ENABLE", "OMP_WAIT_POLICY")
    }
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "True"


def test_type_checking_imports_name_every_public_name():
    """Editors and type checkers read the TYPE_CHECKING block; it must list exactly ``__all__``."""
    import ast

    tree = ast.parse(Path(seq2seq.__file__).read_text(encoding="utf-8"))
    block = next(node for node in tree.body if isinstance(node, ast.If))
    imported = {
        alias.name: node.module
        for node in block.body
        if isinstance(node, ast.ImportFrom)
        for alias in node.names
    }
    assert imported == seq2seq._MODULE_OF


@pytest.mark.skipif(not _huge_pages_possible(), reason="no transparent huge pages on this kernel")
def test_command_line_edge_puts_large_tensors_on_huge_pages():
    """Touching a fresh 256 MiB tensor costs ~65,000 page faults on 4 KiB pages, ~128 on huge ones.

    ``seq2seq.__main__.configure_process`` (what the ``seq2seq`` command runs before importing a
    subcommand) sets THP_MEM_ALLOC_ENABLE; a plain ``import seq2seq`` does not.
    """
    code = (
        "import os, resource, seq2seq{first}; import torch; "
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt; "
        "torch.ones(64 * 2**20); "
        "print(os.environ.get('THP_MEM_ALLOC_ENABLE'), "
        "resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)"
    )
    env = {k: v for k, v in os.environ.items() if k != "THP_MEM_ALLOC_ENABLE"}
    faults = {}
    for first in ("; import seq2seq.__main__ as cli; cli.configure_process()", ""):
        result = subprocess.run(
            [sys.executable, "-c", code.format(first=first)],
            capture_output=True,
            text=True,
            timeout=120,
            env=env,
        )
        assert result.returncode == 0, result.stderr
        setting, faults[first] = result.stdout.split()
        assert setting == ("1" if first else "None")
    with_edge, plain = faults.values()
    assert int(with_edge) < 4_000 < 40_000 < int(plain)


def test_no_module_reads_a_test_only_environment_variable():
    """Tests inject faults from outside (monkeypatching, launcher scripts): production code holds
    no test hook such as the old ``SEQ2SEQ_TEST_PAUSE_MID_WRITE`` check in every save."""
    package = Path(seq2seq.__file__).parent
    sources = {path.name: path.read_text(encoding="utf-8") for path in package.glob("*.py")}
    assert "checkpoint.py" in sources and "directory.py" in sources  # the glob finds the modules
    hooked = sorted(name for name, text in sources.items() if "SEQ2SEQ_TEST" in text)
    assert not hooked, f"test hooks in {hooked}"


def test_every_subcommand_runs_the_module_of_its_name():
    """``seq2seq X`` is ``python -m seq2seq.X`` (README's Command line section says so)."""
    from seq2seq.__main__ import SUBCOMMANDS

    assert SUBCOMMANDS["average"][0] == "seq2seq.average"
    keyword = {"import": "seq2seq.hf_import"}  # a Python keyword cannot name a module
    for name, (module, _) in SUBCOMMANDS.items():
        assert module == keyword.get(name, f"seq2seq.{name}"), name
        assert callable(importlib.import_module(module).main), module


def test_the_command_preloads_tcmalloc_where_installed():
    from seq2seq.__main__ import tcmalloc_environment

    assert tcmalloc_environment({"LD_PRELOAD": "libother.so.1"}) is None  # the user's wins
    assert tcmalloc_environment({"SEQ2SEQ_ALLOCATOR": "system"}) is None
    library = ctypes.util.find_library("tcmalloc_minimal")
    preloaded = tcmalloc_environment({"PATH": os.environ.get("PATH", "")})
    if library is None:
        assert preloaded is None
        pytest.skip("tcmalloc is not installed (Debian: libtcmalloc-minimal4)")
    assert preloaded["LD_PRELOAD"] == library
    maps = subprocess.run(
        [sys.executable, "-c", "print(open('/proc/self/maps').read())"],
        env=preloaded, capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    assert "libtcmalloc_minimal" in maps


def test_the_command_run_again_under_tcmalloc_keeps_its_exit_code_and_message(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "SEQ2SEQ_ALLOCATOR")}
    env["PYTHONPATH"] = str(Path(__file__).resolve().parent.parent)
    missing = tmp_path / "missing.yaml"
    done = subprocess.run(
        [sys.executable, "-m", "seq2seq", "train", str(missing)],
        env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 2
    assert done.stderr.count(str(missing)) == 1, done.stderr
