"""The Transformer of "Attention Is All You Need" (Vaswani et al. 2017) and a decoder-only GPT.

The blocks (attention, feed-forward, embeddings, positions, the layers) are in
:mod:`seq2seq.layers`; this module stacks them: the decoder stack both models share, the
encoder-decoder ``Transformer``, the decoder-only ``GPT`` and the ``Bigram`` baseline.

Shape legend: b batch, s source length, t target length, n new target positions, m model width
(d_model), h heads, d head width (m / h), v vocabulary.

Defaults follow the paper: post-norm residual blocks, interleaved sinusoids, embeddings scaled by
sqrt(d_model), output projection tied to the target embedding.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from seq2seq.config import ModelConfig
from seq2seq.layers import (
    AttentionRecord,
    DecoderLayer,
    DecoderState,
    EncoderLayer,
    FeedForward,
    LayerCache,
    LayerShape,
    MultiHeadAttention,
    PositionalEncoding,
    Residual,
    TokenEmbedding,
    padding_mask,
)
from seq2seq.search import GPTDecoder, sample
from seq2seq.tokenizer import BOS_ID, EOS_ID, PAD_ID

# --------------------------------------------------------------------------- the models


@dataclass
class EncoderOutput:
    memory: Tensor  # (b, s, m)
    memory_mask: Tensor  # (b, 1, 1, s), True at real source tokens


class OutputBias(nn.Module):
    """A fixed (v,) vector added to the logits, a buffer so fine-tuning leaves it as it is
    (Marian's ``final_logits_bias``); zeros when built, set by ``seq2seq.hf_import``."""

    def __init__(self, vocab_size: int) -> None:
        super().__init__()
        self.register_buffer("bias", torch.zeros(vocab_size))

    def forward(self, logits: Tensor) -> Tensor:
        return logits + self.bias.to(logits.dtype)


class DecoderStack(nn.Module):
    """The target side both models share: token embedding and positions, decoder layers, the final
    LayerNorm of a pre-norm stack, and the output projection (the embedding matrix when tied).

    Teacher-forced (:meth:`forward`) or incremental with a cache (:meth:`start`, :meth:`step`).
    The models register these parts under their own attribute names, the names saved in their
    checkpoints (``decoder_layers.0...`` / ``layers.0...``), and keep the stack itself as a plain
    attribute so that no parameter is saved twice.
    """

    def __init__(
        self,
        embedding: TokenEmbedding,
        positions: PositionalEncoding,
        shape: LayerShape,
        n_layers: int,
        cross_attention: bool,
        vocab_size: int,
        tie_output: bool,
        output_bias: bool = False,
    ) -> None:
        super().__init__()
        self.embedding, self.positions = embedding, positions
        self.layers = nn.ModuleList(DecoderLayer(shape, cross_attention) for _ in range(n_layers))
        self.norm = shape.final_norm()
        self.output_projection = None
        if not tie_output:
            self.output_projection = nn.Linear(shape.d_model, vocab_size, bias=False)
        self.output_bias = OutputBias(vocab_size) if output_bias else None
        self.scripted_step = None  # seq2seq.scripted.ScriptedStep, given for CPU decoding

    def forward(
        self,
        tokens: Tensor,
        memory: Tensor | None = None,
        memory_mask: Tensor | None = None,
        record: AttentionRecord | None = None,
    ) -> Tensor:
        """tokens (b, t), whole targets (causal attention) -> logits (b, t, v)."""
        x = self.positions(self.embedding(tokens))
        for layer in self.layers:
            x = layer(x, memory, memory_mask, record=record)
        return self.logits(x)

    def start(
        self, memory: Tensor | None = None, memory_mask: Tensor | None = None
    ) -> DecoderState:
        """An empty cache; with a ``memory``, each layer's cross-attention keys/values, once."""
        state = DecoderState([LayerCache() for _ in self.layers], memory_mask)
        if memory is not None:
            for layer, cache in zip(self.layers, state.layers):
                cache.cross_key, cache.cross_value = layer.cross_attention.project_key_value(memory)
        return state

    def step(self, tokens: Tensor, state: DecoderState) -> Tensor:
        """tokens (b, n) continuing the cached prefix -> logits (b, n, v); extends the cache."""
        if self.scripted_step is not None and self.scripted_step.applies(tokens):
            return self.scripted_step(tokens, state)  # the same operators, run by TorchScript
        x = self.positions(self.embedding(tokens), offset=state.length)
        for layer, cache in zip(self.layers, state.layers):
            x = layer(x, None, state.memory_mask, cache)
        state.length += tokens.shape[1]
        return self.logits(x)

    def logits(self, x: Tensor) -> Tensor:
        """Final hidden states (b, t, m) -> logits (b, t, v)."""
        if self.norm is not None:
            x = self.norm(x)
        if self.output_projection is not None:
            logits = self.output_projection(x)
        else:
            logits = F.linear(x, self.embedding.weight)
        return logits if self.output_bias is None else self.output_bias(logits)


class Transformer(nn.Module):
    """Encoder-decoder Transformer, section 3 and figure 1.

    With ``share_embeddings`` (one joint vocabulary) the source embedding, target embedding and
    output projection are one matrix (three-way tying, section 3.4).
    """

    def __init__(self, config: ModelConfig, src_vocab_size: int, tgt_vocab_size: int) -> None:
        super().__init__()
        if config.share_embeddings and src_vocab_size != tgt_vocab_size:
            raise ValueError(
                f"share_embeddings needs one vocabulary, got {src_vocab_size} and {tgt_vocab_size}"
            )
        self.config = config
        shape, d_model = LayerShape.of(config), config.d_model
        scale = config.scale_embedding
        self.target_embedding = TokenEmbedding(tgt_vocab_size, d_model, scale)
        self.source_embedding = (
            self.target_embedding
            if config.share_embeddings
            else TokenEmbedding(src_vocab_size, d_model, scale)
        )
        positions = config.positions, config.max_positions, d_model, config.dropout
        self.source_positions = PositionalEncoding(*positions)
        self.target_positions = PositionalEncoding(*positions)
        self.encoder_layers = nn.ModuleList(
            EncoderLayer(shape) for _ in range(config.n_encoder_layers)
        )
        decoder = DecoderStack(
            self.target_embedding, self.target_positions, shape, config.n_decoder_layers,
            True, tgt_vocab_size, config.tie_output, config.output_bias,
        )  # fmt: skip
        self.decoder_layers = decoder.layers
        self.encoder_norm = shape.final_norm()
        self.decoder_norm = decoder.norm
        self.output_projection = decoder.output_projection
        self.output_bias = decoder.output_bias
        object.__setattr__(self, "decoder", decoder)  # parts registered above, saved once
        init_parameters(self, config.init, [self.encoder_layers, self.decoder_layers])

    def encode(self, src: Tensor, record: AttentionRecord | None = None) -> EncoderOutput:
        """src (b, s) token ids, right-padded with PAD_ID -> memory (b, s, m).

        A ``record`` receives each layer's self-attention probabilities (b, h, s, s).
        """
        memory_mask = padding_mask(src)
        x = self.source_positions(self.source_embedding(src))
        for layer in self.encoder_layers:
            x = layer(x, memory_mask, record)
        if self.encoder_norm is not None:
            x = self.encoder_norm(x)
        return EncoderOutput(x, memory_mask)

    def decode(
        self, tgt_in: Tensor, encoded: EncoderOutput, record: AttentionRecord | None = None
    ) -> Tensor:
        """Teacher-forced decoding: tgt_in (b, t) -> logits (b, t, v).

        Targets are right-padded, so causal masking alone keeps real positions off the padding.
        A ``record`` receives each layer's self- (b, h, t, t) and cross-attention (b, h, t, s).
        """
        return self.decoder(tgt_in, encoded.memory, encoded.memory_mask, record)

    def forward(self, src: Tensor, tgt_in: Tensor) -> Tensor:
        """src (b, s), tgt_in (b, t) -> logits (b, t, v)."""
        return self.decode(tgt_in, self.encode(src))

    def start_decoding(self, encoded: EncoderOutput) -> DecoderState:
        """A fresh cache holding each layer's cross-attention keys/values, computed once per source."""
        return self.decoder.start(encoded.memory, encoded.memory_mask)

    def decode_step(self, tokens: Tensor, state: DecoderState) -> Tensor:
        """tokens (b, n) continuing the cached prefix -> logits (b, n, v); extends the cache."""
        return self.decoder.step(tokens, state)


class GPT(nn.Module):
    """Decoder-only language model: the decoder stack without cross-attention, output tied."""

    def __init__(self, config: ModelConfig, vocab_size: int) -> None:
        super().__init__()
        self.config = config
        d_model = config.d_model
        self.token_embedding = TokenEmbedding(vocab_size, d_model, config.scale_embedding)
        self.positions = PositionalEncoding(
            config.positions, config.max_positions, d_model, config.dropout
        )
        decoder = DecoderStack(
            self.token_embedding, self.positions, LayerShape.of(config), config.n_decoder_layers,
            False, vocab_size, config.tie_output, config.output_bias,
        )  # fmt: skip
        self.layers = decoder.layers
        self.final_norm = decoder.norm
        self.output_projection = decoder.output_projection
        self.output_bias = decoder.output_bias
        object.__setattr__(self, "decoder", decoder)  # parts registered above, saved once
        init_parameters(self, config.init, [self.layers])

    def forward(self, tokens: Tensor, record: AttentionRecord | None = None) -> Tensor:
        """tokens (b, t) -> next-token logits (b, t, v); a ``record`` receives each layer's
        causal self-attention probabilities (b, h, t, t)."""
        return self.decoder(tokens, record=record)

    def start_decoding(self) -> DecoderState:
        """A fresh, empty cache (it grows to the batch of the first :meth:`decode_step`)."""
        return self.decoder.start()

    def decode_step(self, tokens: Tensor, state: DecoderState) -> Tensor:
        """tokens (b, n) continuing the cached prefix -> logits (b, n, v); extends the cache."""
        return self.decoder.step(tokens, state)

    @torch.inference_mode()
    def generate(
        self,
        tokens: Tensor,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int = 0,
        top_p: float = 1.0,
        seed: int | None = None,
    ) -> Tensor:
        """Continue each prompt by ``max_new_tokens`` sampled tokens, with the KV cache.

        Sampling is :func:`seq2seq.search.sample`: log-probabilities divided by ``temperature``
        (0 = greedy argmax), then top-k and nucleus (top-p) filters; PAD, BOS and EOS are never
        drawn. The context never exceeds ``max_positions``: a longer prompt is cropped to its
        last ``max_positions`` tokens, and when the context fills up, decoding restarts (a fresh
        cache) from the last ``max_positions // 2`` tokens, so any length can be generated (the
        same windowing as ``seq2seq sample``).

        Args:
            tokens: prompt ids (b, p) or (p,), p >= 1.
            max_new_tokens: tokens to add to each row.
            temperature: softmax temperature, >= 0.
            top_k: keep the k most probable tokens (0 = all).
            top_p: keep the smallest set of most probable tokens with mass >= top_p (1 = all).
            seed: seeds a private generator (the same seed gives the same tokens); None draws
                from torch's global generator.

        Returns:
            (b, p + max_new_tokens) (or (p + max_new_tokens,)): the prompt followed by the new
            tokens. The module's train/eval mode is left as it was.

        Raises:
            ValueError: an empty prompt, a negative length or temperature.
        """
        prompt = tokens if tokens.dim() == 2 else tokens[None]
        if prompt.size(1) == 0 or max_new_tokens < 0 or temperature < 0:
            raise ValueError(
                "generate needs a non-empty prompt, max_new_tokens >= 0, temperature >= 0"
            )
        generator = None
        if seed is not None:
            generator = torch.Generator(device=prompt.device).manual_seed(seed)
        limit = self.config.max_positions
        out, start = prompt, max(0, prompt.size(1) - limit)
        was_training = self.training
        self.eval()
        try:
            while out.size(1) - prompt.size(1) < max_new_tokens:
                if out.size(1) - start > limit:
                    start = out.size(1) - limit // 2
                window = out[:, start:]
                # The window's last token plus n - 1 sampled ones are fed: len(window) - 1 + n <= limit.
                n = min(max_new_tokens - (out.size(1) - prompt.size(1)), limit - window.size(1) + 1)
                new = sample(
                    GPTDecoder(self, window), window[:, -1], n, temperature, top_k, top_p,
                    generator, blocked_ids=(PAD_ID, BOS_ID, EOS_ID),
                )  # fmt: skip
                out = torch.cat([out, torch.tensor(new, dtype=out.dtype, device=out.device)], 1)
        finally:
            self.train(was_training)
        return out if tokens.dim() == 2 else out[0]


class Bigram(nn.Module):
    """The baseline of "let's build GPT": next-token logits read from a (v, v) table row of the
    previous token alone, no context beyond it. Trained to convergence, its loss is the text's
    conditional entropy H(x_t+1 | x_t); starts uniform (all logits 0)."""

    def __init__(self, config: ModelConfig, vocab_size: int) -> None:
        super().__init__()
        self.config = config
        self.next_token_logits = nn.Parameter(torch.zeros(vocab_size, vocab_size))

    def forward(self, tokens: Tensor) -> Tensor:
        """tokens (b, t) -> next-token logits (b, t, v)."""
        return F.embedding(tokens, self.next_token_logits)


GPT2_INIT_STD = 0.02


def init_parameters(model: nn.Module, scheme: str, stacks: list[nn.ModuleList]) -> None:
    """Initialise ``model`` by ``model.init``; biases start at zero in both schemes.

    ``xavier``: Xavier-uniform linear layers; embeddings keep their own N(0, 1/d_model).
    ``gpt2``: linear layers and token embeddings N(0, 0.02), and the two projections of each
    layer that write into the residual stream (attention output, FFN output) N(0, 0.02 / sqrt(N))
    with N the residual sums of their stack, so the stream's variance does not grow with depth.
    Learned positions are N(0, 0.02) in both.
    """
    for module in model.modules():
        if isinstance(module, nn.Linear):
            if scheme == "gpt2":
                nn.init.normal_(module.weight, mean=0.0, std=GPT2_INIT_STD)
            else:
                nn.init.xavier_uniform_(module.weight)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, TokenEmbedding) and scheme == "gpt2":
            module.reset(GPT2_INIT_STD)
    if scheme != "gpt2":
        return
    for stack in stacks:
        std = GPT2_INIT_STD / math.sqrt(sum(isinstance(m, Residual) for m in stack.modules()))
        for module in stack.modules():
            if isinstance(module, MultiHeadAttention):
                nn.init.normal_(module.out_proj.weight, mean=0.0, std=std)
            elif isinstance(module, FeedForward):
                nn.init.normal_(module.linear_out.weight, mean=0.0, std=std)


def build_model(
    config: ModelConfig, src_vocab_size: int, tgt_vocab_size: int
) -> Transformer | GPT | Bigram:
    """The model ``config.arch`` names; GPT and Bigram use ``tgt_vocab_size``."""
    if config.arch == "gpt":
        return GPT(config, tgt_vocab_size)
    if config.arch == "bigram":
        return Bigram(config, tgt_vocab_size)
    return Transformer(config, src_vocab_size, tgt_vocab_size)


def count_parameters(model: nn.Module) -> int:
    """Distinct trainable parameters (a tied matrix counts once)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
