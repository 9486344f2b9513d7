"""The building blocks of "Attention Is All You Need" (Vaswani et al. 2017), in the paper's order:
attention (section 3.2), feed-forward (3.3), embeddings (3.4), positional encoding (3.5), then the
residual sub-layers and the encoder and decoder layers of section 3.1. :mod:`seq2seq.model` stacks
them into the encoder-decoder ``Transformer`` and the decoder-only ``GPT``.

Shape legend: b batch, s source length, t target length, n new target positions, m model width
(d_model), h heads, d head width (m / h), v vocabulary.

Masks are boolean with True = may attend (the convention of
``torch.nn.functional.scaled_dot_product_attention``); padding masks are True at real tokens.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from seq2seq.config import ModelConfig
from seq2seq.kernels import Dropout, attention
from seq2seq.tokenizer import PAD_ID

# --------------------------------------------------------------------------- attention (3.2)


class MultiHeadAttention(nn.Module):
    """Multi-head scaled dot-product attention, section 3.2.2.

    Keys and values are projected separately from queries so that a decoder can cache them:
    ``project_key_value`` once per source (cross-attention) or once per new position (self-attention).
    """

    def __init__(self, d_model: int, n_heads: int, dropout: float, bias: bool = True) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.dropout = dropout
        self.q_proj = nn.Linear(d_model, d_model, bias)
        self.k_proj = nn.Linear(d_model, d_model, bias)
        self.v_proj = nn.Linear(d_model, d_model, bias)
        self.out_proj = nn.Linear(d_model, d_model, bias)

    def project_key_value(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(b, s, m) -> keys and values, each (b, h, s, d)."""
        key = rearrange(self.k_proj(x), "b s (h d) -> b h s d", h=self.n_heads)
        value = rearrange(self.v_proj(x), "b s (h d) -> b h s d", h=self.n_heads)
        return key, value

    def attend(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        mask: Tensor | None,
        is_causal: bool,
        record: list[Tensor] | None = None,
    ) -> Tensor:
        """query (b, t, m) against cached key/value (b, h, s, d) -> (b, t, m).

        ``mask`` broadcasts to (b, h, t, s), True = may attend. Given a ``record`` list, the
        attention probabilities (b, h, t, s) are appended to it; the output is computed as always.
        """
        q = rearrange(self.q_proj(query), "b t (h d) -> b h t d", h=self.n_heads)
        if record is not None:
            record.append(attention_probabilities(q, key, mask, is_causal))
        dropout = self.dropout if self.training else 0.0
        attended = attention(q, key, value, mask, dropout, is_causal)
        return self.out_proj(rearrange(attended, "b h t d -> b t (h d)"))

    def forward(
        self,
        query: Tensor,
        key_value: Tensor,
        mask: Tensor | None = None,
        is_causal: bool = False,
        record: list[Tensor] | None = None,
    ) -> Tensor:
        key, value = self.project_key_value(key_value)
        return self.attend(query, key, value, mask, is_causal, record)


def attention_probabilities(q: Tensor, key: Tensor, mask: Tensor | None, is_causal: bool) -> Tensor:
    """softmax(Q K^T / sqrt(d)) over keys, (b, h, t, s) in float32, exactly 0 where masked.

    Computed explicitly, beside the fused kernel, only when someone asks to see the weights.
    """
    scores = torch.einsum("bhtd,bhsd->bhts", q.float(), key.float()) / math.sqrt(q.shape[-1])
    if is_causal:  # SDPA's is_causal aligns the triangle top-left, as causal_mask does
        scores = scores.masked_fill(~causal_mask(q.shape[2], key.shape[2], q.device), -math.inf)
    if mask is not None:
        scores = scores.masked_fill(~mask, -math.inf)
    return torch.softmax(scores, dim=-1)


@dataclass
class AttentionRecord:
    """Attention probabilities collected by one forward pass that is handed this record: one
    (b, h, queries, keys) tensor per layer, in layer order, for each kind of attention."""

    encoder: list[Tensor] = field(default_factory=list)
    decoder: list[Tensor] = field(default_factory=list)  # decoder (or GPT) self-attention
    cross: list[Tensor] = field(default_factory=list)


# --------------------------------------------------------------------------- feed-forward (3.3)


ACTIVATIONS = {  # model.activation -> function; the last two are GPT-2's and Marian's
    "relu": F.relu,
    "gelu": F.gelu,
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "silu": F.silu,
}


