"""The batched decode core that ``translate``, :class:`seq2seq.api.Translator` and the training
loop's validation BLEU share: token-id batches and a :class:`~seq2seq.config.DecodeConfig` in,
hypotheses out.

:func:`translate_ids` searches one batch (greedy, beam or sampled, see :mod:`seq2seq.search`),
:func:`search_batches` several (side by side on the CPU, see :func:`batch_workers`);
:func:`translate_nbest` drives it over text: tokenize -> sort by source length -> token-budget
batches -> search -> restore input order -> detokenize. The output length limit exists only
here, in :func:`max_output_lengths`: ``max_len = max_len_a * source_len + max_len_b`` tokens
(source_len counts EOS; max_len counts generated tokens including EOS), capped at
``max_positions``.

``precision="int8"`` (:func:`quantize_int8`) runs every ``nn.Linear`` and the output projection
as a dynamically quantized int8 matrix product (weights int8, activations quantized per batch),
CPU only; embeddings stay float32.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import itertools
import math
import sys
import time
import warnings
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch

from seq2seq.config import DecodeConfig
from seq2seq.kernels import Int8Linear, float32_linear
from seq2seq.search import (
    NEG_INF,
    Hypothesis,
    IncrementalDecoder,
    TransformerDecoder,
    beam_search,
    block_tokens,
    greedy,
    sample,
)
from seq2seq.textio import LINE_BREAKS
from seq2seq.tokenizer import BOS_ID, EOS_ID, PAD_ID, Tokenizer

CHUNK_LINES = 10_000


@dataclass
class TranslateStats:
    """Counts for the throughput report, filled in while translating."""

    lines: int = 0
    decoded: int = 0  # non-empty lines sent to the model
    generated_tokens: int = 0  # best hypotheses' tokens, EOS included
    truncated: int = 0
    seconds: float = 0.0


def translate_nbest(
    model: torch.nn.Module,
    tokenizer: Tokenizer,
    lines: Iterable[str],
    decode: DecodeConfig,
    device: str | torch.device = "cpu",
    bf16: bool = False,
    stats: TranslateStats | None = None,
    chunk_size: int = CHUNK_LINES,
    dtype: torch.dtype | None = None,
    sampler: torch.Generator | None = None,
    progress: Callable[[int], object] | None = None,
) -> Iterator[list[tuple[str, float]]]:
    """Yield, per input line, up to ``decode.nbest`` ``(text, score)`` pairs, best first.

    Empty or whitespace-only lines yield ``[]``. Lines are consumed ``chunk_size`` at a time.
    When any source was truncated, one warning with the count goes to stderr at the end.
    ``dtype`` is the autocast dtype (None: full precision; ``bf16=True``: deprecated bfloat16).
    With a ``sampler``, each line gets one translation drawn with it (see :func:`translate_ids`).
    ``progress`` is called with the number of input lines finished, after each batch.
    """
    stats = TranslateStats() if stats is None else stats
    dtype = autocast_dtype(bf16, dtype)
    limit = model.config.max_positions - 1  # source pieces, leaving room for EOS
    iterator = iter(lines)
    while chunk := list(itertools.islice(iterator, chunk_size)):
        start = time.perf_counter()
        results: list[list[tuple[str, float]]] = [[] for _ in chunk]
        todo = [i for i, line in enumerate(chunk) if line.strip()]
        sources = tokenizer.encode_source_batch([chunk[i] for i in todo])
        stats.truncated += sum(len(ids) > limit for ids in sources)
        sources = [ids[:limit] + [EOS_ID] for ids in sources]
        batches = token_batches([len(ids) for ids in sources], decode.batch_tokens)
        batch_sources = [[sources[j] for j in batch] for batch in batches]
        searched = search_batches(model, batch_sources, decode, device, dtype, sampler)
        for batch, hyps in zip(batches, searched):
            for j, nbest in zip(batch, hyps):
                results[todo[j]] = [
                    (clean_line(tokenizer.decode_target(h.tokens)), h.score) for h in nbest
                ]
                stats.generated_tokens += len(nbest[0].tokens) + 1
            if progress is not None:
                progress(len(batch))
        if progress is not None and len(chunk) > len(todo):
            progress(len(chunk) - len(todo))  # the empty lines
        stats.lines += len(chunk)
        stats.decoded += len(todo)
        stats.seconds += time.perf_counter() - start
        yield from results
    if stats.truncated:
        print(
            f"warning: {stats.truncated} input line(s) longer than {limit} source tokens were "
            f"truncated to fit the model's max_positions={limit + 1}",
            file=sys.stderr,
        )


def search_batches(
    model: torch.nn.Module,
    batches: list[list[list[int]]],
    decode: DecodeConfig,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    sampler: torch.Generator | None = None,
) -> Iterator[list[list[Hypothesis]]]:
    """Yield, per batch of source ids (each ending in EOS), :func:`translate_ids`' n-best lists,
    in order; on the CPU, :func:`batch_workers` batches are searched at once."""
    search = functools.partial(
        _translate_halving, model, decode=decode, device=device, dtype=dtype, sampler=sampler
    )
    with _batches_in_parallel(model, batch_workers(device, sampler, len(batches))) as pool:
        yield from (pool.map(search, batches) if pool else map(search, batches))


# Batch-parallel decoding was measured on 2 cores only; beyond this many threads the interpreter
# lock, held between operators, may cap it, so larger thread counts keep intra-op threading.
MAX_BATCH_WORKERS = 4


def batch_workers(device: str | torch.device, sampler: torch.Generator | None, batches: int) -> int:
    """How many batches :func:`translate_nbest` searches at once: one per intra-op thread on the
    CPU (each search then runs single-threaded), else 1.

    A decoding step is many small operators; with two intra-op threads each of them is an OpenMP
    parallel region, whose sleeping helper thread (``OMP_WAIT_POLICY=PASSIVE``) takes longer to
    wake than the work takes. Two single-threaded searches of different batches, side by side,
    start no parallel region at all: on a 2-core AMX Xeon, Multi30k beam 5 went from 126 to 208
    sentences/s and greedy from 235 to 543, with identical outputs (benchmarks/RESULTS.md). Seeded
    sampling keeps one order of draws, so it stays sequential, as do CUDA devices.
    """
    threads = torch.get_num_threads()
    if torch.device(device).type != "cpu" or sampler is not None or batches < 2:
        return 1
    if not 2 <= threads <= MAX_BATCH_WORKERS:
        return 1
    return min(threads, batches)


@contextlib.contextmanager
def _batches_in_parallel(
    model: torch.nn.Module, workers: int
) -> Iterator[ThreadPoolExecutor | None]:
    """``workers`` threads that search one batch each, single-threaded; None for ``workers = 1``.

    The model stays in eval mode for the whole pool (``translate_ids`` would otherwise switch it
    back and forth from several threads), and the intra-op thread count is restored afterwards.
    """
    if workers < 2:
        yield None
        return
    was_training, threads = model.training, torch.get_num_threads()
    model.eval()
    torch.set_num_threads(1)  # also read by the pool's threads when they first run an operator
    try:
        with ThreadPoolExecutor(workers, thread_name_prefix="seq2seq-decode") as pool:
            yield pool
    finally:
        torch.set_num_threads(threads)
        model.train(was_training)


def _translate_halving(
    model: torch.nn.Module,
    sources: list[list[int]],
    decode: DecodeConfig,
    device: str | torch.device,
    dtype: torch.dtype | None,
    sampler: torch.Generator | None = None,
) -> list[list[Hypothesis]]:
    """``translate_ids``, retried on halves of the batch while the device runs out of memory."""
    try:
        return translate_ids(model, sources, decode, device, False, dtype, sampler)
    except torch.OutOfMemoryError:
        if len(sources) == 1:
            raise
        if torch.device(device).type == "cuda":
            torch.cuda.empty_cache()
        half = len(sources) // 2
        print(
            f"warning: out of memory on a batch of {len(sources)} sentences; retrying as "
            f"{half} + {len(sources) - half}",
            file=sys.stderr,
        )
        return _translate_halving(model, sources[:half], decode, device, dtype, sampler) + (
            _translate_halving(model, sources[half:], decode, device, dtype, sampler)
        )


def token_batches(lengths: list[int], batch_tokens: int) -> list[list[int]]:
    """Indices grouped longest first so that rows x longest source <= ``batch_tokens``
    (a longer single source still gets its own batch)."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batches: list[list[int]] = []
    for i in order:
        if batches and (len(batches[-1]) + 1) * lengths[batches[-1][0]] <= batch_tokens:
            batches[-1].append(i)
        else:
            batches.append([i])
    return batches


