"""CPU class detection (and its emulation variables), device and precision resolution."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from seq2seq import hardware


def _class_under(env: dict[str, str]) -> tuple[str, str]:
    code = (
        "from seq2seq import hardware as h; "
        "print(h.cpu_class(), h.resolve_precision('auto', 'cpu').precision)"
    )
    base = {
        k: v
        for k, v in __import__("os").environ.items()
        if k not in ("ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA", "ATEN_CPU_CAPABILITY")
    }
    result = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=120,
        env={**base, **env},
    )
    assert result.returncode == 0, result.stderr
    found, precision = result.stdout.split()
    return found, precision


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        ({"avx2", "fma"}, "avx2"),
        ({"avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512dq"}, "avx512"),
        (
            {"avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_bf16"},
            "avx512_bf16",
        ),
        ({"avx512f", "avx512_bf16", "amx_bf16", "amx_tile"}, "amx"),
        ({"sse4_2"}, "other"),
    ],
)
def test_cpu_flags_map_to_classes(flags, expected, monkeypatch):
    monkeypatch.setattr(hardware.platform, "machine", lambda: "x86_64")
    assert hardware._hardware_cpu_class(frozenset(flags)) == expected


def test_non_x86_machines_are_not_taken_for_x86_classes(monkeypatch):
    monkeypatch.setattr(hardware.platform, "machine", lambda: "aarch64")
    assert hardware._hardware_cpu_class(frozenset({"avx2", "amx_tile"})) == "other"


@pytest.mark.parametrize(
    ("env", "ceiling"),
    [
        ({"ONEDNN_MAX_CPU_ISA": "AVX2"}, "avx2"),
        ({"ONEDNN_MAX_CPU_ISA": "avx512_core"}, "avx512"),
        ({"ATEN_CPU_CAPABILITY": "avx2"}, "avx2"),
        ({"ATEN_CPU_CAPABILITY": "default"}, "other"),
        ({"ONEDNN_MAX_CPU_ISA": "AVX512_CORE_BF16", "ATEN_CPU_CAPABILITY": "avx2"}, "avx2"),
    ],
)
def test_emulation_variables_cap_the_class_and_auto_follows(env, ceiling):
    """The class is the least of the hardware's and each variable's; auto is bf16 only when native."""
    native, _ = _class_under({})
    found, precision = _class_under(env)
    classes = hardware.CPU_CLASSES
    assert classes.index(found) == min(classes.index(native), classes.index(ceiling))
    assert precision == ("bf16" if found in hardware.NATIVE_BF16_CLASSES else "fp32")


def test_auto_precision_on_cpu_by_class(monkeypatch):
    for cls, expected in (
        ("amx", "bf16"),
        ("avx512_bf16", "bf16"),
        ("avx512", "fp32"),
        ("avx2", "fp32"),
    ):
        monkeypatch.setattr(hardware, "cpu_class", lambda cls=cls: cls)
        choice = hardware.resolve_precision("auto", "cpu")
        assert choice.precision == expected
        assert cls in choice.describe("auto") and choice.describe("auto").startswith(
            f"precision: auto -> {expected} ("
        )
        assert choice.dtype == (torch.bfloat16 if expected == "bf16" else None)


def test_explicit_bf16_without_native_support_warns_and_is_honoured(monkeypatch):
    monkeypatch.setattr(hardware, "cpu_class", lambda: "avx2")
    with pytest.warns(UserWarning, match="16x slower"):
        assert hardware.resolve_precision("bf16", "cpu").precision == "bf16"
    monkeypatch.setattr(hardware, "cpu_class", lambda: "amx")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert hardware.resolve_precision("bf16", "cpu").precision == "bf16"
        assert hardware.resolve_precision("fp32", "cpu").precision == "fp32"


def test_fp16_and_unknown_precisions_are_refused_on_cpu():
    with pytest.raises(ValueError, match="fp16 needs CUDA"):
        hardware.resolve_precision("fp16", "cpu")
    with pytest.raises(ValueError, match="unknown precision 'half'"):
        hardware.resolve_precision("half", "cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only messages")
@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("cuda", "CUDA is not available"),
        ("cuda:5", "CUDA is not available"),
        ("foo", "unknown device"),
        ("meta", "unsupported device"),
    ],
)
def test_device_names_are_checked_with_a_clear_message(name, message):
    with pytest.raises(ValueError, match=message):
        hardware.resolve_device(name)


def test_auto_and_cpu_devices():
    assert hardware.resolve_device("cpu") == torch.device("cpu")
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert hardware.resolve_device("auto").type == expected


def test_auto_keeps_fp32_for_narrow_models_even_with_native_bf16(monkeypatch):
    """Measured: at d_model 128 fp32 trained 1.33x the updates of bf16 on AMX; at 256 bf16 won."""
    monkeypatch.setattr(hardware, "cpu_class", lambda: "amx")
    narrow = hardware.resolve_precision("auto", "cpu", d_model=128)
    assert narrow.precision == "fp32" and "d_model 128 < 256" in narrow.reason
    assert hardware.resolve_precision("auto", "cpu", d_model=256).precision == "bf16"
    assert hardware.resolve_precision("bf16", "cpu", d_model=128).precision == "bf16"  # explicit
    monkeypatch.setattr(hardware, "cpu_class", lambda: "avx2")
    assert hardware.resolve_precision("auto", "cpu", d_model=1024).precision == "fp32"


_FRAGMENT = """
import sys
from pathlib import Path

import torch

from seq2seq.hardware import fix_malloc_mmap_threshold


def rss_mib():
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024


if sys.argv[1] == "fixed":
    assert fix_malloc_mmap_threshold()
for _ in range(3):  # what a first update does: large blocks allocated and freed
    block = torch.ones(2**20)
    del block
before = rss_mib()
kept = []
for i in range(60):  # blocks of 3-7 MiB, each followed by a small tensor that outlives it
    block = torch.ones((3 + i % 5) * 2**18)
    kept.append(torch.ones(2**12))
    del block
print(rss_mib() - before)
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's mallopt")
def test_fixed_mmap_threshold_returns_freed_blocks(tmp_path):
    """Large blocks of varying sizes freed between small survivors: with glibc's adaptive
    threshold they stay in the heap as holes (tens of MiB here); with the fixed threshold each is
    unmapped on free, and RSS grows only by the survivors (60 x 16 KiB) and page rounding."""
    script = tmp_path / "fragment.py"
    script.write_text(_FRAGMENT)
    env = {k: v for k, v in os.environ.items() if k != "MALLOC_MMAP_THRESHOLD_"}
    env["PYTHONPATH"] = str(Path(__file__).resolve().parent.parent)

    def growth(mode: str) -> float:
        done = subprocess.run(
            [sys.executable, str(script), mode], env=env, capture_output=True, text=True, check=True
        )
        return float(done.stdout.split()[-1])

    assert growth("adaptive") > 30
    assert growth("fixed") < 8


def test_user_mmap_threshold_wins(monkeypatch):
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "131072")
    assert not hardware.fix_malloc_mmap_threshold()
