"""What the machine computes natively, and the device and precision choices that follow from it.

``precision: auto`` (the default everywhere) resolves here:

- CUDA with bf16 support (Ampere and newer) -> ``bf16``;
- CUDA without it (V100, T4) -> ``fp16`` with the grad scaler;
- a CPU whose matmuls run bf16 natively (AVX-512-BF16 or AMX, through oneDNN) -> ``bf16``, except
  for training a model narrower than ``MIN_BF16_CPU_WIDTH`` on AMX, which is faster in fp32, and
  for sampling a GPT one row at a time (:func:`resolve_sampling_precision`), faster in fp32;
- any other CPU -> ``fp32``: without those instructions PyTorch falls back to a reference bf16
  GEMM that measured ~16x slower than fp32 on an AVX2-only AMD EPYC (benchmarks/RESULTS.md).

The CPU class honours the two variables that lower PyTorch's kernels, so that one machine can
stand in for a lesser one: ``ONEDNN_MAX_CPU_ISA`` caps oneDNN's matmuls (``AVX2`` makes bf16 fall to
the reference kernel) and ``ATEN_CPU_CAPABILITY`` caps ATen's vectorised kernels. The class is the
least of what the CPU reports and what either variable allows.
"""

from __future__ import annotations

import functools
import os
import platform
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

# CPU classes, weakest first. "avx512_bf16" and "amx" run bf16 matmuls natively.
CPU_CLASSES = ("other", "avx2", "avx512", "avx512_bf16", "amx")
NATIVE_BF16_CLASSES = ("avx512_bf16", "amx")

# oneDNN's ISA names (ONEDNN_MAX_CPU_ISA, documented in oneDNN's "CPU dispatcher control") -> the
# strongest class they allow. Names not listed here (and "ALL"/"DEFAULT") impose no cap.
_ONEDNN_ISA_CAP = {
    "SSE41": "other",
    "AVX": "other",
    "AVX2": "avx2",
    "AVX2_VNNI": "avx2",
    "AVX2_VNNI_2": "avx2",
    "AVX512_CORE": "avx512",
    "AVX512_CORE_VNNI": "avx512",
    "AVX512_CORE_BF16": "avx512_bf16",
    "AVX512_CORE_FP16": "avx512_bf16",
    "AVX10_1_512": "avx512_bf16",
}
# ATEN_CPU_CAPABILITY values -> the strongest class they allow.
_ATEN_CAP = {"default": "other", "avx2": "avx2", "avx512": "amx", "zvector": "other"}

PRECISIONS = ("auto", "fp32", "bf16", "fp16")

# On AMX, narrower models than this train faster in fp32: their matmuls are too small for AMX to
# win back autocast's casts. Measured on an AMX Xeon, 2 threads: d_model 128 (the quick start) made
# 2,001 fp32 updates against 1,506 bf16 in 5 minutes; d_model 256 (transformer_small) trained 1.28x
# faster in bf16. With AVX-512-BF16 and no AMX (an AMD EPYC, Zen 5 class) bf16 was not slower at
# d_model 128: the quick start's 300 updates took 38.9-40.8 s against 40.6-41.3 s in fp32, and the
# Shakespeare GPT trained 1.49x faster (27.6 against 41.0 ms/update) to the same loss
# (benchmarks/RESULTS.md), so the width rule holds for AMX only.
MIN_BF16_CPU_WIDTH = 256
NARROW_FP32_CLASSES = ("amx",)


@dataclass(frozen=True)
class PrecisionChoice:
    """A resolved precision and the reason, as printed at start and saved with the run."""

    precision: str  # "fp32" | "bf16" | "fp16"
    reason: str

    @property
    def dtype(self) -> torch.dtype | None:
        """The autocast dtype, or None for full precision."""
        return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[self.precision]

    def describe(self, requested: str) -> str:
        if requested == "auto":
            return f"precision: auto -> {self.precision} ({self.reason})"
        return f"precision: {self.precision} ({self.reason})"


