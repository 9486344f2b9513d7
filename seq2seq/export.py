"""Export a trained encoder-decoder to Hugging Face ``transformers`` (``MarianMTModel``) or
CTranslate2.

    seq2seq export --model runs/m30k/avg --out exported/m30k-marian
    seq2seq export --model runs/m30k/avg --out exported/m30k-ct2 --format ctranslate2 \\
        --quantization int8

Marian is the same network as our post-norm Transformer: post-LN residual blocks (no
``layernorm_embedding``), embeddings scaled by sqrt(m) (``scale_embedding``), fixed sinusoids,
biased q/k/v/out projections, a two-layer FFN, and an output layer tied to the embedding. Two
differences need care:

  - Marian's sinusoid table is *not* interleaved: sines fill features ``0 .. m/2-1`` and cosines
    ``m/2 .. m-1``, where ours alternate sin/cos. ``save_pretrained`` does not even store the
    table (``from_pretrained`` recomputes it), so copying ours into it would not survive a reload.
    Instead the model width is permuted: feature ``k`` of the export is our feature ``perm[k]``
    with ``perm = [0, 2, 4, ..., 1, 3, 5, ...]``, under which our table *is* Marian's. Every
    layer is equivariant to a permutation of the model width once the weights are permuted with
    it (embedding columns, linear inputs/outputs that are m wide, LayerNorm gains and biases),
    and the logits ``x E^T`` are unchanged, so the exported model computes exactly our function.
  - Marian adds a ``final_logits_bias`` (our ``model.output_bias``, else zeros) and starts
    decoding from ``decoder_start_token_id`` (our BOS).

Only post-norm models with sinusoidal positions and LayerNorm eps 1e-5 (Marian's fixed value) can
be exported. ``transformers`` is an optional dependency (the ``bench`` extra), imported only here.

The CTranslate2 export (``--format ctranslate2``) is :mod:`seq2seq.export_ct2`.

Shape legend: m model width, v vocabulary.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from seq2seq.layers import sinusoidal_positions
from seq2seq.model import Transformer
from seq2seq.tokenizer import BOS_ID, EOS_ID, PAD_ID, UNK_ID, SentencePieceModel, Tokenizer

if TYPE_CHECKING:
    from transformers import MarianConfig, MarianMTModel

MARIAN_LAYER_NORM_EPS = 1e-5  # nn.LayerNorm's default, which Marian hard-codes


class ExportError(ValueError):
    """The model cannot be expressed in the target format, or an optional package is missing."""


def _import_transformers() -> Any:
    try:
        import transformers
    except ImportError as error:
        raise ExportError(
            "exporting needs the optional dependency 'transformers': pip install 'seq2seq[bench]'"
        ) from error
    return transformers


def marian_config(model: Transformer) -> MarianConfig:
    """The ``MarianConfig`` describing ``model``'s architecture.

    Raises:
        ExportError: the model is not expressible as Marian (GPT, pre-norm, learned positions,
            a LayerNorm eps other than 1e-5), or ``transformers`` is not installed.
    """
    if not isinstance(model, Transformer):
        raise ExportError(
            f"only an encoder-decoder Transformer exports to Marian, got {type(model).__name__}"
        )
    c = model.config
    if c.norm_first:
        raise ExportError(
            "model.norm_first=true (pre-norm) cannot be exported: Marian is post-norm only"
        )
    if c.positions != "sinusoidal":
        raise ExportError(
            f"model.positions={c.positions!r} cannot be exported: Marian uses fixed sinusoids"
        )
    if c.layer_norm_eps != MARIAN_LAYER_NORM_EPS:
        raise ExportError(
            f"model.layer_norm_eps={c.layer_norm_eps} cannot be exported: Marian's LayerNorm "
            f"eps is fixed at {MARIAN_LAYER_NORM_EPS}"
        )
    if c.d_model % 2:
        raise ExportError(f"model.d_model={c.d_model} must be even for sinusoidal positions")
    transformers = _import_transformers()
    return transformers.MarianConfig(
        vocab_size=model.source_embedding.weight.shape[0],
        decoder_vocab_size=model.target_embedding.weight.shape[0],
        share_encoder_decoder_embeddings=c.share_embeddings,
        tie_word_embeddings=c.tie_output,
        max_position_embeddings=c.max_positions,
        d_model=c.d_model,
        encoder_layers=c.n_encoder_layers,
        decoder_layers=c.n_decoder_layers,
        encoder_attention_heads=c.n_heads,
        decoder_attention_heads=c.n_heads,
        encoder_ffn_dim=c.d_ff,
        decoder_ffn_dim=c.d_ff,
        activation_function={"gelu_tanh": "gelu_pytorch_tanh"}.get(c.activation, c.activation),
        dropout=c.dropout,
        attention_dropout=c.attention_dropout,
        activation_dropout=c.activation_dropout,
        scale_embedding=c.scale_embedding,
        pad_token_id=PAD_ID,
        eos_token_id=EOS_ID,
        bos_token_id=BOS_ID,
        decoder_start_token_id=BOS_ID,
        forced_eos_token_id=EOS_ID,
    )


def width_permutation(d_model: int) -> Tensor:
    """``perm`` (m,) such that ``our_table[:, perm]`` is Marian's sin-half/cos-half table."""
    return torch.cat([torch.arange(0, d_model, 2), torch.arange(1, d_model, 2)])


