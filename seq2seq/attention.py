"""Attention maps: every layer's and head's attention probabilities for one input, as tensors,
a PNG (matplotlib, the optional ``plot`` extra) or a self-contained HTML page.

    seq2seq attention --model DIR --source "Ein Hund läuft." [--target "A dog runs."]
                      [--out attention.png] [--html attention.html] [--beam 4]
    seq2seq attention --model GPT_DIR --prompt "ROMEO:" --out attention.png

Encoder-decoder models give three kinds of map, each (layers, heads, queries, keys):

  - ``encoder``: source self-attention; both axes are the source pieces plus ``</s>``;
  - ``decoder``: target self-attention (causal); both axes are the decoder's input pieces
    (``<s>`` plus the target pieces): row i is the position holding piece i;
  - ``cross``: the decoder's attention over the source; keys are the source pieces, queries are
    labelled with the piece each decoder position *emits* (the target pieces plus ``</s>``),
    so that a row reads as "what the model looked at when it wrote this piece".

Without ``--target`` the target is the model's own beam-search output (the checkpoint's decode
settings, ``--beam`` to change the width). A GPT model gives the ``decoder`` kind only: causal
self-attention over the prompt's pieces (its last ``max_positions`` pieces if longer).

The probabilities are softmax(Q K^T / sqrt(d)) recomputed beside the model's fused attention
(:func:`seq2seq.layers.attention_probabilities`), so asking for them changes no output.
"""

from __future__ import annotations

import argparse
import html
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from seq2seq.checkpoint import CheckpointError, load_for_inference
from seq2seq.config import ConfigError, DecodeConfig
from seq2seq.hf_tokenizer import ByteLevelBPE, PieceVocab
from seq2seq.layers import AttentionRecord
from seq2seq.model import GPT, Transformer
from seq2seq.tokenizer import BOS_ID, EOS_ID, N_SPECIAL, PAD_ID, UNK_ID, CharVocab, Tokenizer

SPECIAL_LABELS = {PAD_ID: "<pad>", UNK_ID: "<unk>", BOS_ID: "<s>", EOS_ID: "</s>"}
# Characters that would be invisible (or break a line) as an axis label.
VISIBLE_CHARS = {" ": "\u2581", "\n": "\\n", "\t": "\\t", "\r": "\\r"}
TITLES = {
    "encoder": "encoder self-attention",
    "decoder": "decoder self-attention",
    "cross": "cross-attention",
}
AXES = {  # kind -> (query axis, key axis), for an encoder-decoder model
    "encoder": ("source", "source"),
    "decoder": ("target (input)", "target (input)"),
    "cross": ("target (emitted)", "source"),
}
CELL_INCHES = 0.18  # one token's row/column: fits a 7 pt label with room to spare
FONT_POINTS = 7
DPI = 100


class AttentionError(ValueError):
    """Unusable input or settings for an attention map."""


@dataclass(frozen=True)
class AttentionMaps:
    """Attention probabilities of one input, with the labels of their axes.

    Attributes:
        weights: kind (``encoder``, ``decoder``, ``cross``; a GPT has ``decoder`` only) ->
            float32 tensor (layers, heads, queries, keys) on the CPU; each row sums to 1.
        queries: kind -> one label (a subword piece) per query.
        keys: kind -> one label per key.
    """

    weights: dict[str, Tensor]
    queries: dict[str, list[str]]
    keys: dict[str, list[str]]