def _cpuinfo_field(name: str) -> str:
    """The first ``name`` line of /proc/cpuinfo (Linux), or "" where it cannot be read."""
    try:
        text = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        return ""
    for line in text.splitlines():
        if line.split(":", 1)[0].strip() == name:
            return line.split(":", 1)[1].strip()
    return ""


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The x86 feature flags the kernel reports (Linux); empty where they cannot be read.

    The hardware's own, whatever ``ATEN_CPU_CAPABILITY`` or ``ONEDNN_MAX_CPU_ISA`` say: libraries
    that read neither (fbgemm, for int8) run by these."""
    return frozenset(_cpuinfo_field("flags").split())


@functools.cache
def cpu_vendor() -> str:
    """``AuthenticAMD``, ``GenuineIntel``, ... as the kernel reports it; "" where unknown."""
    return _cpuinfo_field("vendor_id")


def _hardware_cpu_class(flags: frozenset[str]) -> str:
    if platform.machine().lower() not in ("x86_64", "amd64", "i686", "x86"):
        return "other"
    if not flags:  # no /proc/cpuinfo (macOS, Windows): ATen's own dispatch level is all we know
        return {"AVX512": "avx512", "AVX2": "avx2"}.get(
            torch.backends.cpu.get_cpu_capability(), "other"
        )
    if {"amx_bf16", "amx_tile", "avx512_bf16"} <= flags:
        return "amx"
    if "avx512_bf16" in flags:
        return "avx512_bf16"
    if {"avx512f", "avx512bw", "avx512vl", "avx512dq"} <= flags:
        return "avx512"
    if {"avx2", "fma"} <= flags:
        return "avx2"
    return "other"


def _weaker(a: str, b: str) -> str:
    return a if CPU_CLASSES.index(a) <= CPU_CLASSES.index(b) else b


@functools.cache
def cpu_class() -> str:
    """This CPU's class (one of :data:`CPU_CLASSES`), capped by the emulation variables."""
    found = _hardware_cpu_class(cpu_flags())
    onednn = os.environ.get("ONEDNN_MAX_CPU_ISA", os.environ.get("DNNL_MAX_CPU_ISA", ""))
    found = _weaker(found, _ONEDNN_ISA_CAP.get(onednn.strip().upper(), "amx"))
    aten = os.environ.get("ATEN_CPU_CAPABILITY", "").strip().lower()
    return _weaker(found, _ATEN_CAP.get(aten, "amx"))


def cpu_has_native_bf16() -> bool:
    """True where oneDNN runs bf16 matmuls with bf16 instructions (AVX-512-BF16 or AMX).

    A fact of the machine: a run that compiles marks it ``torch.compiler.assume_constant_result``
    first (see ``trainsetup.build_run``), so compiled graphs hold no guard on it. Marking it here
    would import the compiler (~0.8 s) into every process.
    """
    return cpu_class() in NATIVE_BF16_CLASSES


def resolve_device(preference: str, local_rank: int = 0) -> torch.device:
    """``auto`` -> CUDA when available, else CPU; ``cuda`` -> ``cuda:<local_rank>``.

    Raises:
        ValueError: the name is not a device, or names a CUDA device this machine does not have;
            the message quotes the name.
    """
    name = preference.strip()
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise ValueError(f"unknown device {preference!r} (use auto, cpu, cuda or cuda:N)") from None
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"unsupported device {preference!r} (use auto, cpu, cuda or cuda:N)")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {preference!r} asked for, but CUDA is not available here")
        if device.index is None:
            device = torch.device("cuda", local_rank)
        if device.index >= torch.cuda.device_count():
            raise ValueError(
                f"device {preference!r} asked for, but this machine has "
                f"{torch.cuda.device_count()} CUDA device(s)"
            )
    return device


