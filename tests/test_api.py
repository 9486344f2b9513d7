"""The Python API: Translator equals the translate driver, score equals a hand computation from the
logits, LanguageModel.generate is seeded and its greedy path is argmax decoding."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch

from seq2seq import LanguageModel, Translator
from seq2seq.checkpoint import load_model, save_checkpoint
from seq2seq.config import ConfigError, ModelConfig, RunConfig, replace
from seq2seq.model import build_model
from seq2seq.tokenizer import BOS_ID, EOS_ID, CharVocab, Tokenizer
from seq2seq.translate import translate_nbest

CHARS = "abcdefghijklmnopqrstuvwxyz .,!?"
SOURCES = ["hello world", "", "a dog runs.", "   ", "two men, one boat!", "ab"]


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_translation_dir(directory: Path, max_positions: int = 32) -> Path:
    """A random-weight char-level Transformer directory (a few KB, saved like a trained one)."""
    torch.manual_seed(0)
    model_config = ModelConfig(
        d_model=32, n_heads=4, d_ff=64, n_encoder_layers=1, n_decoder_layers=2, dropout=0.0,
        max_positions=max_positions,
    )  # fmt: skip
    config = replace(
        RunConfig(model=model_config),
        data={"tokenizer": "char"},
        decode={"beam_size": 3, "max_len_a": 1.0, "max_len_b": 5},
    )
    tokenizer = Tokenizer("char", CharVocab(CHARS))
    model = build_model(config.model, tokenizer.src_vocab_size, tokenizer.tgt_vocab_size)
    return save_checkpoint(directory, model, config, tokenizer)


def tiny_gpt_dir(directory: Path) -> Path:
    torch.manual_seed(0)
    model_config = ModelConfig(
        arch="gpt", d_model=32, n_heads=4, d_ff=64, n_encoder_layers=0, n_decoder_layers=2,
        dropout=0.0, positions="learned", max_positions=16, tie_output=False,
    )  # fmt: skip
    config = replace(
        RunConfig(model=model_config),
        data={"format": "lm", "tokenizer": "char"},
        decode={"max_new_tokens": 20},
    )
    tokenizer = Tokenizer("char", CharVocab("abcdefgh \n"))
    model = build_model(config.model, tokenizer.vocab_size, tokenizer.vocab_size)
    with torch.no_grad():  # strong positions keep a random model's greedy text from looping
        model.positions.table.normal_(0.0, 1.0)
    return save_checkpoint(directory, model, config, tokenizer)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return tiny_translation_dir(tmp_path_factory.mktemp("api") / "tiny")


@pytest.fixture(scope="module")
def gpt_dir(tmp_path_factory) -> Path:
    return tiny_gpt_dir(tmp_path_factory.mktemp("api") / "gpt")


@pytest.fixture(scope="module")
def translator(model_dir) -> Translator:
    return Translator.load(model_dir, device="cpu", precision="fp32")


def test_translate_equals_the_translate_driver_in_order(translator, model_dir):
    model, tokenizer, config = load_model(model_dir)
    for beam in (1, 4):
        decode = replace(config, decode={"beam_size": beam}).decode
        expected = [
            hyps[0][0] if hyps else ""
            for hyps in translate_nbest(model, tokenizer, SOURCES, decode)
        ]
        assert translator.translate(SOURCES, beam=beam) == expected
    assert translator.translate(SOURCES)[1] == "" and translator.translate(SOURCES)[3] == ""
    # order, not batching, decides what comes back: reversed input gives reversed output
    assert (
        translator.translate(SOURCES[::-1], beam=4) == translator.translate(SOURCES, beam=4)[::-1]
    )
    assert translator.translate([]) == []


def test_translate_nbest_is_sorted_and_its_best_is_translate(translator):
    nbest = translator.translate_nbest(SOURCES, nbest=3, beam=3)
    assert len(nbest) == len(SOURCES)
    assert nbest[1] == [("", 0.0)]
    for hyps, best in zip(nbest, translator.translate(SOURCES, beam=3)):
        assert hyps[0][0] == best and 1 <= len(hyps) <= 3
        scores = [score for _, score in hyps]
        assert scores == sorted(scores, reverse=True)
    # the beam widens to nbest when asked for more hypotheses than its width
    assert len(translator.translate_nbest(["hello world"], nbest=4, beam=1)[0]) == 4
    with pytest.raises(ConfigError):
        translator.translate(["x"], beam=0)


def test_score_equals_the_logits_by_hand(translator, model_dir):
    model, tokenizer, _ = load_model(model_dir)
    sources = ["hello world", "", "a dog runs."]
    targets = ["hi there", "x", ""]
    expected = []
    for source, target in zip(sources, targets):
        src = torch.tensor([tokenizer.encode_source(source) + [EOS_ID]])
        tgt = tokenizer.encode_target(target)
        with torch.no_grad():
            logits = model(src, torch.tensor([[BOS_ID] + tgt]))[0]
        log_probs = torch.log_softmax(logits.double(), dim=-1)
        expected.append(sum(float(log_probs[i, token]) for i, token in enumerate(tgt + [EOS_ID])))
    got = translator.score(sources, targets)
    assert got == pytest.approx(expected, abs=1e-4)
    assert all(score < 0 for score in got)
    with pytest.raises(ValueError, match="2 sources but 1 targets"):
        translator.score(["a", "b"], ["c"])
    with pytest.raises(ValueError, match="pair 0"):
        translator.score(["a" * 40], ["b"])


def test_score_of_a_beam_output_is_its_search_log_prob(translator):
    # with no length penalty a hypothesis' score is the raw log-probability the search summed
    nbest = translator.translate_nbest(
        ["hello world", "two men"], nbest=1, beam=3, length_penalty=0.0
    )
    hyps = [hyps[0][0] for hyps in nbest]
    assert translator.score(["hello world", "two men"], hyps) == pytest.approx(
        [hyps[0][1] for hyps in nbest], abs=1e-4
    )


def test_translator_is_safe_to_share_between_threads(translator):
    expected = {source: translator.translate([source]) for source in SOURCES}
    results: dict[int, list[str]] = {}

    def work(index: int) -> None:
        source = SOURCES[index % len(SOURCES)]
        results[index] = translator.translate([source])

    threads = [threading.Thread(target=work, args=(i,)) for i in range(12)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert all(results[i] == expected[SOURCES[i % len(SOURCES)]] for i in range(12))


def test_auto_precision_samples_in_fp32_and_translates_in_bf16_where_bf16_is_native(
    model_dir, gpt_dir, monkeypatch
):
    from seq2seq import hardware

    monkeypatch.setattr(hardware, "cpu_class", lambda: "avx512_bf16")
    gpt = LanguageModel.load(gpt_dir, device="cpu")
    assert gpt.precision.precision == "fp32" and "one row per step" in gpt.precision.reason
    assert LanguageModel.load(gpt_dir, device="cpu", precision="bf16").precision.precision == "bf16"
    assert Translator.load(model_dir, device="cpu").precision.precision == "bf16"  # batched


def test_load_reports_device_precision_and_refuses_the_other_kind(model_dir, gpt_dir):
    translator = Translator.load(model_dir)  # auto, auto
    assert translator.device.type in ("cpu", "cuda")
    assert translator.precision.precision in ("fp32", "bf16", "fp16")
    assert translator.parameters > 0 and translator.max_source_tokens == 31
    assert translator.source_lengths(["abc", ""]) == [3, 0]
    with pytest.raises(ValueError, match="needs arch 'gpt'"):
        LanguageModel.load(model_dir, device="cpu")
    with pytest.raises(ValueError, match="needs arch 'transformer'"):
        Translator.load(gpt_dir, device="cpu")
    with pytest.raises(ValueError, match="unknown precision"):
        Translator.load(model_dir, precision="int3")


def test_generate_is_seeded_and_greedy_is_argmax(gpt_dir):
    lm = LanguageModel.load(gpt_dir, device="cpu", precision="fp32")
    first = lm.generate("abc", max_new_tokens=12, temperature=1.0, seed=7)
    assert first == lm.generate("abc", max_new_tokens=12, temperature=1.0, seed=7)
    assert first.startswith("abc") and len(first) == 3 + 12
    others = {lm.generate("abc", max_new_tokens=12, temperature=1.0, seed=s) for s in range(5)}
    assert len(others) > 1  # the seed matters

    model, tokenizer, _ = load_model(gpt_dir)
    tokens = tokenizer.encode_target("abc")
    never = {0, BOS_ID, EOS_ID}  # PAD, BOS, EOS are never sampled
    for _ in range(10):  # uncached argmax decoding (fits in max_positions=16)
        with torch.no_grad():
            logits = model(torch.tensor([tokens]))[0, -1]
        logits[list(never)] = float("-inf")
        tokens.append(int(logits.argmax()))
    expected = tokenizer.decode_target(tokens)
    assert lm.generate("abc", max_new_tokens=10, temperature=0.0) == expected
    assert lm.generate("abc", max_new_tokens=10, top_k=1, seed=3) == expected
    with pytest.raises(ValueError, match=">= 0"):
        lm.generate("abc", max_new_tokens=-1)
