"""The decoder's one-token step as one TorchScript graph, for CPU decoding.

A decoding step is ~100 small operators. Run from Python, each costs an interpreter round trip
and takes the interpreter lock, which the search threads of
:func:`seq2seq.decoding.search_batches` then wait on. :class:`ScriptedStep` runs the same
operators, in the same order and on the same kernels as :meth:`seq2seq.model.DecoderStack.step`,
from TorchScript's interpreter, which does without the lock: the outputs are bit for bit the eager
ones (``tests/test_scripted.py``), and on a Zen 5 EPYC with two threads (Multi30k test2016, in
one process, alternating, medians; benchmarks/RESULTS.md) float32 greedy search ran 1.19x and
beam 5 1.08x faster, int8 1.52x and 1.14x.

:func:`seq2seq.kernels.prepare_cpu_decoding` attaches one to a float32 CPU model's decoder stack
(after it has laid out the weights, whose tensors the graph shares, not copies); the stack uses it
for single-token steps in inference (no gradient, no autocast, eval mode) and runs eagerly
otherwise: a prompt of several tokens, attention records, training, other devices.
``torch.compile`` was the first choice and failed on these dynamic shapes (RESULTS.md).

This file leaves out ``from __future__ import annotations``, since TorchScript reads the
annotations, and reshapes heads with ``view``/``transpose``, since TorchScript cannot call einops;
the eager layers (:mod:`seq2seq.layers`) remain the readable statement of the same step.
"""

import warnings

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from seq2seq.tokenizer import PAD_ID


class Float32Linear(nn.Module):
    """:class:`seq2seq.kernels.DecodingLinear`'s choice, scriptable: oneDNN above ``mkl_max_rows``
    rows when ``onednn``, else ``F.linear`` (MKL)."""

    def __init__(self, weight: Tensor, bias: Tensor | None, onednn: bool, mkl_max_rows: int):
        super().__init__()
        self.weight, self.bias = weight, bias
        self.onednn, self.mkl_max_rows = onednn, mkl_max_rows

    def forward(self, x: Tensor) -> Tensor:
        if self.onednn and x.numel() > self.mkl_max_rows * x.size(-1):
            scalars: list[int | float | complex | None] = []
            return torch.ops.mkldnn._linear_pointwise(
                x, self.weight, self.bias, "none", scalars, ""
            )
        return F.linear(x, self.weight, self.bias)


class Int8Linear(nn.Module):
    """:class:`seq2seq.kernels.Int8Linear`'s product, scriptable: the same packed int8 weights."""

    def __init__(self, packed: object, reduce_range: bool):
        super().__init__()
        self.packed, self.reduce_range = packed, reduce_range

    def forward(self, x: Tensor) -> Tensor:
        return torch.ops.quantized.linear_dynamic(x, self.packed, self.reduce_range)


def scriptable_linear(layer: nn.Module) -> nn.Module | None:
    """The scriptable twin of one of the model's linear layers; None for a kind not covered."""
    from seq2seq.kernels import MKL_MAX_ROWS, DecodingLinear, int8_full_range_activations
    from seq2seq.kernels import Int8Linear as ModelInt8Linear

    if type(layer) is nn.Linear:
        return Float32Linear(layer.weight, layer.bias, False, MKL_MAX_ROWS)
    if type(layer) is DecodingLinear:
        return Float32Linear(layer.weight, layer.bias, True, MKL_MAX_ROWS)
    if type(layer) is ModelInt8Linear and layer._packed_params.dtype == torch.qint8:
        full_range = int8_full_range_activations()
        return Int8Linear(layer._packed_params._packed_params, not full_range)
    return None


class _Missing(Exception):
    """A part of the model the graph does not cover; the stack then stays eager."""


def _linear(layer: nn.Module | None) -> nn.Module:
    twin = None if layer is None else scriptable_linear(layer)
    if twin is None:
        raise _Missing(type(layer).__name__)
    return twin


def _activation_name(function: object) -> str:
    from seq2seq.layers import ACTIVATIONS as LAYER_ACTIVATIONS

    for name, candidate in LAYER_ACTIVATIONS.items():
        if candidate is function:
            return name
    raise _Missing("activation")