class FeedForward(nn.Module):
    """Position-wise FFN(x) = max(0, x W1 + b1) W2 + b2, section 3.3 (GELU or SiLU as options)."""

    def __init__(
        self, d_model: int, d_ff: int, activation_dropout: float, activation: str, bias: bool = True
    ) -> None:
        super().__init__()
        self.linear_in = nn.Linear(d_model, d_ff, bias)
        self.linear_out = nn.Linear(d_ff, d_model, bias)
        self.activation = ACTIVATIONS[activation]
        self.dropout = Dropout(activation_dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.linear_out(self.dropout(self.activation(self.linear_in(x))))


# --------------------------------------------------------------------------- embeddings (3.4, 3.5)


class TokenEmbedding(nn.Module):
    """Token embedding multiplied by sqrt(d_model), section 3.4; its weight doubles as the output
    projection when tied."""

    def __init__(self, vocab_size: int, d_model: int, scale: bool = True) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(vocab_size, d_model))
        self.scale = math.sqrt(d_model) if scale else 1.0  # unscaled: GPT-2, some Marian models
        # Tied embeddings receive the output layer's gradient too; this scale keeps logits O(1).
        self.reset(d_model**-0.5)

    def reset(self, std: float) -> None:
        """Draw the table from N(0, std^2), the padding row zero."""
        nn.init.normal_(self.weight, mean=0.0, std=std)
        with torch.no_grad():
            self.weight[PAD_ID].zero_()

    def forward(self, tokens: Tensor) -> Tensor:
        return F.embedding(tokens, self.weight, padding_idx=PAD_ID) * self.scale


