"""Attention maps: probabilities are softmax(QK^T/sqrt(d)) with the masks, asking for them changes
nothing, the axes carry the right pieces, and the CLI writes a PNG sized by the sentence."""

from __future__ import annotations

import math
import struct
from pathlib import Path

import pytest
import torch

from seq2seq import layers as layers_module
from seq2seq.attention import (
    CELL_INCHES,
    DPI,
    AttentionMaps,
    attention_maps,
    main,
    piece_labels,
    render_html,
)
from seq2seq.checkpoint import save_checkpoint
from seq2seq.config import DecodeConfig, ModelConfig, RunConfig, replace
from seq2seq.layers import AttentionRecord, MultiHeadAttention
from seq2seq.model import build_model
from seq2seq.tokenizer import BOS_ID, EOS_ID, PAD_ID, CharVocab, Tokenizer
from seq2seq.translate import translate_ids

CHARS = "abcdefgh .\n"
N_HEADS, N_LAYERS = 2, 2


def tiny(arch: str = "transformer", **changes) -> ModelConfig:
    settings = dict(
        arch=arch, d_model=16, n_heads=N_HEADS, d_ff=32, dropout=0.0, max_positions=48,
        n_encoder_layers=N_LAYERS if arch == "transformer" else 0, n_decoder_layers=N_LAYERS,
    )  # fmt: skip
    return ModelConfig(**{**settings, **changes})


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer("char", CharVocab(CHARS))


@pytest.fixture(scope="module")
def transformer(tokenizer):
    torch.manual_seed(0)
    model = build_model(tiny(norm_first=True), tokenizer.vocab_size, tokenizer.vocab_size)
    with torch.no_grad():  # sharper attention than the tiny init gives, so rows differ
        for module in model.modules():
            if isinstance(module, MultiHeadAttention):
                module.q_proj.weight.mul_(4.0)
    return model.eval()


@pytest.fixture(scope="module")
def gpt(tokenizer):
    torch.manual_seed(1)
    model = build_model(tiny("gpt", positions="learned"), tokenizer.vocab_size,
                        tokenizer.vocab_size)  # fmt: skip
    return model.eval()


