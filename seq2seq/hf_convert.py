"""A Hugging Face Marian or GPT-2 model as ours: the same function, in our names and id order.

:func:`import_marian` and :func:`import_gpt2` read a local ``save_pretrained`` directory and give
our model, tokenizer and run config (``seq2seq.hf_import`` writes them as a model directory),
computing the same function as the Hugging Face model:

  - **Vocabulary.** Our special ids are fixed (PAD 0, UNK 1, BOS 2, EOS 3) where Hugging Face's
    are wherever its vocabulary put them, so the vocabulary is permuted: our id ``i`` is the
    Hugging Face id ``hf_ids[i]`` (embedding rows, output rows and logits bias permuted alike).
    BOS, what our search feeds first, is the model's decoder start token (Marian: ``<pad>``;
    GPT-2: ``<|endoftext|>``); EOS and UNK are its own. A special id the model has no token for
    (Marian's PAD, whose token is the decoder start; GPT-2's PAD, UNK and EOS) becomes an added
    row: a zero embedding and a fixed logits bias of -1e4, so that its probability underflows to
    exactly 0 in float32 and every other log-probability is the Hugging Face one. The tokenizer
    (kind ``spm_vocab`` or ``byte_bpe``, see :mod:`seq2seq.hf_tokenizer`) maps text to the same ids.
  - **Marian** is our post-norm Transformer (``seq2seq.export`` explains the correspondence);
    its sinusoids fill the first half of the features with sines and the second with cosines
    where ours interleave them, so the model width is permuted by the inverse of ``export``'s
    permutation, under which every layer computes the same function. ``final_logits_bias`` is
    our ``model.output_bias``, ``scale_embedding`` our ``model.scale_embedding``, ``swish`` our
    ``silu``.
  - **GPT-2** is our pre-norm GPT with learned positions, a final LayerNorm, unscaled
    embeddings and ``gelu_tanh`` (its ``gelu_new``); its fused ``c_attn`` (a ``Conv1D``, weights
    stored (in, out)) is split into transposed q/k/v projections.

``transformers`` (the ``hf`` or ``bench`` extra) is imported only here; a GPT-2 tokenizer needs
``tokenizers`` to be loaded later too. Shape legend: m model width, v vocabulary.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from seq2seq.config import (
    BatchConfig,
    DataConfig,
    DecodeConfig,
    ModelConfig,
    RunConfig,
    TrainConfig,
)
from seq2seq.export import MARIAN_LAYER_NORM_EPS, width_permutation
from seq2seq.hf_tokenizer import ByteLevelBPE, PieceVocab
from seq2seq.model import GPT, Transformer
from seq2seq.tokenizer import BOS_ID, EOS_ID, PAD_ID, UNK_ID, Tokenizer, TokenizerError

ABSENT_LOGIT = -1e4  # logits bias of an added row: exp(-1e4) is 0 in float32 and bfloat16
_ACTIVATIONS = {  # Hugging Face activation_function -> model.activation
    "relu": "relu",
    "gelu": "gelu",
    "gelu_new": "gelu_tanh",
    "gelu_pytorch_tanh": "gelu_tanh",
    "swish": "silu",
    "silu": "silu",
}


class HFImportError(ValueError):
    """The directory is not a model we can import; the message names the file or setting."""


def _transformers() -> Any:
    try:
        import transformers
    except ImportError:
        raise HFImportError(
            "importing needs the optional dependency 'transformers': pip install 'seq2seq[hf]'"
        ) from None
    return transformers


def _read_json(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise HFImportError(f"{path}: file missing") from None
    except (OSError, UnicodeDecodeError, ValueError) as error:
        raise HFImportError(f"{path}: cannot read JSON: {error}") from None
    if not isinstance(value, dict):
        raise HFImportError(f"{path}: expected a JSON object")
    return value


def _load_hf_model(directory: Path, class_name: str, model_type: str) -> Any:
    config = _read_json(directory / "config.json")
    if config.get("model_type") != model_type:
        raise HFImportError(
            f"{directory / 'config.json'}: model_type is {config.get('model_type')!r}, "
            f"not {model_type!r}"
        )
    model_class = getattr(_transformers(), class_name)
    try:
        return model_class.from_pretrained(str(directory), local_files_only=True).float().eval()
    except (OSError, ValueError, RuntimeError) as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise HFImportError(f"{directory}: cannot load {class_name}: {first}") from None


def _activation(name: str, where: str) -> str:
    if name not in _ACTIVATIONS:
        raise HFImportError(f"{where}: activation {name!r} is not one of {sorted(_ACTIVATIONS)}")
    return _ACTIVATIONS[name]


def id_order(n_rows: int, specials: dict[int, int | None]) -> list[int]:
    """Our id order as Hugging Face ids: ``specials`` (our special id -> its id, None for an
    added row, -1 here) first, then every other of its ``n_rows`` ids in its order."""
    taken = {hf for hf in specials.values() if hf is not None}
    rest = [i for i in range(n_rows) if i not in taken]
    head = [specials[i] for i in sorted(specials)]
    return [-1 if hf is None else hf for hf in head] + rest


def permute_rows(weight: Tensor, hf_ids: list[int], fill: float = 0.0) -> Tensor:
    """``weight`` (v_hf, ...) -> (len(hf_ids), ...): row i is ``weight[hf_ids[i]]``, or ``fill``
    where ``hf_ids[i]`` is -1 (an added row)."""
    index = torch.tensor(hf_ids)
    out = weight[index.clamp(min=0)].clone()
    out[index < 0] = fill
    return out


# ----------------------------------------------------------------------------- Marian


def _marian_vocab(path: Path, n_rows: int) -> list[str]:
    """Hugging Face id -> piece ("" for a row the file names no piece for)."""
    vocab = _read_json(path)
    pieces = [""] * n_rows
    for piece, index in vocab.items():
        if not isinstance(index, int) or not 0 <= index < n_rows:
            raise HFImportError(f"{path}: {piece!r} has id {index!r}, outside 0..{n_rows - 1}")
        pieces[index] = piece
    return pieces


def _marian_side(
    pieces: list[str], names: dict[str, str], start_piece: str, where: Path
) -> list[int]:
    """Our id order for one Marian vocabulary (module doc): BOS is the decoder start token."""
    index = {piece: i for i, piece in enumerate(pieces) if piece}
    for role in ("unk", "eos"):
        if names[role] not in index:
            raise HFImportError(f"{where}: no {role} token {names[role]!r} in the vocabulary")
    start = index.get(start_piece)
    pad = index.get(names["pad"])
    return id_order(
        len(pieces),
        {
            PAD_ID: None if pad == start else pad,
            UNK_ID: index[names["unk"]],
            BOS_ID: start,
            EOS_ID: index[names["eos"]],
        },
    )


def import_marian(directory: str | Path) -> tuple[Transformer, Tokenizer, RunConfig]:
    """Our Transformer, tokenizer and run config for a ``MarianMTModel`` directory.

    Raises:
        HFImportError: a file is missing or malformed, or the model is not expressible.
    """
    directory = Path(directory)
    hf = _load_hf_model(directory, "MarianMTModel", "marian")
    c = hf.config
    where = directory / "config.json"
    if c.d_model % 2:
        raise HFImportError(f"{where}: d_model={c.d_model} must be even for sinusoids")
    if (
        c.encoder_attention_heads != c.decoder_attention_heads
        or c.encoder_ffn_dim != c.decoder_ffn_dim
    ):
        raise HFImportError(f"{where}: encoder and decoder must have the same heads and ffn_dim")
    settings = _read_json(directory / "tokenizer_config.json")
    names = {
        role: str(settings.get(f"{role}_token") or default)
        for role, default in (("unk", "<unk>"), ("eos", "</s>"), ("pad", "<pad>"))
    }
    src_rows = hf.model.encoder.embed_tokens.weight.shape[0]
    tgt_rows = hf.model.decoder.embed_tokens.weight.shape[0]
    separate = bool(settings.get("separate_vocabs", False))
    src_pieces = _marian_vocab(directory / "vocab.json", src_rows)
    tgt_pieces = src_pieces
    if separate:
        tgt_pieces = _marian_vocab(directory / "target_vocab.json", tgt_rows)
    elif src_rows != tgt_rows:
        raise HFImportError(f"{where}: one vocab.json for {src_rows} and {tgt_rows} rows")
    start = c.decoder_start_token_id
    if not isinstance(start, int) or not 0 <= start < tgt_rows or not tgt_pieces[start]:
        raise HFImportError(f"{where}: decoder_start_token_id {start!r} has no piece")
    eos = c.eos_token_id
    eos_piece = tgt_pieces[eos] if isinstance(eos, int) and 0 <= eos < tgt_rows else None
    if eos_piece != names["eos"]:
        raise HFImportError(
            f"{where}: eos_token_id {c.eos_token_id} is {eos_piece!r}, the tokenizer's eos is "
            f"{names['eos']!r}"
        )
    tgt_ids = _marian_side(tgt_pieces, names, tgt_pieces[start], directory / "vocab.json")
    src_ids = tgt_ids
    if separate:
        src_ids = _marian_side(src_pieces, names, tgt_pieces[start], directory / "vocab.json")
    shared = not separate and c.share_encoder_decoder_embeddings
    model_config = ModelConfig(
        arch="transformer",
        d_model=c.d_model,
        n_heads=c.encoder_attention_heads,
        d_ff=c.encoder_ffn_dim,
        n_encoder_layers=c.encoder_layers,
        n_decoder_layers=c.decoder_layers,
        dropout=c.dropout,
        attention_dropout=c.attention_dropout,
        activation_dropout=c.activation_dropout,
        activation=_activation(c.activation_function, str(where)),
        norm_first=False,
        positions="sinusoidal",
        max_positions=c.max_position_embeddings,
        share_embeddings=shared,
        tie_output=bool(c.tie_word_embeddings),
        layer_norm_eps=MARIAN_LAYER_NORM_EPS,
        scale_embedding=bool(c.scale_embedding),
        output_bias=True,
    )
    model = Transformer(model_config, len(src_ids), len(tgt_ids))
    model.load_state_dict(_marian_weights(hf, model_config, src_ids, tgt_ids), strict=True)

    def spm_bytes(name: str) -> bytes:
        try:
            return (directory / name).read_bytes()
        except OSError as error:
            raise HFImportError(f"{directory / name}: cannot read: {error.strerror}") from None

    source_proto, target_proto = spm_bytes("source.spm"), spm_bytes("target.spm")
    try:
        source = PieceVocab(source_proto, [src_pieces[i] if i >= 0 else "" for i in src_ids])
        target = source
        if separate or target_proto != source_proto:
            target = PieceVocab(target_proto, [tgt_pieces[i] if i >= 0 else "" for i in tgt_ids])
    except RuntimeError as error:
        raise HFImportError(f"{directory}: source.spm/target.spm: {error}") from None
    tokenizer = Tokenizer("spm_vocab", source, None if target is source else target)
    limit = min(256, c.max_position_embeddings)
    config = RunConfig(
        model=model_config,
        data=DataConfig(
            src_lang=str(settings.get("source_lang") or "de"),
            tgt_lang=str(settings.get("target_lang") or "en"),
            tokenizer="unigram",
            vocab_size=len(tgt_ids),
            joint_vocab=not separate,
            max_source_len=limit,
            max_target_len=limit,
        ),
        decode=_decode_config(hf),
    )
    config.validate()
    return model.eval(), tokenizer, config


def _marian_weights(
    hf: Any, config: ModelConfig, src_ids: list[int], tgt_ids: list[int]
) -> dict[str, Tensor]:
    """Marian's weights under our names: vocabulary rows in our order, width un-permuted."""
    theirs = hf.state_dict()
    # export.py writes our feature perm[k] as Marian's feature k; this reads it back.
    inverse = torch.argsort(width_permutation(config.d_model))
    out: dict[str, Tensor] = {}

    def columns(name: str) -> Tensor:  # m-wide input
        return theirs[name][:, inverse]

    def rows(name: str) -> Tensor:  # m-wide output: weight rows, bias, LayerNorm gain/bias
        return theirs[name][inverse]

    def attention(src: str, dst: str) -> None:
        for proj in ("q_proj", "k_proj", "v_proj"):
            out[f"{dst}.{proj}.weight"] = columns(f"{src}.{proj}.weight")
            out[f"{dst}.{proj}.bias"] = theirs[f"{src}.{proj}.bias"]
        out[f"{dst}.out_proj.weight"] = rows(f"{src}.out_proj.weight")
        out[f"{dst}.out_proj.bias"] = rows(f"{src}.out_proj.bias")

    def norm(src: str, dst: str) -> None:
        out[f"{dst}.weight"], out[f"{dst}.bias"] = rows(f"{src}.weight"), rows(f"{src}.bias")

    def feed_forward(src: str, dst: str) -> None:
        out[f"{dst}.linear_in.weight"] = columns(f"{src}.fc1.weight")
        out[f"{dst}.linear_in.bias"] = theirs[f"{src}.fc1.bias"]
        out[f"{dst}.linear_out.weight"] = rows(f"{src}.fc2.weight")
        out[f"{dst}.linear_out.bias"] = rows(f"{src}.fc2.bias")

    def embedding(name: str, hf_ids: list[int]) -> Tensor:
        return permute_rows(columns(name), hf_ids)

    out["target_embedding.weight"] = embedding("model.decoder.embed_tokens.weight", tgt_ids)
    out["source_embedding.weight"] = out["target_embedding.weight"]  # one matrix when shared
    if not config.share_embeddings:
        out["source_embedding.weight"] = embedding("model.encoder.embed_tokens.weight", src_ids)
    if not config.tie_output:
        out["output_projection.weight"] = embedding("lm_head.weight", tgt_ids)
    bias = theirs["final_logits_bias"].reshape(-1)
    out["output_bias.bias"] = permute_rows(bias, tgt_ids, fill=ABSENT_LOGIT)
    for i in range(config.n_encoder_layers):
        src, dst = f"model.encoder.layers.{i}", f"encoder_layers.{i}"
        attention(f"{src}.self_attn", f"{dst}.self_attention")
        norm(f"{src}.self_attn_layer_norm", f"{dst}.self_attention_block.norm")
        feed_forward(src, f"{dst}.feed_forward")
        norm(f"{src}.final_layer_norm", f"{dst}.feed_forward_block.norm")
    for i in range(config.n_decoder_layers):
        src, dst = f"model.decoder.layers.{i}", f"decoder_layers.{i}"
        attention(f"{src}.self_attn", f"{dst}.self_attention")
        norm(f"{src}.self_attn_layer_norm", f"{dst}.self_attention_block.norm")
        attention(f"{src}.encoder_attn", f"{dst}.cross_attention")
        norm(f"{src}.encoder_attn_layer_norm", f"{dst}.cross_attention_block.norm")
        feed_forward(src, f"{dst}.feed_forward")
        norm(f"{src}.final_layer_norm", f"{dst}.feed_forward_block.norm")
    return {name: tensor.detach().contiguous() for name, tensor in out.items()}


