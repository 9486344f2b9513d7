"""The model, search and training loop on an accelerator: same results as on the CPU.

Runs on ``$SEQ2SEQ_TEST_DEVICE`` (default ``cuda``; skipped without one). ``benchmarks/gpu_check.sh``
runs this file on the GPU, and its ``--cpu`` dry run (in CI) runs it with the device set to ``cpu``,
so the code paths are exercised everywhere even where the comparison is CPU against CPU.
"""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest
import torch

from seq2seq import train as train_module
from seq2seq.config import ModelConfig, config_from_dict, replace
from seq2seq.model import build_model
from seq2seq.prepare import prepare
from seq2seq.search import TransformerDecoder, beam_search, greedy
from seq2seq.tokenizer import EOS_ID, PAD_ID

DEVICE = os.environ.get("SEQ2SEQ_TEST_DEVICE", "cuda")
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        DEVICE.startswith("cuda") and not torch.cuda.is_available(),
        reason="no CUDA device (set SEQ2SEQ_TEST_DEVICE=cpu for the dry run)",
    ),
]
TINY = dict(
    d_model=32, n_heads=2, d_ff=64, n_encoder_layers=2, n_decoder_layers=2, max_positions=64
)


@pytest.fixture(autouse=True)
def _full_fp32_matmuls():
    """TF32 would round fp32 matmuls to 10 mantissa bits on Ampere and newer; compare in fp32."""
    if torch.cuda.is_available():
        previous = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = False
        yield
        torch.backends.cuda.matmul.allow_tf32 = previous
    else:
        yield


def _model_and_source():
    torch.manual_seed(0)
    model = build_model(ModelConfig(**TINY, dropout=0.0), 40, 40).eval()
    src = torch.randint(4, 40, (5, 9))
    src[1, 6:] = PAD_ID
    src[3, 4:] = PAD_ID
    src[torch.arange(5), (src != PAD_ID).sum(1) - 1] = EOS_ID
    return model, src


def test_forward_on_the_device_equals_the_cpu():
    model, src = _model_and_source()
    tgt = torch.randint(4, 40, (5, 7))
    expected = model(src, tgt)
    got = model.to(DEVICE)(src.to(DEVICE), tgt.to(DEVICE)).cpu()
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_cached_decoding_on_the_device_equals_the_full_forward():
    model, src = _model_and_source()
    model, src = model.to(DEVICE), src.to(DEVICE)
    tgt = torch.randint(4, 40, (5, 6), device=DEVICE)
    full = model(src, tgt)
    state = model.start_decoding(model.encode(src))
    steps = [model.decode_step(tgt[:, i : i + 1], state) for i in range(tgt.shape[1])]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("beam", [1, 4])
def test_search_on_the_device_finds_the_cpu_hypotheses(beam):
    model, src = _model_and_source()
    max_len = torch.full((5,), 12)

    def run(device):
        m, s = model.to(device), src.to(device)
        with torch.inference_mode():
            decoder = TransformerDecoder(m, s)
            if beam == 1:
                return [[h] for h in greedy(decoder, 5, max_len.to(device))]
            return beam_search(decoder, 5, beam, max_len.to(device), nbest=2)

    expected, got = run("cpu"), run(DEVICE)
    assert [[h.tokens for h in hs] for hs in got] == [[h.tokens for h in hs] for hs in expected]


def _copy_task(folder: Path) -> None:
    rng = random.Random(0)
    words = ["ab", "cd", "ef", "gab", "hic"]
    for split, size in (("train", 120), ("val", 16)):
        sources = [" ".join(rng.choices(words, k=rng.randint(1, 4))) for _ in range(size)]
        (folder / f"{split}.de").write_text("\n".join(sources) + "\n")
        (folder / f"{split}.en").write_text("\n".join(s.upper() for s in sources) + "\n")


@pytest.mark.parametrize("precision", ["auto", "bf16", "fp16"])
def test_training_on_the_device_lowers_the_loss(precision, tmp_path):
    """Every precision the device offers trains (fp16 through the grad scaler, CUDA only)."""
    if precision == "fp16" and not DEVICE.startswith("cuda"):
        pytest.skip("fp16 with loss scaling is CUDA-only")
    (tmp_path / "corpus").mkdir()
    _copy_task(tmp_path / "corpus")
    config = config_from_dict(
        {
            "model": dict(TINY, dropout=0.0),
            "data": dict(path=str(tmp_path / "corpus"), tokenizer="char", max_source_len=64, max_target_len=64),
            "prepare": dict(out_dir=str(tmp_path / "prepared"), num_workers=1),
            "batch": dict(max_tokens=256),
            "train": dict(
                out_dir=str(tmp_path / "run"), device=DEVICE, precision=precision, max_steps=40,
                lr_schedule="inverse_sqrt", lr=3e-3, warmup_steps=5, log_every=1000,
                eval_every=20, save_every=40, keep_last=1,
            ),
        }
    )  # fmt: skip
    prepare(config)
    one_update = replace(config, train={"max_steps": 1, "out_dir": str(tmp_path / "one")})
    first = train_module.train(one_update)
    metrics = train_module.train(config)
    assert metrics["step"] == 40 and metrics["nonfinite_updates"] == 0
    assert metrics["valid_loss"] < 0.8 * first["valid_loss"]