def marian_state_dict(model: Transformer) -> dict[str, Tensor]:
    """Our weights under Marian's parameter names, with the model width permuted (module doc)."""
    c = model.config
    perm = width_permutation(c.d_model)
    ours = model.state_dict()
    if not c.bias:  # Marian always has biases: a bias-free model is the same network with zeros
        for name, module in model.named_modules():
            if isinstance(module, (nn.Linear, nn.LayerNorm)) and module.bias is None:
                ours[f"{name}.bias"] = torch.zeros(module.weight.shape[0])
    out: dict[str, Tensor] = {}

    def columns(name: str) -> Tensor:  # m-wide input (or embedding columns)
        return ours[name][:, perm]

    def rows(name: str) -> Tensor:  # m-wide output: weight rows, bias, LayerNorm gain/bias
        return ours[name][perm]

    def attention(src: str, dst: str) -> None:
        for proj in ("q_proj", "k_proj", "v_proj"):
            out[f"{dst}.{proj}.weight"] = columns(f"{src}.{proj}.weight")
            out[f"{dst}.{proj}.bias"] = ours[f"{src}.{proj}.bias"]
        out[f"{dst}.out_proj.weight"] = rows(f"{src}.out_proj.weight")
        out[f"{dst}.out_proj.bias"] = rows(f"{src}.out_proj.bias")

    def norm(src: str, dst: str) -> None:
        out[f"{dst}.weight"], out[f"{dst}.bias"] = rows(f"{src}.weight"), rows(f"{src}.bias")

    def feed_forward(src: str, dst: str) -> None:
        out[f"{dst}.fc1.weight"] = columns(f"{src}.linear_in.weight")
        out[f"{dst}.fc1.bias"] = ours[f"{src}.linear_in.bias"]
        out[f"{dst}.fc2.weight"] = rows(f"{src}.linear_out.weight")
        out[f"{dst}.fc2.bias"] = rows(f"{src}.linear_out.bias")

    target = columns("target_embedding.weight")
    source = target if c.share_embeddings else columns("source_embedding.weight")
    if c.share_embeddings:
        out["model.shared.weight"] = target
    out["model.encoder.embed_tokens.weight"] = source
    out["model.decoder.embed_tokens.weight"] = target
    out["lm_head.weight"] = target if c.tie_output else columns("output_projection.weight")
    positions = sinusoidal_positions(c.max_positions, c.d_model)[:, perm]
    out["model.encoder.embed_positions.weight"] = positions
    out["model.decoder.embed_positions.weight"] = positions
    bias = ours["output_bias.bias"] if c.output_bias else torch.zeros(target.shape[0])
    out["final_logits_bias"] = bias[None]
    for i in range(c.n_encoder_layers):
        src, dst = f"encoder_layers.{i}", f"model.encoder.layers.{i}"
        attention(f"{src}.self_attention", f"{dst}.self_attn")
        norm(f"{src}.self_attention_block.norm", f"{dst}.self_attn_layer_norm")
        feed_forward(f"{src}.feed_forward", dst)
        norm(f"{src}.feed_forward_block.norm", f"{dst}.final_layer_norm")
    for i in range(c.n_decoder_layers):
        src, dst = f"decoder_layers.{i}", f"model.decoder.layers.{i}"
        attention(f"{src}.self_attention", f"{dst}.self_attn")
        norm(f"{src}.self_attention_block.norm", f"{dst}.self_attn_layer_norm")
        attention(f"{src}.cross_attention", f"{dst}.encoder_attn")
        norm(f"{src}.cross_attention_block.norm", f"{dst}.encoder_attn_layer_norm")
        feed_forward(f"{src}.feed_forward", dst)
        norm(f"{src}.feed_forward_block.norm", f"{dst}.final_layer_norm")
    return out