def _decode_config(hf: Any) -> DecodeConfig:
    """Our decode defaults, with the beam size the model's generation config asks for."""
    generation = getattr(hf, "generation_config", None)
    beams = getattr(generation, "num_beams", None)
    if isinstance(beams, int) and beams > 1:
        return DecodeConfig(beam_size=beams)
    return DecodeConfig()


# ----------------------------------------------------------------------------- GPT-2


def import_gpt2(directory: str | Path) -> tuple[GPT, Tokenizer, RunConfig]:
    """Our GPT, tokenizer and run config for a ``GPT2LMHeadModel`` directory.

    Raises:
        HFImportError: a file is missing or malformed, or the model is not expressible.
    """
    directory = Path(directory)
    hf = _load_hf_model(directory, "GPT2LMHeadModel", "gpt2")
    c = hf.config
    where = directory / "config.json"
    for name in ("scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn"):
        if getattr(c, name, False):
            raise HFImportError(f"{where}: {name}=true is not supported")
    if not getattr(c, "scale_attn_weights", True):
        raise HFImportError(f"{where}: scale_attn_weights=false is not supported")
    try:
        fast = _transformers().AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
        definition = fast.backend_tokenizer.to_str()
    except (OSError, ValueError, AttributeError, TypeError) as error:
        raise HFImportError(f"{directory}: cannot load the GPT-2 tokenizer: {error}") from None
    rows = hf.transformer.wte.weight.shape[0]
    start = c.bos_token_id if c.bos_token_id is not None else c.eos_token_id
    if not isinstance(start, int) or not 0 <= start < rows:
        raise HFImportError(f"{where}: bos_token_id/eos_token_id {start!r} is not a vocabulary id")
    hf_ids = id_order(rows, {PAD_ID: None, UNK_ID: None, BOS_ID: start, EOS_ID: None})
    model_config = ModelConfig(
        arch="gpt",
        d_model=c.n_embd,
        n_heads=c.n_head,
        d_ff=c.n_inner or 4 * c.n_embd,
        n_encoder_layers=0,
        n_decoder_layers=c.n_layer,
        dropout=c.resid_pdrop,
        attention_dropout=c.attn_pdrop,
        activation=_activation(c.activation_function, str(where)),
        norm_first=True,
        positions="learned",
        max_positions=c.n_positions,
        tie_output=bool(c.tie_word_embeddings),
        layer_norm_eps=c.layer_norm_epsilon,
        scale_embedding=False,
        output_bias=True,
    )
    model = GPT(model_config, len(hf_ids))
    model.load_state_dict(_gpt2_weights(hf, model_config, hf_ids), strict=True)
    try:
        tokenizer = Tokenizer("byte_bpe", ByteLevelBPE(definition, hf_ids))
    except TokenizerError as error:
        raise HFImportError(f"{directory}: {error}") from None
    config = RunConfig(
        model=model_config,
        data=DataConfig(format="lm", tokenizer="bpe", vocab_size=len(hf_ids)),
        batch=BatchConfig(block_size=min(256, c.n_positions)),
        train=TrainConfig(eval_every=1000),
    )
    config.validate()
    return model.eval(), tokenizer, config