def padded_batch(vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Sources of lengths 7 and 4 (+ padding), targets BOS + 5 and BOS + 3 (+ padding)."""
    g = torch.Generator().manual_seed(3)
    src = torch.randint(4, vocab, (2, 7), generator=g)
    src[1, 4:] = PAD_ID
    tgt_in = torch.randint(4, vocab, (2, 6), generator=g)
    tgt_in[:, 0] = BOS_ID
    tgt_in[1, 4:] = PAD_ID
    return src, tgt_in


def test_rows_sum_to_one_and_exactly_zero_on_padding_and_future(transformer, tokenizer):
    src, tgt_in = padded_batch(tokenizer.vocab_size)
    record = AttentionRecord()
    with torch.no_grad():
        transformer.decode(tgt_in, transformer.encode(src, record), record)
    assert len(record.encoder) == len(record.decoder) == len(record.cross) == N_LAYERS
    future = torch.ones(6, 6, dtype=torch.bool).triu(1)
    for encoder, decoder, cross in zip(record.encoder, record.decoder, record.cross):
        assert encoder.shape == (2, N_HEADS, 7, 7) and cross.shape == (2, N_HEADS, 6, 7)
        for probs in (encoder, decoder, cross):
            torch.testing.assert_close(probs.sum(-1), torch.ones(probs.shape[:-1]))
        assert (encoder[1, :, :, 4:] == 0).all() and (cross[1, :, :, 4:] == 0).all()
        assert (encoder[1, :, :, :4] > 0).all()  # and nothing else is masked
        assert (decoder[:, :, future] == 0).all() and (decoder[:, :, ~future] > 0).all()


def test_equal_to_softmax_recomputed_from_the_projections(transformer, tokenizer):
    """Q and K rebuilt in float64 from each q_proj/k_proj input and weight, heads split by
    reshape, masks built from the token ids."""
    src, tgt_in = padded_batch(tokenizer.vocab_size)
    inputs: dict[int, torch.Tensor] = {}

    def keep_input(module, args):
        inputs[id(module)] = args[0].detach()

    hooks = [
        module.register_forward_pre_hook(keep_input)
        for module in transformer.modules()
        if isinstance(module, torch.nn.Linear)
    ]
    record = AttentionRecord()
    try:
        with torch.no_grad():
            transformer.decode(tgt_in, transformer.encode(src, record), record)
    finally:
        for hook in hooks:
            hook.remove()

    def heads(linear: torch.nn.Linear) -> torch.Tensor:
        x = inputs[id(linear)].double()
        y = x @ linear.weight.double().T + linear.bias.double()
        b, n, m = y.shape
        return y.reshape(b, n, N_HEADS, m // N_HEADS).transpose(1, 2)

    real_src = (src != PAD_ID)[:, None, None, :]
    causal = torch.ones(6, 6, dtype=torch.bool).tril()
    attentions = [
        (layer.self_attention, real_src, record.encoder[i])
        for i, layer in enumerate(transformer.encoder_layers)
    ] + [
        (attention, mask, recorded[i])
        for i, layer in enumerate(transformer.decoder_layers)
        for attention, mask, recorded in (
            (layer.self_attention, causal, record.decoder),
            (layer.cross_attention, real_src, record.cross),
        )
    ]
    for attention, mask, recorded in attentions:
        q, k = heads(attention.q_proj), heads(attention.k_proj)
        scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
        expected = torch.softmax(scores.masked_fill(~mask, -math.inf), dim=-1)
        torch.testing.assert_close(recorded.double(), expected, atol=2e-6, rtol=1e-5)


def test_asking_for_maps_changes_no_output(transformer, gpt, tokenizer, monkeypatch):
    src, tgt_in = padded_batch(tokenizer.vocab_size)
    with torch.no_grad():
        plain = transformer.decode(tgt_in, transformer.encode(src))
        recorded = transformer.decode(tgt_in, transformer.encode(src, AttentionRecord()),
                                      AttentionRecord())  # fmt: skip
        assert torch.equal(plain, recorded)
        assert torch.equal(gpt(tgt_in), gpt(tgt_in, record=AttentionRecord()))
    source = "abc def gh."
    ids = tokenizer.encode_source(source) + [EOS_ID]
    decode = DecodeConfig(beam_size=3)
    before = translate_ids(transformer, [ids], decode)[0][0].tokens
    maps = attention_maps(transformer, tokenizer, source, decode=decode)
    assert translate_ids(transformer, [ids], decode)[0][0].tokens == before
    assert maps.queries["cross"] == piece_labels(tokenizer.target, before + [EOS_ID])  # beam output

    def refuse(*args):
        raise AssertionError("attention probabilities computed without being asked for")

    # The ordinary path (training, translation) never builds the explicit probabilities.
    monkeypatch.setattr(layers_module, "attention_probabilities", refuse)
    with torch.no_grad():
        transformer.decode(tgt_in, transformer.encode(src))
        gpt(tgt_in)
    translate_ids(transformer, [ids], decode)


def test_axes_carry_source_and_target_pieces(transformer, tokenizer):
    maps = attention_maps(transformer, tokenizer, "ab c", target="hg")
    source, inputs, emitted = (
        ["a", "b", "\u2581", "c", "</s>"],
        ["<s>", "h", "g"],
        ["h", "g", "</s>"],
    )
    assert maps.keys == {"encoder": source, "decoder": inputs, "cross": source}
    assert maps.queries == {"encoder": source, "decoder": inputs, "cross": emitted}
    shapes = {kind: tuple(w.shape) for kind, w in maps.weights.items()}
    assert shapes == {
        "encoder": (N_LAYERS, N_HEADS, 5, 5),
        "decoder": (N_LAYERS, N_HEADS, 3, 3),
        "cross": (N_LAYERS, N_HEADS, 3, 5),
    }


def test_gpt_maps_are_causal_over_the_prompt(gpt, tokenizer):
    maps = attention_maps(gpt, tokenizer, "ab\nc")
    assert list(maps.weights) == ["decoder"]
    assert maps.queries["decoder"] == maps.keys["decoder"] == ["a", "b", "\\n", "c"]
    weights = maps.weights["decoder"]
    assert weights.shape == (N_LAYERS, N_HEADS, 4, 4)
    torch.testing.assert_close(weights.sum(-1), torch.ones(N_LAYERS, N_HEADS, 4))
    future = torch.ones(4, 4, dtype=torch.bool).triu(1)
    assert (weights[..., future] == 0).all() and (weights[..., ~future] > 0).all()


def save(model, tokenizer, directory: Path) -> Path:
    arch = model.config.arch
    config = replace(
        RunConfig(model=model.config),
        data={"format": "lm" if arch != "transformer" else "text", "tokenizer": "char"},
    )
    return save_checkpoint(directory, model, config, tokenizer)


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def test_cli_png_sized_by_tokens_and_self_contained_html(transformer, tokenizer, tmp_path):
    pytest.importorskip("matplotlib")
    model_dir = save(transformer, tokenizer, tmp_path / "model")
    long_source = "abc defg h. " * 2 + "abcdef"  # 30 characters: 31 source tokens with </s>
    assert len(long_source) == 30
    sizes = {}
    for name, source in (("short", "abc defg h"), ("long", long_source)):
        png, page = tmp_path / f"{name}.png", tmp_path / f"{name}.html"
        argv = ["--model", str(model_dir), "--source", source, "--target", "abcdefgh", "--out",
                str(png), "--html", str(page)]  # fmt: skip
        assert main(argv) == 0
        sizes[name] = png_size(png)
        text = page.read_text(encoding="utf-8")
        assert text.count("<figure>") == 3 * N_LAYERS * N_HEADS
        assert "http" not in text and "src=" not in text and "<script" not in text
    cell = CELL_INCHES * DPI  # pixels per token: a 7 pt label is 9.7 px tall at this DPI
    (short_width, short_height), (long_width, long_height) = sizes["short"], sizes["long"]
    # Columns are heads, each as wide as the longest key axis: 20 more source tokens widen every
    # head's panel by 20 cells; rows (2 encoder layers) grow by 20 cells each.
    assert long_width - short_width == pytest.approx(N_HEADS * 20 * cell, abs=N_HEADS + 1)
    assert long_height - short_height == pytest.approx(N_LAYERS * 20 * cell, abs=N_LAYERS + 1)
    assert long_width < 4000 and long_height < 4000


def test_cli_beam_output_and_gpt_prompt(transformer, gpt, tokenizer, tmp_path, capsys):
    seq2seq_dir = save(transformer, tokenizer, tmp_path / "seq2seq")
    page = tmp_path / "beam.html"
    assert main(["--model", str(seq2seq_dir), "--source", "abc", "--beam", "2",
                 "--html", str(page)]) == 0  # fmt: skip
    assert "target (beam output)" in capsys.readouterr().err
    gpt_dir = save(gpt, tokenizer, tmp_path / "gpt")
    page = tmp_path / "gpt.html"
    assert main(["--model", str(gpt_dir), "--prompt", "ab c", "--html", str(page)]) == 0
    assert page.read_text(encoding="utf-8").count("<figure>") == N_LAYERS * N_HEADS


def test_cli_bad_input_is_one_line_and_exit_2(transformer, gpt, tokenizer, tmp_path, capsys):
    seq2seq_dir = save(transformer, tokenizer, tmp_path / "seq2seq")
    gpt_dir = save(gpt, tokenizer, tmp_path / "gpt")
    torch.manual_seed(0)
    bigram = build_model(ModelConfig(arch="bigram"), tokenizer.vocab_size, tokenizer.vocab_size)
    bigram_dir = save(bigram, tokenizer, tmp_path / "bigram")
    page = str(tmp_path / "x.html")
    cases = [
        (["--model", str(seq2seq_dir), "--source", "abc"], "nothing to write"),
        (["--model", str(seq2seq_dir), "--prompt", "abc", "--html", page], "--source"),
        (["--model", str(seq2seq_dir), "--source", "  ", "--html", page], "empty"),
        (["--model", str(gpt_dir), "--source", "abc", "--html", page], "--prompt"),
        (["--model", str(bigram_dir), "--prompt", "abc", "--html", page], "no attention"),
        (["--model", str(tmp_path / "missing"), "--source", "a", "--html", page], "missing"),
        (["--model", str(gpt_dir), "--prompt", "a", "--html", "/no/such/dir/x.html"], "folder"),
    ]
    for argv, needle in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and needle in err and "Traceback" not in err, err
    assert not Path(page).exists()


def test_html_escapes_pieces():
    weights = {"decoder": torch.full((1, 1, 2, 2), 0.5)}
    labels = ["<b>", "&"]
    text = render_html(AttentionMaps(weights, {"decoder": labels}, {"decoder": labels}))
    assert "&lt;b&gt;" in text and "&amp;" in text and "<b>" not in text
