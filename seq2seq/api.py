"""The Python API: a model directory as an object with ``translate``, ``score`` and ``generate``.

    from seq2seq import Translator
    translator = Translator.load("runs/m30k/model")
    translator.translate(["Ein Hund läuft.", "Zwei Männer."], beam=5)

:class:`Translator` wraps an encoder-decoder directory and :class:`LanguageModel` a GPT one. Both
resolve ``device`` and ``precision`` with :mod:`seq2seq.hardware` (``auto``: CUDA when present;
bf16 where the hardware computes it natively, else fp32) and decode through the same functions as
the ``translate`` and ``sample`` commands, so the API and the CLI give the same text. Each holds a
lock around its model, so one object may be shared by the threads of a server.
"""

from __future__ import annotations

import contextlib
import dataclasses
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TypeVar

import torch

from seq2seq.checkpoint import load_model
from seq2seq.config import DecodeConfig, RunConfig
from seq2seq.decoding import quantize_int8, translate_nbest
from seq2seq.hardware import (
    PrecisionChoice,
    resolve_device,
    resolve_precision,
    resolve_sampling_precision,
)
from seq2seq.kernels import prepare_cpu_decoding
from seq2seq.model import count_parameters
from seq2seq.sample import generate as sample_text
from seq2seq.tokenizer import BOS_ID, EOS_ID, PAD_ID, Tokenizer

SCORE_BATCH = 64  # pairs per forward pass in Translator.score
_Loaded = TypeVar("_Loaded", bound="_LoadedModel")


class _LoadedModel:
    """What both wrappers share: the model, its tokenizer and config, device, precision, lock."""

    arch = ""

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer: Tokenizer,
        config: RunConfig,
        device: torch.device,
        precision: PrecisionChoice,
        name: str = "",
    ) -> None:
        if config.model.arch != self.arch:
            raise ValueError(
                f"{name or 'model'}: arch {config.model.arch!r}, but {type(self).__name__} "
                f"needs arch {self.arch!r}"
            )
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.config = config
        self.device = device
        self.precision = precision
        self.name = name
        self._lock = threading.Lock()

    @classmethod
    def load(
        cls: type[_Loaded], directory: str | Path, device: str = "auto", precision: str = "auto"
    ) -> _Loaded:
        """Load a model directory (or training checkpoint).

        Args:
            directory: the directory ``seq2seq train`` or ``seq2seq average`` wrote.
            device: ``auto`` (CUDA when available, else CPU), ``cpu``, ``cuda`` or ``cuda:N``.
            precision: ``auto``, ``fp32``, ``bf16`` or ``fp16`` (see :mod:`seq2seq.hardware`),
                or ``int8`` (CPU only): the linear layers dynamically quantized
                (:func:`seq2seq.decoding.quantize_int8`), the rest in fp32.

        Returns:
            The loaded object, its model in eval mode on ``device``.

        Raises:
            CheckpointError: a missing or corrupt file, named in the message.
            ValueError: an unknown device or precision, int8 off the CPU, or a directory of the
                other kind of model.
        """
        resolved = resolve_device(device)
        if precision == "int8":
            if resolved.type != "cpu":
                raise ValueError(f"precision int8 runs on the CPU only, not on {resolved}")
            choice = PrecisionChoice("fp32", "int8: linear layers dynamically quantized")
        else:
            choice = resolve_precision(precision, resolved)
        model, tokenizer, config = load_model(directory, device=resolved)
        if precision == "int8":
            model = quantize_int8(model, resolved)
        elif cls.arch == "gpt":  # generation samples one row per step
            choice = resolve_sampling_precision(precision, resolved)
        prepare_cpu_decoding(model)
        return cls(model, tokenizer, config, resolved, choice, name=Path(directory).name)

    @property
    def parameters(self) -> int:
        """The number of distinct parameters (tied matrices counted once)."""
        return count_parameters(self.model)

    @property
    def max_positions(self) -> int:
        return self.config.model.max_positions

    def _autocast(self) -> contextlib.AbstractContextManager:
        dtype = self.precision.dtype
        if dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=dtype)

    def _decode_settings(self, **overrides: Any) -> DecodeConfig:
        given = {key: value for key, value in overrides.items() if value is not None}
        decode = dataclasses.replace(self.config.decode, **given)
        decode.validate()
        return decode


