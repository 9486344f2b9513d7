"""The README stays true: its test command is the one CI runs, every command it names answers
``--help``, its module map covers the package, and the quick start runs (offline, tiny budget)."""

from __future__ import annotations

import contextlib
import importlib
import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from seq2seq.__main__ import SUBCOMMANDS
from seq2seq.__main__ import main as seq2seq_main

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")
CI = (ROOT / ".ci" / "run").read_text(encoding="utf-8")


def code_blocks(text: str) -> list[str]:
    return re.findall(r"```(?:\w+)?\n(.*?)```", text, flags=re.S)


def section(text: str, title: str) -> str:
    match = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## |\Z)", text, flags=re.S | re.M)
    assert match, f"README has no '## {title}' section"
    return match.group(1)


def quick_start_commands() -> list[str]:
    block = code_blocks(section(README, "Quick start"))[0]
    return [line.split("#")[0].strip() for line in block.splitlines() if line.strip()]


def test_quick_start_is_two_commands_and_the_test_command_is_what_ci_runs():
    commands = quick_start_commands()
    assert commands == ["bash recipes/quickstart.sh", ".venv/bin/python -m pytest -q"]
    ci_lines = CI.splitlines()
    marker = ci_lines.index("# README's test command, verbatim:")
    assert ci_lines[marker + 1].strip() == commands[1]
    assert (ROOT / "recipes" / "quickstart.sh").is_file()


def mentioned_commands() -> tuple[set[str], set[str]]:
    """``seq2seq SUB`` subcommands and ``python -m seq2seq.MODULE`` modules named in code."""
    code = "\n".join(code_blocks(README)) + "\n" + "\n".join(re.findall(r"`([^`\n]+)`", README))
    subcommands = set(
        re.findall(r"(?<!from)(?<!import)(?:^|[\s|(])seq2seq ([a-z]\w*)", code, flags=re.M)
    )
    modules = set(re.findall(r"-m seq2seq\.([a-z]\w*)", code))
    return subcommands, modules


def test_the_readme_names_every_cli_and_each_answers_help():
    subcommands, modules = mentioned_commands()
    assert {"train", "prepare", "average", "translate", "evaluate", "sample"} <= subcommands
    assert "export" in modules or "export" in subcommands
    for name in sorted(subcommands):
        assert name in SUBCOMMANDS, f"README mentions 'seq2seq {name}', which does not exist"
        output = io.StringIO()
        with contextlib.redirect_stdout(output), pytest.raises(SystemExit) as exit_info:
            seq2seq_main([name, "--help"])
        assert exit_info.value.code == 0 and f"usage: seq2seq {name}" in output.getvalue()
    for name in sorted(modules):
        module = importlib.import_module(f"seq2seq.{name}")
        output = io.StringIO()
        with contextlib.redirect_stdout(output), pytest.raises(SystemExit) as exit_info:
            module.main(["--help"])
        assert exit_info.value.code == 0 and "usage:" in output.getvalue()


def test_module_map_lists_every_module_and_recipes_exist():
    table = section(README, "Module map")
    listed = set(re.findall(r"`(\w+)\.py`", table))
    modules = {p.stem for p in (ROOT / "seq2seq").glob("*.py")} - {"__init__", "__main__"}
    assert listed == modules
    for script in set(re.findall(r"recipes/([a-z0-9_]+\.sh)", README)):
        assert (ROOT / "recipes" / script).is_file(), script
    for config in set(re.findall(r"recipes/configs/(\w+\.yaml)", README)):
        assert (ROOT / "recipes" / "configs" / config).is_file(), config


@pytest.mark.slow
def test_quick_start_runs_offline_on_a_tiny_budget(tmp_path):
    """No Multi30k and no hub: the generated corpus, a small model, 100 updates, 50 sentences."""
    unset = ("DATA", "SEQ2SEQ_DATA", "STAGE", "CONFIG", "AVERAGE", "SRC", "TGT", "VALID_LINES")
    env = {k: v for k, v in os.environ.items() if k not in unset}
    env.update(PYTHON=sys.executable, HF_HUB_OFFLINE="1", OUT=str(tmp_path / "qs"))
    env.update(MAX_MINUTES="10", TEST_LINES="50")
    env["OVERRIDES"] = (
        "train.max_steps=100 train.eval_every=50 train.save_every=50 train.log_every=50"
    )
    result = subprocess.run(
        ["bash", str(ROOT / "recipes" / "quickstart.sh")],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "generated" in result.stdout and "pip install" not in result.stdout
    assert re.search(r"quickstart: cased: BLEU = [\d.]+ .*\(nrefs:1\|case:mixed", result.stdout)
    assert re.search(r"quickstart: lower-cased: BLEU = [\d.]+ .*case:lc", result.stdout)
    out = tmp_path / "qs"
    assert len((out / "test.hyp").read_text().splitlines()) == 50
    assert "averaged 2 checkpoints" in result.stdout
    assert json.loads((out / "length_penalty.json").read_text())["sentences"] == 300
    bleu = json.loads((out / "scores.json").read_text())["bleu"]["score"]
    assert bleu > QUICKSTART_TOY_BLEU_FLOOR


# The generated corpus is easy: a d_model 128 model measured BLEU 99.7 after 100 updates (2 busy
# cores, 3 min 40 s); an untrained model scores ~0.
QUICKSTART_TOY_BLEU_FLOOR = 30.0


def test_python_api_example_runs_on_a_model_directory(tmp_path):
    """The README's Python API block, run as written on a small model directory."""
    from test_api import tiny_translation_dir

    blocks = re.findall(r"```python\n(.*?)```", section(README, "Python API"), flags=re.S)
    assert len(blocks) == 1
    model_dir = tiny_translation_dir(tmp_path / "model")
    code = blocks[0].replace('"runs/m30k/model"', repr(str(model_dir)))
    assert code != blocks[0]
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)  # noqa: S102 - our own README
    translations = namespace["translations"]
    assert isinstance(translations, list) and len(translations) == 2
    assert all(isinstance(text, str) for text in translations)
    assert translations == namespace["translator"].translate(
        ["Ein Hund läuft.", "Zwei Männer."], beam=5
    )
    assert len(namespace["nbest"][0]) == 3 and len(namespace["log_probs"]) == 1