def resolve_precision(
    requested: str, device: torch.device | str, d_model: int | None = None
) -> PrecisionChoice:
    """What ``requested`` (``auto``/``fp32``/``bf16``/``fp16``) means on ``device``.

    ``d_model``, when the caller trains a model of that width, lets ``auto`` keep fp32 on an AMX
    CPU for models narrower than :data:`MIN_BF16_CPU_WIDTH` (measured faster there).

    An explicit ``bf16`` on a CPU without native bf16 is honoured with a warning that says how much
    slower it will be; ``fp16`` is CUDA-only (it needs loss scaling, which CPU autocast lacks).

    Raises:
        ValueError: an unknown name, or fp16 on a CPU.
    """
    device = torch.device(device)
    if requested not in PRECISIONS:
        raise ValueError(f"unknown precision {requested!r} (use {', '.join(PRECISIONS)})")
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        has_bf16 = torch.cuda.is_bf16_supported(including_emulation=False)
        if requested == "auto":
            if has_bf16:
                return PrecisionChoice("bf16", f"CUDA {name} supports bf16")
            return PrecisionChoice("fp16", f"CUDA {name} without bf16: fp16 with loss scaling")
        if requested == "bf16" and not has_bf16:
            warnings.warn(
                f"bf16 on {name}, which lacks native bf16, is emulated and slow", stacklevel=2
            )
        return PrecisionChoice(requested, f"asked for, on CUDA {name}")
    cls = cpu_class()
    if requested == "fp16":
        raise ValueError("precision fp16 needs CUDA (loss scaling); use auto, bf16 or fp32 on CPU")
    if requested == "auto":
        if cls in NARROW_FP32_CLASSES and d_model is not None and d_model < MIN_BF16_CPU_WIDTH:
            return PrecisionChoice(
                "fp32",
                f"CPU with native bf16 ({cls}), but d_model {d_model} < {MIN_BF16_CPU_WIDTH}",
            )
        if cls in NATIVE_BF16_CLASSES:
            return PrecisionChoice("bf16", f"CPU with native bf16: {cls}")
        return PrecisionChoice("fp32", f"CPU without native bf16: {cls}")
    if requested == "bf16" and cls not in NATIVE_BF16_CLASSES:
        warnings.warn(
            f"precision bf16 on a CPU without native bf16 ({cls}): PyTorch falls back to a "
            "reference kernel, about 16x slower than fp32 (benchmarks/RESULTS.md); "
            "use precision auto or fp32",
            stacklevel=2,
        )
        return PrecisionChoice("bf16", f"asked for; CPU without native bf16: {cls}, slow")
    return PrecisionChoice(requested, f"asked for, on CPU class {cls}")


def resolve_sampling_precision(requested: str, device: torch.device | str) -> PrecisionChoice:
    """:func:`resolve_precision` for sampling a GPT, one row per step: ``auto`` on a CPU stays fp32.

    A one-row step's products are too small for bf16 to win back autocast's casts of the weights,
    which it redoes at every step, and the fp32 step runs as one TorchScript graph
    (:mod:`seq2seq.scripted`), which autocast bypasses. On a Zen 5 EPYC (one thread, a decoder
    step of one row, benchmarks/RESULTS.md) bf16 ran at 0.48x, 0.57x and 0.50x fp32's speed at
    d_model 256, 512 and 1,024; `seq2seq sample` on the Shakespeare GPT gave 211-225 tokens/s in
    bf16 against 628 in fp32. Batched translation keeps :func:`resolve_precision`:
    with ``batch_tokens`` 4,096 bf16 searched Multi30k 1.05-1.13x faster there.

    Raises:
        ValueError: as :func:`resolve_precision`.
    """
    choice = resolve_precision(requested, device)
    if requested == "auto" and choice.precision == "bf16" and torch.device(device).type == "cpu":
        return PrecisionChoice(
            "fp32", f"sampling one row per step on a CPU with native bf16 ({cpu_class()})"
        )
    return choice