class Translator(_LoadedModel):
    """An encoder-decoder model directory, ready to translate and to score.

    Empty or whitespace-only sources translate to ``""`` without touching the model. A source longer
    than the model accepts (:attr:`max_source_tokens`) is truncated with a warning on stderr, as
    ``seq2seq translate`` does; :meth:`source_lengths` lets a caller check first.
    """

    arch = "transformer"

    @property
    def source_lang(self) -> str:
        return self.config.data.src_lang

    @property
    def target_lang(self) -> str:
        return self.config.data.tgt_lang

    @property
    def max_source_tokens(self) -> int:
        """The longest source, in tokens without EOS, that is translated whole."""
        return self.max_positions - 1

    def source_lengths(self, sources: Sequence[str]) -> list[int]:
        """Tokens (without EOS) of each source, as :meth:`translate` will count them."""
        return [len(ids) for ids in self.tokenizer.encode_source_batch(list(sources))]

    def translate(
        self,
        sources: Sequence[str],
        beam: int | None = None,
        length_penalty: float | None = None,
        max_len_a: float | None = None,
        max_len_b: int | None = None,
        batch_tokens: int | None = None,
    ) -> list[str]:
        """Translate each source sentence.

        Args:
            sources: one sentence per item.
            beam: beam size (1 = greedy); None keeps the model's ``decode.beam_size``.
            length_penalty: GNMT alpha; None keeps the model's.
            max_len_a: output length limit ``a * source_len + b``; None keeps the model's.
            max_len_b: see ``max_len_a``.
            batch_tokens: source tokens per batch, padding included; None keeps the model's.

        Returns:
            One translation per source, in the same order.

        Raises:
            ConfigError: an invalid setting (e.g. ``beam < 1``).
        """
        nbest = self.translate_nbest(
            sources, 1, beam, length_penalty, max_len_a, max_len_b, batch_tokens
        )
        return [hyps[0][0] for hyps in nbest]

    def translate_nbest(
        self,
        sources: Sequence[str],
        nbest: int = 1,
        beam: int | None = None,
        length_penalty: float | None = None,
        max_len_a: float | None = None,
        max_len_b: int | None = None,
        batch_tokens: int | None = None,
    ) -> list[list[tuple[str, float]]]:
        """The ``nbest`` best translations of each source, with their scores.

        Args:
            sources: one sentence per item.
            nbest: hypotheses per source; the beam is widened to ``nbest`` if narrower.
            beam: beam size; None keeps the model's ``decode.beam_size``.
            length_penalty: GNMT alpha; None keeps the model's.
            max_len_a: output length limit ``a * source_len + b``; None keeps the model's.
            max_len_b: see ``max_len_a``.
            batch_tokens: source tokens per batch, padding included; None keeps the model's.

        Returns:
            Per source, best first, ``(text, score)`` pairs, where ``score`` is the log-probability
            of the hypothesis (EOS included) divided by the GNMT length penalty. An empty source
            gives ``[("", 0.0)]``; a search that finds fewer than ``nbest`` gives fewer.

        Raises:
            ConfigError: an invalid setting (e.g. ``nbest < 1``).
        """
        beam = beam if beam is not None else self.config.decode.beam_size
        beam = max(beam, nbest) if beam >= 1 else beam  # an invalid beam is left to validate()
        decode = self._decode_settings(
            beam_size=beam, nbest=nbest, length_penalty=length_penalty, max_len_a=max_len_a,
            max_len_b=max_len_b, batch_tokens=batch_tokens,
        )  # fmt: skip
        with self._lock, self._autocast():
            results = translate_nbest(
                self.model, self.tokenizer, list(sources), decode, self.device
            )
            return [hyps or [("", 0.0)] for hyps in results]

    def score(self, sources: Sequence[str], targets: Sequence[str]) -> list[float]:
        """Teacher-forced log-probability of each target given its source, for rescoring.

        Args:
            sources: source sentences.
            targets: one target per source.

        Returns:
            Per pair, ``sum log p(y_i | y_<i, x)`` over the target's tokens and EOS (natural log,
            no length normalisation).

        Raises:
            ValueError: the lists differ in length, or a source or target does not fit the model.
        """
        if len(sources) != len(targets):
            raise ValueError(f"{len(sources)} sources but {len(targets)} targets")
        if not sources:
            return []
        src_ids = self.tokenizer.encode_source_batch(list(sources))
        tgt_ids = self.tokenizer.encode_target_batch(list(targets))
        for index, (src, tgt) in enumerate(zip(src_ids, tgt_ids)):
            if len(src) + 1 > self.max_positions or len(tgt) + 1 > self.max_positions:
                raise ValueError(
                    f"pair {index}: {len(src)} source / {len(tgt)} target tokens; the model "
                    f"takes at most {self.max_positions - 1} each"
                )
        scores: list[float] = []
        for start in range(0, len(src_ids), SCORE_BATCH):
            chunk = slice(start, start + SCORE_BATCH)
            src = _padded([ids + [EOS_ID] for ids in src_ids[chunk]], self.device)
            tgt_in = _padded([[BOS_ID] + ids for ids in tgt_ids[chunk]], self.device)
            tgt_out = _padded([ids + [EOS_ID] for ids in tgt_ids[chunk]], self.device)
            with self._lock, torch.inference_mode(), self._autocast():
                logits = self.model(src, tgt_in)
                log_probs = torch.log_softmax(logits.float(), dim=-1)
                picked = log_probs.gather(-1, tgt_out[..., None]).squeeze(-1)
                scores += picked.masked_fill(tgt_out == PAD_ID, 0.0).sum(dim=-1).tolist()
        return scores