def translate_ids(
    model: torch.nn.Module,
    sources: list[list[int]],
    decode: DecodeConfig,
    device: str | torch.device = "cpu",
    bf16: bool = False,
    dtype: torch.dtype | None = None,
    sampler: torch.Generator | None = None,
) -> list[list[Hypothesis]]:
    """Search one batch of source ids (each ending in EOS); per source its n-best hypotheses.

    The model runs in eval mode, under autocast to ``dtype`` when given (``bf16=True`` is the
    deprecated spelling of bfloat16), and is put back in its previous mode afterwards.

    With a ``sampler`` (a seeded ``torch.Generator`` on ``device``), each source gets one
    hypothesis drawn by :func:`seq2seq.search.sample` with ``decode.temperature``, ``top_k`` and
    ``top_p`` under greedy's constraints; its ``score`` and ``log_prob`` are NaN (not searched).
    """
    dtype = autocast_dtype(bf16, dtype)
    width = max(len(ids) for ids in sources)
    src = torch.tensor([ids + [PAD_ID] * (width - len(ids)) for ids in sources], device=device)
    src_len = torch.tensor([len(ids) for ids in sources], device=device)
    max_len = max_output_lengths(src_len, decode, model.config.max_positions)
    autocast = (
        torch.autocast(torch.device(device).type, dtype=dtype)
        if dtype is not None
        else contextlib.nullcontext()
    )
    was_training = model.training
    model.eval()
    try:
        # A model from prepare_cpu_decoding picks its linear kernels itself, without the mode.
        linear = (
            contextlib.nullcontext()
            if getattr(model, "prepared_for_cpu_decoding", False)
            else float32_linear(device, dtype)
        )
        with torch.inference_mode(), autocast, linear:
            decoder = TransformerDecoder(model, src)
            settings = dict(
                max_len=max_len,
                min_len=decode.min_len,
                no_repeat_ngram_size=decode.no_repeat_ngram_size,
                length_penalty_alpha=decode.length_penalty,
            )
            if sampler is not None:
                drawn = _sample_hypotheses(decoder, len(sources), decode, max_len, sampler)
                return [[hyp] for hyp in drawn]
            if decode.beam_size == 1:
                return [[hyp] for hyp in greedy(decoder, len(sources), **settings)]
            return beam_search(
                decoder, len(sources), decode.beam_size, nbest=decode.nbest, **settings
            )
    finally:
        model.train(was_training)