def sinusoidal_positions(n_positions: int, d_model: int) -> Tensor:
    """Section 3.5: PE(pos, 2i) = sin(pos / 10000^(2i/m)), PE(pos, 2i+1) = cos(same), interleaved."""
    position = torch.arange(n_positions, dtype=torch.float64)[:, None]
    inverse_frequency = 10000.0 ** (-torch.arange(0, d_model, 2, dtype=torch.float64) / d_model)
    angles = position * inverse_frequency
    table = torch.zeros(n_positions, d_model, dtype=torch.float64)
    table[:, 0::2] = torch.sin(angles)
    table[:, 1::2] = torch.cos(angles[:, : d_model // 2])
    return table.float()


class PositionalEncoding(nn.Module):
    """Adds fixed sinusoids (section 3.5) or learned positions, then dropout on the sum."""

    def __init__(self, kind: str, max_positions: int, d_model: int, dropout: float) -> None:
        super().__init__()
        self.max_positions = max_positions
        if kind == "sinusoidal":
            self.register_buffer("table", sinusoidal_positions(max_positions, d_model), False)
        else:
            self.table = nn.Parameter(torch.empty(max_positions, d_model))
            nn.init.normal_(self.table, mean=0.0, std=0.02)
        self.dropout = Dropout(dropout)

    def forward(self, embedded: Tensor, offset: int = 0) -> Tensor:
        """(b, t, m) embeddings of positions offset .. offset + t - 1 -> (b, t, m)."""
        end = offset + embedded.shape[1]
        if end > self.max_positions:
            raise ValueError(
                f"sequence of {end} positions exceeds model.max_positions={self.max_positions}"
            )
        return self.dropout(embedded + self.table[offset:end].to(embedded.dtype))


# --------------------------------------------------------------------------- layers (3.1)


class Residual(nn.Module):
    """A sublayer with its residual connection and LayerNorm.

    Post-norm (paper): LayerNorm(x + Dropout(Sublayer(x))). Pre-norm: x + Dropout(Sublayer(LayerNorm(x))).
    """

    def __init__(
        self, d_model: int, dropout: float, norm_first: bool, eps: float, bias: bool = True
    ) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(d_model, eps=eps, bias=bias)
        self.dropout = Dropout(dropout)
        self.norm_first = norm_first

    def forward(self, x: Tensor, sublayer) -> Tensor:
        if self.norm_first:
            return x + self.dropout(sublayer(self.norm(x)))
        return self.norm(x + self.dropout(sublayer(x)))


@dataclass(frozen=True)
class LayerShape:
    """The sizes and rates every encoder/decoder layer is built from (``ModelConfig``'s subset)."""

    d_model: int
    n_heads: int
    d_ff: int
    dropout: float  # on each sublayer's output, before the residual sum
    attention_dropout: float
    activation_dropout: float
    activation: str  # "relu" | "gelu"
    norm_first: bool  # pre-norm instead of the paper's post-norm
    layer_norm_eps: float
    bias: bool  # additive biases in the linear layers and LayerNorms

    @classmethod
    def of(cls, config: ModelConfig) -> LayerShape:
        return cls(
            config.d_model, config.n_heads, config.d_ff, config.dropout, config.attention_dropout,
            config.activation_dropout, config.activation, config.norm_first, config.layer_norm_eps,
            config.bias,
        )  # fmt: skip

    def attention(self) -> MultiHeadAttention:
        return MultiHeadAttention(self.d_model, self.n_heads, self.attention_dropout, self.bias)

    def feed_forward(self) -> FeedForward:
        return FeedForward(
            self.d_model, self.d_ff, self.activation_dropout, self.activation, self.bias
        )

    def residual(self) -> Residual:
        return Residual(self.d_model, self.dropout, self.norm_first, self.layer_norm_eps, self.bias)

    def final_norm(self) -> nn.LayerNorm | None:
        """Pre-norm leaves a stack's last residual sum unnormalised, so it ends with a LayerNorm."""
        if not self.norm_first:
            return None
        return nn.LayerNorm(self.d_model, eps=self.layer_norm_eps, bias=self.bias)


class EncoderLayer(nn.Module):
    """Self-attention then feed-forward, each wrapped in a residual block."""

    def __init__(self, shape: LayerShape) -> None:
        super().__init__()
        self.self_attention = shape.attention()
        self.feed_forward = shape.feed_forward()
        self.self_attention_block = shape.residual()
        self.feed_forward_block = shape.residual()

    def forward(self, x: Tensor, key_mask: Tensor, record: AttentionRecord | None = None) -> Tensor:
        """x (b, s, m); key_mask (b, 1, 1, s) -> (b, s, m)."""
        probs = None if record is None else record.encoder
        x = self.self_attention_block(
            x, lambda y: self.self_attention(y, y, key_mask, record=probs)
        )
        return self.feed_forward_block(x, self.feed_forward)


@dataclass
class LayerCache:
    """Keys and values one decoder layer has seen: (b, h, positions, d) each.

    The self-attention ones are views of preallocated buffers (positions, b, h, d), time-major
    only inside, filled to ``length``: a new position is written in place (no ``torch.cat`` of
    the whole prefix per step) and a beam reorder is one ``index_select`` into the used prefix of
    a fresh buffer.
    """

    cross_key: Tensor | None = None
    cross_value: Tensor | None = None
    buffers: tuple[Tensor, Tensor] | None = None  # (capacity, b, h, d) behind self_key/value
    length: int = 0  # positions held in the buffers
    cross_rows: int = 1  # consecutive decoder rows (a source's beams) per cross_key row

    @property
    def self_key(self) -> Tensor | None:
        if self.buffers is None:
            return None
        return rearrange(self.buffers[0][: self.length], "t b h d -> b h t d")

    @property
    def self_value(self) -> Tensor | None:
        if self.buffers is None:
            return None
        return rearrange(self.buffers[1][: self.length], "t b h d -> b h t d")

    def reserve(
        self, end: int, batch: int, heads: int, width: int, dtype: torch.dtype, device
    ) -> None:
        """Buffers for at least ``end`` positions of ``batch`` rows, the cached ones kept."""
        if self.buffers is not None and self.buffers[0].shape[0] >= end:
            return
        capacity = max(16, 2 * end)  # doubling: O(t) copies in all, not O(t) per step
        grown = tuple(
            torch.empty(capacity, batch, heads, width, dtype=dtype, device=device) for _ in "kv"
        )
        if self.buffers is not None:
            for buffer, cached in zip(grown, self.buffers):
                buffer[: self.length] = cached[: self.length]
        self.buffers = (grown[0], grown[1])

    def append(self, key: Tensor, value: Tensor) -> tuple[Tensor, Tensor]:
        """Add (b, h, n, d) new keys/values after the cached ones; all of them, (b, h, t, d)."""
        past, end = self.length, self.length + key.shape[2]
        batch, heads, _, width = key.shape
        self.reserve(end, batch, heads, width, key.dtype, key.device)
        for buffer, new in zip(self.buffers, (key, value)):
            buffer[past:end] = rearrange(new, "b h n d -> n b h d")
        self.length = end
        return self.self_key, self.self_value

    def reorder(self, index: Tensor, self_attention_only: bool) -> None:
        """Keep batch rows ``index``; the cross-attention ones too unless ``self_attention_only``."""
        if self.buffers is not None:
            used = self.length
            fresh = []
            for buffer in self.buffers:
                # Room for the next position only: a reorder copies the prefix anyway, and beam
                # search reorders every step, so the doubling headroom would only hold memory.
                moved = buffer.new_empty(used + 1, index.numel(), *buffer.shape[2:])
                if buffer.requires_grad:  # out= does not record a gradient
                    moved[:used] = buffer[:used].index_select(1, index)
                else:
                    torch.index_select(buffer[:used], 1, index, out=moved[:used])
                fresh.append(moved)
            self.buffers = (fresh[0], fresh[1])
        if self.cross_key is not None and not self_attention_only:
            by_source = index // self.cross_rows  # decoder row -> its cross-attention row
            self.cross_key = self.cross_key.index_select(0, by_source)
            self.cross_value = self.cross_value.index_select(0, by_source)
            self.cross_rows = 1


@dataclass
class DecoderState:
    """Everything incremental decoding carries between steps.

    ``length`` counts target positions already decoded. ``memory_mask`` (b, 1, 1, s) is None for GPT.
    """

    layers: list[LayerCache]
    memory_mask: Tensor | None = None
    length: int = 0

    def reorder(self, index: Tensor, self_attention_only: bool = False) -> None:
        """Keep batch rows ``index`` (b',), in that order: follows beams and drops finished rows.

        With ``self_attention_only`` the cross-attention keys/values and memory mask are left as
        they are, which is valid when every kept row still belongs to the same source sentence.
        """
        if self.memory_mask is not None and not self_attention_only:
            rows = self.layers[0].cross_rows if self.layers else 1
            self.memory_mask = self.memory_mask.index_select(0, index // rows)
        for cache in self.layers:
            cache.reorder(index, self_attention_only)

    def reorder_cross(self, index: Tensor | None, rows: int) -> None:
        """Keep cross-attention rows ``index`` (None: all), each now serving ``rows`` consecutive
        decoder rows: the beams of one source then attend to its keys as one batch row, so
        the cross-attention cache is per source, not per beam, and moves only when sources do."""
        if index is not None:
            if self.memory_mask is not None:
                self.memory_mask = self.memory_mask.index_select(0, index)
            for cache in self.layers:
                cache.cross_key = cache.cross_key.index_select(0, index)
                cache.cross_value = cache.cross_value.index_select(0, index)
        for cache in self.layers:
            cache.cross_rows = rows


class DecoderLayer(nn.Module):
    """Masked self-attention, optional cross-attention over the encoder output, feed-forward.

    Without cross-attention this is the GPT block.
    """

    def __init__(self, shape: LayerShape, cross_attention: bool) -> None:
        super().__init__()
        self.self_attention = shape.attention()
        self.self_attention_block = shape.residual()
        self.cross_attention = None
        if cross_attention:
            self.cross_attention = shape.attention()
            self.cross_attention_block = shape.residual()
        self.feed_forward = shape.feed_forward()
        self.feed_forward_block = shape.residual()

    def forward(
        self,
        x: Tensor,
        memory: Tensor | None = None,
        memory_mask: Tensor | None = None,
        cache: LayerCache | None = None,
        record: AttentionRecord | None = None,
    ) -> Tensor:
        """x (b, n, m) new target positions; memory (b, s, m); memory_mask (b, 1, 1, s).

        Without a cache, x is the whole target and attention is causal. With one, x continues the
        cached prefix: its keys and values are appended and it attends to prefix and itself.
        """
        self_probs = None if record is None else record.decoder
        cross_probs = None if record is None else record.cross

        def self_attend(y: Tensor) -> Tensor:
            key, value = self.self_attention.project_key_value(y)
            if cache is None:
                return self.self_attention.attend(y, key, value, None, True, self_probs)
            past = cache.length
            key, value = cache.append(key, value)
            mask = None
            if y.shape[1] > 1:  # several new positions: each sees the prefix and itself
                mask = causal_mask(y.shape[1], past + y.shape[1], y.device, offset=past)
            return self.self_attention.attend(y, key, value, mask, False, self_probs)

        def cross_attend(y: Tensor) -> Tensor:
            if cache is not None and cache.cross_key is not None:
                key, value = cache.cross_key, cache.cross_value
            else:
                key, value = self.cross_attention.project_key_value(memory)
                if cache is not None:
                    cache.cross_key, cache.cross_value = key, value
            rows = 1 if cache is None else cache.cross_rows
            if rows > 1:  # a source's beams: one batch row of rows * n queries
                y = rearrange(y, "(b r) n m -> b (r n) m", r=rows)
            out = self.cross_attention.attend(y, key, value, memory_mask, False, cross_probs)
            return out if rows == 1 else rearrange(out, "b (r n) m -> (b r) n m", r=rows)

        x = self.self_attention_block(x, self_attend)
        if self.cross_attention is not None:
            x = self.cross_attention_block(x, cross_attend)
        return self.feed_forward_block(x, self.feed_forward)


def causal_mask(n_queries: int, n_keys: int, device: torch.device, offset: int = 0) -> Tensor:
    """(n_queries, n_keys) True where query i (at position offset + i) may see key j <= offset + i."""
    query_position = torch.arange(n_queries, device=device)[:, None] + offset
    return torch.arange(n_keys, device=device)[None, :] <= query_position


def padding_mask(tokens: Tensor) -> Tensor:
    """(b, s) token ids -> (b, 1, 1, s) True at real tokens, broadcastable over heads and queries."""
    return rearrange(tokens != PAD_ID, "b s -> b 1 1 s")
