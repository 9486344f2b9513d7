"""The shared decode core: one length-limit formula, validation BLEU through it, the decode cache
under any reorder, and the int8 path (CLI, Translator, a clear error off the CPU)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.ao.nn.quantized.dynamic import Linear as DynamicInt8Linear

from seq2seq import Translator
from seq2seq import validate as validate_module
from seq2seq.config import DecodeConfig, ModelConfig
from seq2seq.data import TOKENIZER_DIR, TokenizedCorpus, collate
from seq2seq.decoding import (
    batch_workers,
    max_output_lengths,
    quantize_int8,
    search_batches,
    translate_ids,
)
from seq2seq.distributed import DistInfo
from seq2seq.model import build_model
from seq2seq.prepare import prepare
from seq2seq.search import TransformerDecoder, greedy
from seq2seq.tokenizer import BOS_ID, PAD_ID, Tokenizer
from seq2seq.translate import main as translate_main
from tests.test_api import SOURCES, tiny_translation_dir

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_model(vocab: int, max_positions: int = 32):
    torch.manual_seed(0)
    config = ModelConfig(
        d_model=32, n_heads=4, d_ff=64, n_encoder_layers=1, n_decoder_layers=2, dropout=0.0,
        max_positions=max_positions,
    )  # fmt: skip
    return build_model(config, vocab, vocab).eval()


def test_length_limit_is_a_times_source_plus_b_clamped_to_one_and_max_positions():
    lengths = torch.tensor([1, 4, 10, 40])
    decode = DecodeConfig(max_len_a=1.5, max_len_b=2)
    assert max_output_lengths(lengths, decode, 30).tolist() == [3, 8, 17, 30]
    zero = DecodeConfig(max_len_a=0.0, max_len_b=0)
    assert max_output_lengths(lengths, zero, 30).tolist() == [1, 1, 1, 1]


def test_validation_bleu_is_the_old_greedy_driver_through_the_shared_core(
    tmp_path, toy, monkeypatch
):
    toy.write(tmp_path / "corpus", "train", toy.pairs(200))
    toy.write(tmp_path / "corpus", "val", toy.pairs(70, seed=1))
    prepared = prepare(toy.config(tmp_path))
    corpus = TokenizedCorpus(prepared, "val")
    tokenizer = Tokenizer.load(prepared / TOKENIZER_DIR)
    model = tiny_model(tokenizer.tgt_vocab_size, max_positions=64)
    # Beam, min_len and n-gram blocking are the final search's; validation stays greedy without them.
    decode = DecodeConfig(
        beam_size=4, min_len=3, no_repeat_ngram_size=2, max_len_a=1.0, max_len_b=3
    )
    seen = {}

    def spy(hypotheses, references):
        seen["hypotheses"] = list(hypotheses)
        return type("Bleu", (), {"score": 0.0})()

    monkeypatch.setattr(validate_module.sacrebleu, "corpus_bleu", spy)
    info = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    validate_module.validation_bleu(model, corpus, tokenizer, info, 70, decode, 64)

    # The driver validation had before it went through translate_ids, written out here.
    mine = np.arange(len(corpus))
    mine = mine[np.argsort(corpus.src_lengths[mine], kind="stable")]
    expected = {}
    for chunk in np.array_split(mine, -(-len(mine) // validate_module.BLEU_BATCH_SENTENCES)):
        src = collate(corpus, chunk).src
        max_len = (decode.max_len_a * (src != PAD_ID).sum(dim=1) + decode.max_len_b).long()
        with torch.no_grad():
            hyps = greedy(TransformerDecoder(model, src), len(chunk), max_len.clamp(1, 64))
        for index, hyp in zip(chunk.tolist(), hyps):
            expected[index] = tokenizer.decode_target(hyp.tokens)
    assert seen["hypotheses"] == [expected[i] for i in range(len(corpus))]
    assert len(set(seen["hypotheses"])) > 1


def test_cache_follows_any_reorder_like_a_full_recompute():
    model = tiny_model(12)
    src = torch.tensor([[5, 6, 7, 2], [8, 9, 2, PAD_ID], [4, 2, PAD_ID, PAD_ID]])
    decoder = TransformerDecoder(model, src)
    prefix = torch.full((3, 1), BOS_ID)
    sources = torch.arange(3)
    # Grouped beams (3 per source), then a shuffle across sources with repeats, then a drop.
    for index in ([0, 0, 0, 1, 1, 1, 2, 2, 2], [8, 0, 4, 4, 1], [3, 0]):
        step = decoder.step(prefix[:, -1])
        with torch.no_grad():
            full = torch.log_softmax(model(src[sources], prefix)[:, -1], dim=-1)
        torch.testing.assert_close(step, full, atol=1e-5, rtol=1e-5)
        index = torch.tensor(index)
        decoder.reorder(index)
        tokens = torch.arange(len(index))[:, None] % 9 + 3
        prefix, sources = torch.cat([prefix[index], tokens], dim=1), sources[index]
    with torch.no_grad():
        full = torch.log_softmax(model(src[sources], prefix)[:, -1], dim=-1)
    torch.testing.assert_close(decoder.step(prefix[:, -1]), full, atol=1e-5, rtol=1e-5)


def test_a_full_state_reorder_after_grouped_beams_keeps_each_rows_source():
    model = tiny_model(12)
    src = torch.tensor([[5, 6, 7, 2], [8, 9, 2, PAD_ID]])
    decoder = TransformerDecoder(model, src)
    decoder.step(torch.full((2,), BOS_ID))
    decoder.reorder(torch.tensor([0, 0, 0, 1, 1, 1]))  # the cache now holds one row per source
    decoder.step(torch.tensor([3, 4, 5, 6, 7, 8]))
    index = torch.tensor([5, 0, 3])  # rows of sources 1, 0, 1, moved by the state itself
    decoder.state.reorder(index)
    prefix = torch.tensor([[BOS_ID, 8, 9], [BOS_ID, 3, 10], [BOS_ID, 6, 11]])
    with torch.no_grad():
        full = torch.log_softmax(model(src[[1, 0, 1]], prefix)[:, -1], dim=-1)
    torch.testing.assert_close(decoder.step(prefix[:, -1]), full, atol=1e-5, rtol=1e-5)


def test_int8_quantizes_a_copy_and_stays_close_to_fp32():
    model = tiny_model(12)
    quantized = quantize_int8(model, "cpu")
    assert not any(isinstance(m, DynamicInt8Linear) for m in model.modules())  # original kept
    assert sum(isinstance(m, DynamicInt8Linear) for m in quantized.modules()) >= 10
    src, tgt = torch.tensor([[5, 6, 7, 2]]), torch.tensor([[BOS_ID, 4, 5, 6]])
    with torch.no_grad():
        exact, approx = model(src, tgt), quantized(src, tgt)
    assert not torch.equal(exact, approx)
    assert (exact - approx).abs().max() < 0.1 * exact.abs().max()
    # The tied output projection runs int8 too, on a copy kept out of the state dict; the float
    # embedding is untouched.
    assert isinstance(quantized.decoder.output_projection, DynamicInt8Linear)
    assert model.decoder.output_projection is None
    assert not any("output_projection" in key for key in quantized.state_dict())
    assert torch.equal(quantized.target_embedding.weight, model.target_embedding.weight)
    decode = DecodeConfig(beam_size=2, max_len_a=0.0, max_len_b=6)
    assert len(translate_ids(quantized, [[5, 6, 7, 2], [8, 2]], decode)) == 2
    with pytest.raises(ValueError, match="CPU only"):
        quantize_int8(model, "cuda")


def test_translate_and_translator_take_precision_int8(tmp_path, capsys):
    model_dir = tiny_translation_dir(tmp_path / "model")
    source = tmp_path / "in.txt"
    source.write_text("\n".join(SOURCES) + "\n", encoding="utf-8")
    out = tmp_path / "out.txt"
    args = ["--model", str(model_dir), "--input", str(source), "--output", str(out)]
    assert translate_main([*args, "--device", "cpu", "--precision", "int8"]) == 0
    assert "precision: int8" in capsys.readouterr().err
    lines = out.read_text(encoding="utf-8").splitlines()
    translator = Translator.load(model_dir, device="cpu", precision="int8")
    assert any(isinstance(m, DynamicInt8Linear) for m in translator.model.modules())
    assert translator.translate(SOURCES, beam=3) == lines
    assert len(lines) == len(SOURCES) and lines[1] == "" and lines[0]


def test_int8_off_the_cpu_is_one_clear_line(tmp_path, capsys, monkeypatch):
    import seq2seq.translate as translate_module

    model_dir = tiny_translation_dir(tmp_path / "model")
    monkeypatch.setattr(translate_module, "resolve_device", lambda name: torch.device("cuda"))
    assert translate_main(["--model", str(model_dir), "--precision", "int8"]) == 2
    err = capsys.readouterr().err
    assert "--precision int8 runs on the CPU only" in err and "Traceback" not in err


def test_batches_searched_side_by_side_equal_one_after_another(monkeypatch):
    model = tiny_model(40)
    model.train()  # as the training loop's validation hands it over
    generator = torch.Generator().manual_seed(3)
    batches = [
        [torch.randint(4, 40, (n,), generator=generator).tolist() + [2] for n in lengths]
        for lengths in ([9, 8, 8], [7, 5], [4, 4, 3, 3], [2])
    ]
    decode = DecodeConfig(beam_size=3, nbest=2, max_len_a=0.0, max_len_b=10)
    alone = [translate_ids(model, batch, decode) for batch in batches]
    assert model.training
    torch.set_num_threads(2)
    assert batch_workers("cpu", None, len(batches)) == 2
    seen_threads = []
    original = translate_ids

    def spy(*args, **kwargs):
        seen_threads.append(torch.get_num_threads())
        assert not model.training  # eval for the whole pool, not toggled per batch
        return original(*args, **kwargs)

    monkeypatch.setattr("seq2seq.decoding.translate_ids", spy)
    together = list(search_batches(model, batches, decode))
    assert seen_threads == [1] * len(batches)  # each search single-threaded
    assert torch.get_num_threads() == 2 and model.training  # both restored
    for ours, theirs in zip(together, alone, strict=True):
        assert [[(h.tokens, h.score) for h in n] for n in ours] == [
            [(h.tokens, h.score) for h in n] for n in theirs
        ]


def test_batch_workers_stay_at_one_where_order_or_devices_need_it():
    torch.set_num_threads(2)
    assert batch_workers("cpu", torch.Generator(), 5) == 1  # seeded sampling: one order of draws
    assert batch_workers("cpu", None, 1) == 1
    assert batch_workers("cuda", None, 5) == 1
    torch.set_num_threads(1)
    assert batch_workers("cpu", None, 5) == 1