def max_output_lengths(
    source_lengths: torch.Tensor, decode: DecodeConfig, max_positions: int
) -> torch.Tensor:
    """The length limit per sentence: ``max_len_a * source_len + max_len_b`` generated tokens
    (EOS included), at least 1 and at most ``max_positions``; ``source_lengths (b,)`` count EOS."""
    max_len = (decode.max_len_a * source_lengths + decode.max_len_b).long()
    return max_len.clamp(1, max_positions)


def quantize_int8(model: torch.nn.Module, device: str | torch.device) -> torch.nn.Module:
    """A copy of ``model`` whose ``nn.Linear`` layers are dynamically quantized to int8.

    Weights are stored int8 and activations quantized on the fly per batch
    (``torch.ao.quantization.quantize_dynamic`` into :class:`~seq2seq.kernels.Int8Linear` layers),
    the output projection included (a tied one as an int8 copy of the embedding matrix);
    embeddings and the LayerNorms stay float32. The copy is in eval mode; ``model`` is left as it
    is.

    Raises:
        ValueError: ``device`` is not the CPU (PyTorch's dynamic int8 kernels are CPU-only).
    """
    if torch.device(device).type != "cpu":
        raise ValueError(f"precision int8 runs on the CPU only, not on {device}")
    from torch.ao.quantization import quantize_dynamic

    with warnings.catch_warnings():  # torch deprecates the eager API in favour of torchao
        warnings.simplefilter("ignore")
        int8 = {torch.nn.Linear: Int8Linear}
        quantized = quantize_dynamic(
            copy.deepcopy(model).eval(), {torch.nn.Linear}, dtype=torch.qint8, mapping=int8
        )
        # The output projection (the embedding matrix when tied, which lookups still need in
        # float32) gets an int8 copy of its own: it is the largest product of every step, and
        # int8 ran it 2.2-2.5x faster than float32 at (8-220) x 256 x 8,000 on an AMX Xeon.
        float_decoder = getattr(model, "decoder", None)  # the bigram model has none
        if float_decoder is None:
            return quantized
        tied = float_decoder.output_projection is None
        weight = (float_decoder.embedding if tied else float_decoder.output_projection).weight
        projection = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False)
        projection.weight = torch.nn.Parameter(weight.detach().clone(), requires_grad=False)
        quantized.decoder.output_projection = quantize_dynamic(
            torch.nn.Sequential(projection), {torch.nn.Linear}, dtype=torch.qint8, mapping=int8
        )[0]
    return quantized