def piece_labels(side: object, ids: list[int]) -> list[str]:
    """The subword piece of each id (SentencePiece's ``▁`` marks a word start; a character
    vocabulary shows a space as ``▁`` and a newline as ``\\n``); specials as ``<s>`` etc."""
    labels = []
    for i in ids:
        if i in SPECIAL_LABELS:
            labels.append(SPECIAL_LABELS[i])
        elif isinstance(side, CharVocab):
            char = side.chars[i - N_SPECIAL] if i - N_SPECIAL < len(side.chars) else "<unk>"
            labels.append(VISIBLE_CHARS.get(char, char))
        elif isinstance(side, PieceVocab):  # an imported Marian vocabulary: its own piece table
            labels.append((side.pieces[i] if i < len(side.pieces) else "") or "<unk>")
        elif isinstance(side, ByteLevelBPE):  # imported GPT-2: the BPE's token of the mapped id
            hf_id = side.hf_ids[i] if i < len(side.hf_ids) else -1
            labels.append(side.bpe.id_to_token(hf_id) if hf_id >= 0 else "<unk>")
        else:
            labels.append(side.processor.id_to_piece(i))
    return labels


@torch.inference_mode()
def attention_maps(
    model: Transformer | GPT,
    tokenizer: Tokenizer,
    source: str,
    target: str | None = None,
    decode: DecodeConfig | None = None,
    device: str | torch.device = "cpu",
) -> AttentionMaps:
    """Every layer's and head's attention for one input, in eval mode (no dropout).

    Args:
        model: an encoder-decoder ``Transformer`` or a ``GPT``.
        tokenizer: the model's tokenizer.
        source: the source sentence; for a GPT, the prompt.
        target: the target sentence to teacher-force; None = the model's beam-search output
            (Transformer only; a GPT has no target).
        decode: search settings for the beam output (default ``DecodeConfig()``).
        device: where the model's parameters are.

    Returns:
        The maps and their axis labels; see the module docstring for the axes of each kind.

    Raises:
        AttentionError: an empty source or prompt, a target for a GPT, or a model without
            attention.
    """
    from seq2seq.translate import translate_ids  # the decoding driver sits above this module

    if not isinstance(model, Transformer | GPT):
        raise AttentionError(f"a {type(model).__name__} model has no attention to show")
    limit = model.config.max_positions
    was_training = model.training
    model.eval()
    record = AttentionRecord()
    try:
        if isinstance(model, GPT):
            if target is not None:
                raise AttentionError("a GPT model has no target: give the text as the prompt")
            ids = tokenizer.encode_target(source)[-limit:]
            if not ids:
                raise AttentionError("the prompt is empty")
            model(torch.tensor([ids], device=device), record=record)
            labels = piece_labels(tokenizer.target, ids)
            return AttentionMaps(
                {"decoder": _stack(record.decoder)}, {"decoder": labels}, {"decoder": labels}
            )
        if not source.strip():
            raise AttentionError("the source is empty")
        src_ids = tokenizer.encode_source(source)[: limit - 1] + [EOS_ID]
        if target is None:
            best = translate_ids(model, [src_ids], decode or DecodeConfig(), device)[0][0]
            tgt_ids = best.tokens[: limit - 1]
        else:
            tgt_ids = tokenizer.encode_target(target)[: limit - 1]
        src = torch.tensor([src_ids], device=device)
        tgt_in = torch.tensor([[BOS_ID] + tgt_ids], device=device)
        model.decode(tgt_in, model.encode(src, record), record)
    finally:
        model.train(was_training)
    source_labels = piece_labels(tokenizer.source, src_ids)
    inputs = piece_labels(tokenizer.target, [BOS_ID] + tgt_ids)
    emitted = piece_labels(tokenizer.target, tgt_ids + [EOS_ID])
    return AttentionMaps(
        weights={
            "encoder": _stack(record.encoder),
            "decoder": _stack(record.decoder),
            "cross": _stack(record.cross),
        },
        queries={"encoder": source_labels, "decoder": inputs, "cross": emitted},
        keys={"encoder": source_labels, "decoder": inputs, "cross": source_labels},
    )


def _stack(per_layer: list[Tensor]) -> Tensor:
    """Layers of (1, h, q, k) -> (layers, h, q, k), float32 on the CPU."""
    return torch.cat(per_layer).float().cpu()


# ----------------------------------------------------------------------------------- rendering