def to_marian(model: Transformer, tokenizer: Tokenizer | None = None) -> MarianMTModel:
    """A ``MarianMTModel`` computing the same logits as ``model`` (float32, eval mode, on CPU).

    Args:
        model: a post-norm encoder-decoder :class:`~seq2seq.model.Transformer`.
        tokenizer: if given, its vocabulary sizes are checked against the model's.

    Raises:
        ExportError: see :func:`marian_config`; or the tokenizer does not fit the model.
    """
    config = marian_config(model)
    if tokenizer is not None and (
        tokenizer.src_vocab_size != config.vocab_size
        or tokenizer.tgt_vocab_size != config.decoder_vocab_size
    ):
        raise ExportError(
            f"tokenizer vocabularies ({tokenizer.src_vocab_size}, {tokenizer.tgt_vocab_size}) do "
            f"not match the model's ({config.vocab_size}, {config.decoder_vocab_size})"
        )
    transformers = _import_transformers()
    marian = transformers.MarianMTModel(config)
    weights = marian_state_dict(model)
    expected = marian.state_dict()
    missing = sorted(set(expected) - set(weights))
    unexpected = sorted(set(weights) - set(expected))
    if missing or unexpected:  # an internal invariant: the name map must cover Marian exactly
        raise AssertionError(f"Marian name map is off: missing {missing}, unexpected {unexpected}")
    with torch.no_grad():
        for name, tensor in expected.items():
            if tensor.shape != weights[name].shape:
                raise AssertionError(
                    f"{name}: shape {tuple(weights[name].shape)} for {tuple(tensor.shape)}"
                )
            tensor.copy_(weights[name].detach().to(torch.float32))
    return marian.eval()


def save_marian(model: Transformer, tokenizer: Tokenizer, out_dir: str | Path) -> Path:
    """Write ``to_marian(model)`` with ``save_pretrained`` (safetensors) plus the tokenizer.

    ``out_dir`` must not exist: everything is written into a temporary directory beside it,
    renamed to ``out_dir`` only when complete, so an existing directory is never overwritten
    and a failed export leaves nothing behind.

    The directory gets ``config.json``, ``generation_config.json``, ``model.safetensors``, our
    ``tokenizer/`` (``Tokenizer.load`` reads it) and, for SentencePiece vocabularies, the files
    ``MarianTokenizer`` reads (``source.spm``, ``target.spm``, ``vocab.json`` or
    ``target_vocab.json``, ``tokenizer_config.json``), plus ``TOKENIZER.md`` on how to use them.

    Raises:
        ExportError: see :func:`to_marian`; or ``out_dir`` exists.
    """
    from seq2seq.directory import CheckpointError, write_directory

    marian = to_marian(model, tokenizer)
    try:
        return write_directory(
            Path(out_dir), lambda tmp: _save_marian_files(marian, tokenizer, tmp), replace=False
        )
    except CheckpointError as error:
        raise ExportError(str(error)) from error