class LayerStep(nn.Module):
    """One :class:`seq2seq.layers.DecoderLayer` for one new position per row."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        attention = layer.self_attention
        self.heads = attention.n_heads
        self.query, self.key = _linear(attention.q_proj), _linear(attention.k_proj)
        self.value, self.out = _linear(attention.v_proj), _linear(attention.out_proj)
        self.self_norm = layer.self_attention_block.norm
        self.norm_first = layer.self_attention_block.norm_first
        self.has_cross = layer.cross_attention is not None
        cross = layer.cross_attention if self.has_cross else attention
        self.cross_query, self.cross_out = _linear(cross.q_proj), _linear(cross.out_proj)
        block = layer.cross_attention_block if self.has_cross else layer.self_attention_block
        self.cross_norm = block.norm
        self.linear_in = _linear(layer.feed_forward.linear_in)
        self.linear_out = _linear(layer.feed_forward.linear_out)
        self.activation = _activation_name(layer.feed_forward.activation)
        self.feed_forward_norm = layer.feed_forward_block.norm

    def self_attend(self, y: Tensor, keys: Tensor, values: Tensor, past: int) -> Tensor:
        """y (b, 1, m); keys/values the cache's (capacity, b, h, d) buffers, filled to ``past``."""
        b, m = y.size(0), y.size(2)
        d = m // self.heads
        q = self.query(y).view(b, 1, self.heads, d).transpose(1, 2)
        keys[past] = self.key(y).view(b, self.heads, d)
        values[past] = self.value(y).view(b, self.heads, d)
        key = keys[: past + 1].permute(1, 2, 0, 3)
        value = values[: past + 1].permute(1, 2, 0, 3)
        attended = F.scaled_dot_product_attention(q, key, value)
        return self.out(attended.transpose(1, 2).reshape(b, 1, m))

    def cross_attend(
        self, y: Tensor, key: Tensor, value: Tensor, mask: Tensor | None, rows: int
    ) -> Tensor:
        """y (b r, 1, m) against one source's keys (b, h, s, d) per ``rows`` consecutive rows."""
        m = y.size(2)
        d = m // self.heads
        if rows > 1:
            y = y.view(y.size(0) // rows, rows, m)
        b, t = y.size(0), y.size(1)
        q = self.cross_query(y).view(b, t, self.heads, d).transpose(1, 2)
        attended = F.scaled_dot_product_attention(q, key, value, attn_mask=mask)
        out = self.cross_out(attended.transpose(1, 2).reshape(b, t, m))
        return out if rows == 1 else out.view(b * rows, 1, m)

    def feed_forward(self, y: Tensor) -> Tensor:
        hidden = self.linear_in(y)
        if self.activation == "relu":
            hidden = F.relu(hidden)
        elif self.activation == "gelu":
            hidden = F.gelu(hidden)
        elif self.activation == "gelu_tanh":
            hidden = F.gelu(hidden, approximate="tanh")
        else:
            hidden = F.silu(hidden)
        return self.linear_out(hidden)

    def forward(
        self,
        x: Tensor,
        keys: Tensor,
        values: Tensor,
        past: int,
        cross_key: Tensor | None,
        cross_value: Tensor | None,
        mask: Tensor | None,
        rows: int,
    ) -> Tensor:
        if self.norm_first:
            x = x + self.self_attend(self.self_norm(x), keys, values, past)
        else:
            x = self.self_norm(x + self.self_attend(x, keys, values, past))
        if self.has_cross and cross_key is not None and cross_value is not None:
            if self.norm_first:
                x = x + self.cross_attend(self.cross_norm(x), cross_key, cross_value, mask, rows)
            else:
                x = self.cross_norm(x + self.cross_attend(x, cross_key, cross_value, mask, rows))
        if self.norm_first:
            return x + self.feed_forward(self.feed_forward_norm(x))
        return self.feed_forward_norm(x + self.feed_forward(x))


class StackStep(nn.Module):
    """:meth:`seq2seq.model.DecoderStack.step` for one token per row: tokens (b, 1) -> logits
    (b, 1, v), writing each layer's new key and value at position ``past`` of its buffers."""

    def __init__(self, stack: nn.Module):
        super().__init__()
        self.embedding = stack.embedding.weight
        self.scale = float(stack.embedding.scale)
        self.padding_id = PAD_ID
        self.table = stack.positions.table
        self.layers = nn.ModuleList([LayerStep(layer) for layer in stack.layers])
        self.has_norm = stack.norm is not None
        self.norm = stack.norm if stack.norm is not None else nn.Identity()
        if stack.output_projection is not None:
            self.projection = _linear(stack.output_projection)
        else:  # tied, unprepared: the stack's F.linear over its embedding matrix
            self.projection = Float32Linear(stack.embedding.weight, None, False, 1)
        self.has_bias = stack.output_bias is not None
        self.bias = stack.output_bias.bias if self.has_bias else torch.empty(0)

    def forward(
        self,
        tokens: Tensor,
        past: int,
        keys: list[Tensor],
        values: list[Tensor],
        cross_keys: list[Tensor],
        cross_values: list[Tensor],
        mask: Tensor | None,
        rows: int,
    ) -> Tensor:
        x = F.embedding(tokens, self.embedding, self.padding_id) * self.scale
        x = x + self.table[past : past + 1].to(x.dtype)
        i = 0
        for layer in self.layers:
            cross_key = cross_keys[i] if len(cross_keys) > 0 else None
            cross_value = cross_values[i] if len(cross_values) > 0 else None
            x = layer(x, keys[i], values[i], past, cross_key, cross_value, mask, rows)
            i += 1
        if self.has_norm:
            x = self.norm(x)
        logits = self.projection(x)
        if self.has_bias:
            logits = logits + self.bias.to(logits.dtype)
        return logits


class ScriptedStep:
    """The stack's scripted single-token step with the Python around it: the cache's buffers
    grown where needed, its length advanced. A plain object, so the model's state dict does not
    see the graph's references to its parameters."""

    def __init__(self, stack: nn.Module):
        with warnings.catch_warnings():  # TorchScript is in maintenance; its warnings say so
            warnings.simplefilter("ignore")
            self.graph = torch.jit.script(StackStep(stack).eval())
        # The stack itself is held unregistered; its layers follow the model's train() and eval().
        self.stack_training = lambda: stack.layers.training
        self.max_positions = stack.positions.max_positions
        self.heads = stack.layers[0].self_attention.n_heads
        self.embedding = stack.embedding.weight  # its dtype says whether the model is still fp32
        self.head_width = self.embedding.shape[1] // self.heads

    def __deepcopy__(self, memo: dict) -> None:
        """A copied model gets no graph: this one holds the original's parameters."""
        return None

    def applies(self, tokens: Tensor) -> bool:
        """Whether this step may run scripted: one token per row, float32 inference on the CPU."""
        return (
            tokens.shape[1] == 1
            and tokens.device.type == "cpu"
            and self.embedding.dtype is torch.float32
            and not torch.is_grad_enabled()
            and not torch.is_autocast_enabled("cpu")
            and not self.stack_training()
        )

    def __call__(self, tokens: Tensor, state) -> Tensor:
        """tokens (b, 1) continuing ``state`` (a :class:`seq2seq.layers.DecoderState`) -> logits."""
        past = state.length
        if past + 1 > self.max_positions:
            raise ValueError(
                f"sequence of {past + 1} positions exceeds model.max_positions={self.max_positions}"
            )
        batch = tokens.shape[0]
        keys, values = [], []
        for cache in state.layers:
            cache.reserve(
                past + 1, batch, self.heads, self.head_width, torch.float32, tokens.device
            )
            keys.append(cache.buffers[0])
            values.append(cache.buffers[1])
        crossed = [cache for cache in state.layers if cache.cross_key is not None]
        rows = state.layers[0].cross_rows if state.layers else 1
        logits = self.graph(
            tokens, past, keys, values, [c.cross_key for c in crossed],
            [c.cross_value for c in crossed], state.memory_mask, rows,
        )  # fmt: skip
        for cache in state.layers:
            cache.length = past + 1
        state.length = past + 1
        return logits


def attach(stack: nn.Module) -> ScriptedStep | None:
    """Give a float32 decoder stack its :class:`ScriptedStep` (``stack.scripted_step``); None, and
    the stack stays eager, where a part is not covered or TorchScript fails."""
    stack.scripted_step = None
    if stack.embedding.weight.dtype != torch.float32:
        return None
    try:
        scripted = ScriptedStep(stack)
    except Exception:  # the eager step is always correct; whatever fails here keeps it
        return None
    stack.scripted_step = scripted
    return scripted