def write_png(maps: AttentionMaps, path: str | Path) -> Path:
    """One panel per kind, layer and head (a row per kind and layer, a column per head), each
    cell ``CELL_INCHES`` square so that labels stay legible however long the sentence.

    Raises:
        AttentionError: matplotlib is not installed.
    """
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as error:
        raise AttentionError(
            "--out needs matplotlib: pip install 'seq2seq[plot]' (or use --html)"
        ) from error
    rows = [(kind, layer) for kind, w in maps.weights.items() for layer in range(w.shape[0])]
    n_heads = next(iter(maps.weights.values())).shape[1]
    longest = max(len(label) for labels in (*maps.queries.values(), *maps.keys.values())
                  for label in labels)  # fmt: skip
    label_inches = 0.3 + longest * FONT_POINTS * 0.6 / 72  # room for tick labels and axis name
    title_inches = 0.5
    widest = max(w.shape[3] for w in maps.weights.values())
    panel_width = label_inches + widest * CELL_INCHES + 0.6  # 0.6: colour bar of the last one
    heights = [maps.weights[kind].shape[2] * CELL_INCHES for kind, _ in rows]
    row_heights = [title_inches + h + label_inches for h in heights]
    width, height = n_heads * panel_width, sum(row_heights)
    figure = Figure(figsize=(width, height), dpi=DPI)
    FigureCanvasAgg(figure)
    top = height
    for (kind, layer), panel_height, row_height in zip(rows, heights, row_heights):
        weights = maps.weights[kind][layer]
        n_queries, n_keys = weights.shape[1:]
        query_name, key_name = AXES[kind] if len(maps.weights) > 1 else ("prompt", "prompt")
        for head in range(n_heads):
            left = head * panel_width + label_inches
            bottom = top - title_inches - panel_height
            axes = figure.add_axes(
                (left / width, bottom / height, n_keys * CELL_INCHES / width, panel_height / height)
            )
            image = axes.imshow(weights[head].numpy(), vmin=0.0, vmax=1.0, cmap="viridis",
                                aspect="auto", interpolation="nearest")  # fmt: skip
            title = f"{TITLES[kind]}\nlayer {layer + 1}, head {head + 1}"
            axes.set_title(title, fontsize=FONT_POINTS + 1)
            axes.set_xticks(range(n_keys), maps.keys[kind], rotation=90, fontsize=FONT_POINTS)
            axes.set_yticks(range(n_queries), maps.queries[kind], fontsize=FONT_POINTS)
            axes.set_xlabel(f"keys: {key_name}", fontsize=FONT_POINTS)
            axes.set_ylabel(f"queries: {query_name}", fontsize=FONT_POINTS)
            if head == n_heads - 1:
                figure.colorbar(image, ax=axes, fraction=0.04, pad=0.02)
        top -= row_height
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    figure.savefig(tmp, format="png", dpi=DPI)
    os.replace(tmp, path)
    return path