class LanguageModel(_LoadedModel):
    """A decoder-only (GPT) model directory, ready to continue a prompt."""

    arch = "gpt"

    def generate(
        self,
        prompt: str,
        max_new_tokens: int | None = None,
        temperature: float | None = None,
        top_k: int | None = None,
        top_p: float | None = None,
        seed: int | None = None,
    ) -> str:
        """Continue ``prompt`` by sampling, as ``seq2seq sample`` does.

        Args:
            prompt: the text to continue; ``""`` starts from a newline (or BOS).
            max_new_tokens: tokens to generate; None keeps the model's ``decode.max_new_tokens``.
            temperature: softmax temperature, ``0`` for argmax (greedy); None keeps the model's.
            top_k: keep the k most probable tokens (``0`` keeps all); None keeps the model's.
            top_p: nucleus mass in (0, 1]; None keeps the model's.
            seed: a fixed seed gives the same text every time; None draws a fresh one.

        Returns:
            The prompt (as the tokenizer reads it back) followed by the continuation.

        Raises:
            ValueError: a negative ``max_new_tokens`` or ``temperature``.
            ConfigError: ``top_p`` outside (0, 1].
        """
        decode = self._decode_settings(
            max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p
        )
        if decode.max_new_tokens < 0 or decode.temperature < 0:
            raise ValueError("max_new_tokens and temperature must be >= 0")
        with self._lock, self._autocast():
            return sample_text(self.model, self.tokenizer, prompt, decode, seed, self.device)


def _padded(rows: list[list[int]], device: torch.device) -> torch.Tensor:
    width = max(len(row) for row in rows)
    return torch.tensor([row + [PAD_ID] * (width - len(row)) for row in rows], device=device)
