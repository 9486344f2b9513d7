"""CPU class detection (and its emulation variables), device and precision resolution."""

from __future__ import annotations

import subprocess
import sys
import warnings

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


@pytest.mark.parametrize("cls", ["amx", "avx512_bf16"])
def test_auto_samples_in_fp32_on_a_cpu_even_with_native_bf16(monkeypatch, cls):
    """One row per step: bf16 autocast measured at half fp32's speed; an explicit bf16 is kept,
    and batched work (training, translation) keeps bf16."""
    monkeypatch.setattr(hardware, "cpu_class", lambda: cls)
    choice = hardware.resolve_sampling_precision("auto", "cpu")
    assert (
        choice.precision == "fp32" and "one row per step" in choice.reason and cls in choice.reason
    )
    assert hardware.resolve_sampling_precision("bf16", "cpu").precision == "bf16"
    assert hardware.resolve_precision("auto", "cpu", d_model=512).precision == "bf16"
    monkeypatch.setattr(hardware, "cpu_class", lambda: "avx2")
    choice = hardware.resolve_sampling_precision("auto", "cpu")
    assert choice.precision == "fp32" and "without native bf16" in choice.reason
    with pytest.raises(ValueError, match="fp16 needs CUDA"):
        hardware.resolve_sampling_precision("fp16", "cpu")


def test_auto_trains_narrow_models_in_bf16_with_avx512_bf16_and_no_amx(monkeypatch):
    """Measured on an AMD EPYC (Zen 5 class): bf16 at d_model 128 as fast as fp32 (quick start)
    or 1.49x faster (Shakespeare GPT), so the width rule is AMX's alone."""
    monkeypatch.setattr(hardware, "cpu_class", lambda: "avx512_bf16")
    for width in (64, 128, 256, 512):
        choice = hardware.resolve_precision("auto", "cpu", d_model=width)
        assert choice.precision == "bf16" and "avx512_bf16" in choice.reason, width