def _gpt2_weights(hf: Any, config: ModelConfig, hf_ids: list[int]) -> dict[str, Tensor]:
    theirs = hf.state_dict()
    m = config.d_model
    out: dict[str, Tensor] = {
        "token_embedding.weight": permute_rows(theirs["transformer.wte.weight"], hf_ids),
        "positions.table": theirs["transformer.wpe.weight"],
        "final_norm.weight": theirs["transformer.ln_f.weight"],
        "final_norm.bias": theirs["transformer.ln_f.bias"],
        "output_bias.bias": permute_rows(torch.zeros(len(hf_ids)), hf_ids, fill=ABSENT_LOGIT),
    }
    if not config.tie_output:
        out["output_projection.weight"] = permute_rows(theirs["lm_head.weight"], hf_ids)

    def linear(src: str, dst: str) -> None:  # Conv1D keeps (in, out); nn.Linear (out, in)
        out[f"{dst}.weight"] = theirs[f"{src}.weight"].t()
        out[f"{dst}.bias"] = theirs[f"{src}.bias"]

    def norm(src: str, dst: str) -> None:
        out[f"{dst}.weight"], out[f"{dst}.bias"] = theirs[f"{src}.weight"], theirs[f"{src}.bias"]

    for i in range(config.n_decoder_layers):
        src, dst = f"transformer.h.{i}", f"layers.{i}"
        fused_weight = theirs[f"{src}.attn.c_attn.weight"]  # (m, 3m): q, k, v side by side
        fused_bias = theirs[f"{src}.attn.c_attn.bias"]
        for k, proj in enumerate(("q_proj", "k_proj", "v_proj")):
            part = slice(k * m, (k + 1) * m)
            out[f"{dst}.self_attention.{proj}.weight"] = fused_weight[:, part].t()
            out[f"{dst}.self_attention.{proj}.bias"] = fused_bias[part]
        linear(f"{src}.attn.c_proj", f"{dst}.self_attention.out_proj")
        norm(f"{src}.ln_1", f"{dst}.self_attention_block.norm")
        linear(f"{src}.mlp.c_fc", f"{dst}.feed_forward.linear_in")
        linear(f"{src}.mlp.c_proj", f"{dst}.feed_forward.linear_out")
        norm(f"{src}.ln_2", f"{dst}.feed_forward_block.norm")
    return {name: tensor.detach().contiguous() for name, tensor in out.items()}