def _sample_hypotheses(
    decoder: TransformerDecoder,
    batch_size: int,
    decode: DecodeConfig,
    max_len: torch.Tensor,
    generator: torch.Generator,
) -> list[Hypothesis]:
    """One drawn translation per row, under greedy's constraints (see :class:`ConstrainedSteps`)."""
    steps = ConstrainedSteps(decoder, max_len, decode.min_len, decode.no_repeat_ngram_size)
    start = torch.full((batch_size,), BOS_ID, dtype=torch.long, device=max_len.device)
    rows = sample(
        steps, start, int(max_len.max()), decode.temperature, decode.top_k, decode.top_p,
        generator, eos_id=EOS_ID,
    )  # fmt: skip
    return [Hypothesis(tokens, math.nan, math.nan) for tokens in rows]


class ConstrainedSteps:
    """An :class:`~seq2seq.search.IncrementalDecoder` whose log-probabilities already carry the
    search constraints of :func:`seq2seq.search.block_tokens` (no PAD/BOS, EOS only after
    ``min_len`` tokens and forced at ``max_len``, no repeated n-grams), so that
    :func:`seq2seq.search.sample` draws under the rules greedy and beam search follow.

    A row never left with nothing to draw: where every token is blocked (only possible after the
    row's EOS, which sampling keeps feeding until all rows are done), EOS is allowed.
    """

    def __init__(
        self, decoder: IncrementalDecoder, max_len: torch.Tensor, min_len: int, no_repeat: int
    ) -> None:
        self.decoder, self.max_len, self.min_len, self.no_repeat = (
            decoder,
            max_len,
            min_len,
            no_repeat,
        )
        self.history = torch.empty(max_len.size(0), 0, dtype=torch.long, device=max_len.device)
        self.steps = 0

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        if self.steps:  # the first call feeds BOS, which is not part of the output
            self.history = torch.cat([self.history, tokens[:, None]], dim=1)
        log_probs = block_tokens(
            self.decoder.step(tokens), self.steps, self.history, self.max_len, self.min_len,
            self.no_repeat,
        )  # fmt: skip
        stuck = (log_probs == NEG_INF).all(dim=-1)
        log_probs[stuck, EOS_ID] = 0.0
        self.steps += 1
        return log_probs

    def reorder(self, index: torch.Tensor) -> None:
        self.decoder.reorder(index)
        self.history, self.max_len = self.history[index], self.max_len[index]


def seeded_generator(seed: int | None, device: str | torch.device) -> torch.Generator:
    """A generator on ``device``: seeded with ``seed``, or from the OS when None (the global RNG
    is left alone either way)."""
    generator = torch.Generator(device=device)
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(seed)
    return generator


def autocast_dtype(bf16: bool, dtype: torch.dtype | None) -> torch.dtype | None:
    """The autocast dtype from the new ``dtype`` argument or the deprecated ``bf16`` flag."""
    if bf16 and dtype not in (None, torch.bfloat16):
        raise ValueError(f"bf16=True contradicts dtype={dtype}")
    return torch.bfloat16 if bf16 else dtype


def clean_line(text: str) -> str:
    """``text`` on one line: every line-break character becomes a space."""
    return text.translate(LINE_BREAKS)