def _save_marian_files(marian: MarianMTModel, tokenizer: Tokenizer, out: Path) -> None:
    marian.save_pretrained(out, safe_serialization=True)
    tokenizer.save(out / "tokenizer")
    note = [
        "# Tokenizer",
        "",
        "`tokenizer/` is the seq2seq tokenizer: `seq2seq.tokenizer.Tokenizer.load(dir / 'tokenizer')`.",
        f"Special ids: pad {PAD_ID}, unk {UNK_ID}, bos {BOS_ID} (decoder start), eos {EOS_ID}.",
        "Sources are encoded as pieces + [eos]; decoding starts from bos and stops at eos.",
    ]
    if isinstance(tokenizer.source, SentencePieceModel) and isinstance(
        tokenizer.target, SentencePieceModel
    ):
        _write_marian_tokenizer_files(tokenizer, out)
        note += [
            "",
            "`source.spm`/`target.spm` are copies of the SentencePiece models and `vocab.json`",
            "maps every piece to its id, so `transformers.MarianTokenizer.from_pretrained(dir)`",
            "gives the same ids (pieces + `</s>`).",
        ]
    else:
        note += ["", "Character vocabularies have no MarianTokenizer equivalent."]
    (out / "TOKENIZER.md").write_text("\n".join(note) + "\n", encoding="utf-8")


def _write_marian_tokenizer_files(tokenizer: Tokenizer, out: Path) -> None:
    def vocab(model: SentencePieceModel) -> dict[str, int]:
        processor = model.processor
        return {processor.id_to_piece(i): i for i in range(processor.get_piece_size())}

    (out / "source.spm").write_bytes(tokenizer.source.model_proto)
    (out / "target.spm").write_bytes(tokenizer.target.model_proto)
    (out / "vocab.json").write_text(json.dumps(vocab(tokenizer.source), ensure_ascii=False))
    settings: dict[str, Any] = {
        "tokenizer_class": "MarianTokenizer",
        "separate_vocabs": not tokenizer.is_joint,
        "model_max_length": 1024,
    }
    if not tokenizer.is_joint:
        (out / "target_vocab.json").write_text(
            json.dumps(vocab(tokenizer.target), ensure_ascii=False)
        )
    pieces = tokenizer.source.processor
    settings.update(
        eos_token=pieces.id_to_piece(EOS_ID),
        unk_token=pieces.id_to_piece(UNK_ID),
        pad_token=pieces.id_to_piece(PAD_ID),
    )
    (out / "tokenizer_config.json").write_text(json.dumps(settings, indent=1))


def main(argv: list[str] | None = None) -> int:
    """``seq2seq export --model DIR --out DIR [--format marian|ctranslate2] [--quantization Q]``."""
    # The CTranslate2 export builds on to_marian, so it sits above this module; one command serves
    # both formats.
    from seq2seq.export_ct2 import CT2_QUANTIZATIONS, save_ctranslate2

    parser = argparse.ArgumentParser(
        prog="seq2seq export",
        description="Export a model directory to Hugging Face transformers (MarianMTModel) "
        "or to CTranslate2.",
    )
    parser.add_argument("--model", required=True, help="model directory (model.safetensors, ...)")
    parser.add_argument(
        "--out",
        required=True,
        help="directory to create; it must not exist and must lie outside --model",
    )
    parser.add_argument(
        "--format", default="marian", choices=["marian", "ctranslate2"], help="target format"
    )
    parser.add_argument(
        "--quantization",
        choices=CT2_QUANTIZATIONS,
        help="CTranslate2 weight type (default float32); only with --format ctranslate2",
    )
    args = parser.parse_args(argv)
    if args.quantization is not None and args.format != "ctranslate2":
        parser.error("--quantization applies only to --format ctranslate2")
    from seq2seq.checkpoint import CheckpointError, check_new_output, load_model

    try:
        check_new_output(args.out, [args.model], "--out")
        model, tokenizer, _ = load_model(args.model)
        if args.format == "ctranslate2":
            quantization = args.quantization or "float32"
            out = save_ctranslate2(model, tokenizer, args.out, quantization)
            kind = f"CTranslate2, {quantization}"
        else:
            out = save_marian(model, tokenizer, args.out)
            kind = "MarianMTModel, safetensors"
    except (CheckpointError, ExportError) as error:
        print(f"seq2seq export: error: {error}", file=sys.stderr)
        return 2
    print(f"export: {args.model} -> {out} ({kind})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