def render_html(maps: AttentionMaps) -> str:
    """A self-contained page (inline CSS, no scripts, no external assets): one table per kind,
    layer and head, each cell shaded by its weight, with the exact value as a tooltip."""
    css = (
        "body{font-family:sans-serif;font-size:12px}table{border-collapse:collapse;margin:4px}"
        "td{width:14px;height:14px;padding:0}th{font-weight:normal;padding:0 2px}"
        "thead th{writing-mode:vertical-rl;transform:rotate(180deg);text-align:left}"
        "tbody th{text-align:right}figure{display:inline-block;vertical-align:top;margin:8px}"
        "figcaption{font-weight:bold}"
    )
    parts = ["<!DOCTYPE html>", '<html><head><meta charset="utf-8">',
             f"<title>attention maps</title><style>{css}</style></head><body>"]  # fmt: skip
    for kind, weights in maps.weights.items():
        query_name, key_name = AXES[kind] if len(maps.weights) > 1 else ("prompt", "prompt")
        parts.append(f"<h2>{TITLES[kind]} (rows: {query_name}; columns: {key_name})</h2>")
        queries = [html.escape(q) for q in maps.queries[kind]]
        keys = [html.escape(k) for k in maps.keys[kind]]
        for layer in range(weights.shape[0]):
            parts.append("<div>")
            for head in range(weights.shape[1]):
                caption = f"layer {layer + 1}, head {head + 1}"
                parts.append(f"<figure><figcaption>{caption}</figcaption><table><thead><tr><th>")
                parts.extend(f"<th>{k}" for k in keys)
                parts.append("</thead><tbody>")
                for query, row in zip(queries, weights[layer, head].tolist()):
                    cells = "".join(
                        f'<td style="background:{_shade(w)}" title="{query} \u2192 {key}: '
                        f'{w:.3f}"></td>'
                        for key, w in zip(keys, row)
                    )
                    parts.append(f"<tr><th>{query}{cells}</tr>")
                parts.append("</tbody></table></figure>")
            parts.append("</div>")
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def _shade(weight: float) -> str:
    """White at 0 to dark blue at 1."""
    level = min(max(weight, 0.0), 1.0)
    red, green, blue = (round(255 - level * (255 - c)) for c in (8, 48, 107))
    return f"#{red:02x}{green:02x}{blue:02x}"


def write_html(maps: AttentionMaps, path: str | Path) -> Path:
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(render_html(maps), encoding="utf-8")
    os.replace(tmp, path)
    return path


# ----------------------------------------------------------------------------------------- CLI


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="seq2seq attention",
        description="Draw every layer's and head's attention for one sentence or prompt.",
    )
    p.add_argument("--model", required=True, help="model directory")
    p.add_argument("--source", help="source sentence (encoder-decoder models)")
    p.add_argument("--target", help="target to teacher-force (default: the model's beam output)")
    p.add_argument("--prompt", help="text whose causal self-attention to show (GPT models)")
    p.add_argument("--out", help="write a PNG here (needs matplotlib)")
    p.add_argument("--html", help="write a self-contained HTML page here")
    p.add_argument("--beam", type=int, help="beam width for the default target")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if not args.out and not args.html:
            raise AttentionError("nothing to write: give --out FILE.png and/or --html FILE.html")
        for flag, value in (("--out", args.out), ("--html", args.html)):
            if value and not Path(value).resolve().parent.is_dir():
                raise AttentionError(f"{flag} {value}: the folder does not exist")
        model, tokenizer, config, device = load_for_inference(
            args.model, args.device, {"beam_size": args.beam}
        )
        if not isinstance(model, Transformer | GPT):
            raise AttentionError(f"{args.model}: a {config.model.arch} model has no attention")
        if isinstance(model, GPT):
            if args.prompt is None or args.source is not None or args.target is not None:
                raise AttentionError(f"{args.model} is a GPT model: give --prompt TEXT only")
            text = args.prompt
        else:
            if args.source is None or args.prompt is not None:
                raise AttentionError(
                    f"{args.model} is an encoder-decoder model: give --source TEXT "
                    "(and optionally --target TEXT)"
                )
            text = args.source
        maps = attention_maps(model, tokenizer, text, args.target, config.decode, device)
        written = []
        if args.out:
            written.append(str(write_png(maps, args.out)))
        if args.html:
            written.append(str(write_html(maps, args.html)))
    except (AttentionError, CheckpointError, ConfigError) as error:
        print(f"seq2seq attention: error: {error}", file=sys.stderr)
        return 2
    if "cross" in maps.weights:
        target = "given" if args.target is not None else "beam output"
        print(f"source: {' '.join(maps.keys['cross'])}", file=sys.stderr)
        print(f"target ({target}): {' '.join(maps.queries['cross'])}", file=sys.stderr)
    shapes = ", ".join(f"{kind} {tuple(w.shape)}" for kind, w in maps.weights.items())
    print(f"attention: {shapes} (layers, heads, queries, keys) -> {', '.join(written)}",
          file=sys.stderr)  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
