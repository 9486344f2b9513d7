"""Dynamic batching for ``seq2seq serve``: one worker thread per :class:`Translator` decodes the
requests queued for it together, and each caller's future gets back its own results.

The worker takes the first waiting request, then keeps taking requests until ``max_wait_ms`` has
passed or their sources reach ``max_batch_tokens``, and decodes all of them (grouped by beam and
n-best) in one :meth:`Translator.translate_nbest` call (length-sorted token-budget batches).
Requests arriving meanwhile form the next batch, so batches grow with the load.

With several decoders (:class:`DecodeProcess`: the model loaded again in a process of its own,
with its share of the torch threads), one worker thread per decoder takes from the same queue:
while one process decodes a batch, the next batch collects and goes to another. On a CPU a small
model decodes the few dozen sentences that clients keep in flight faster as two one-thread
processes than as one two-thread process (OpenMP's fork-join costs more than it saves on such
small matrices; see benchmarks/RESULTS.md), and separate processes share no GIL.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import queue
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from seq2seq.api import Translator

NBest = list[list[tuple[str, float]]]  # per sentence, (text, score) pairs, best first
Decoder = Callable[[list[str], int, int], NBest]  # (sentences, nbest, beam) -> n-best lists


@dataclass
class _Job:
    sentences: list[str]
    tokens: int
    beam: int
    nbest: int
    done: Callable[[list[list[tuple[str, float]]] | None, BaseException | None], None]


class DecodeProcess:
    """A model directory loaded in a spawned process of its own, decoding one batch at a time.

    Calls block the calling thread (not the GIL) until the process answers. Only lists of strings
    and numbers cross the pipe, between this server's own processes.

    Args:
        directory: the model directory, loaded as a :class:`Translator` in the process.
        device: as for :meth:`Translator.load`.
        precision: as for :meth:`Translator.load`.
        threads: torch intra-op threads in the process.
    """

    def __init__(self, directory: str | Path, device: str, precision: str, threads: int) -> None:
        context = multiprocessing.get_context("spawn")  # no fork of a threaded server
        self._connection, child = context.Pipe()
        self._process = context.Process(
            target=_decode_loop, args=(child, str(directory), device, precision, threads),
            name="seq2seq-decoder", daemon=True,
        )  # fmt: skip

    def start(self) -> None:
        """Start the process and wait until its model is loaded.

        Raises:
            RuntimeError: the process could not load the model (its message).
        """
        self._process.start()
        kind, message = self._connection.recv()
        if kind != "ready":
            raise RuntimeError(message)

    def __call__(self, sentences: list[str], nbest: int, beam: int) -> NBest:
        self._connection.send((sentences, nbest, beam))
        kind, payload = self._connection.recv()
        if kind != "ok":
            raise RuntimeError(payload)
        return [[(text, score) for text, score in hyps] for hyps in payload]

    def close(self) -> None:
        """End the process (after the batch it is decoding, if any)."""
        if self._process.is_alive():
            self._connection.send(None)
            self._process.join(timeout=30)
        if self._process.is_alive():
            self._process.terminate()


def _decode_loop(connection: Any, directory: str, device: str, precision: str, threads: int):
    import torch

    torch.set_num_threads(threads)
    try:
        translator = Translator.load(directory, device=device, precision=precision)
    except Exception as error:  # reported to the parent, which refuses to start
        connection.send(("error", f"decoder process: {error}"))
        return
    connection.send(("ready", None))
    while (message := connection.recv()) is not None:
        sentences, nbest, beam = message
        try:
            connection.send(("ok", translator.translate_nbest(sentences, nbest=nbest, beam=beam)))
        except Exception as error:
            connection.send(("error", f"{type(error).__name__}: {error}"))


class Batcher:
    """Worker threads that decode the requests queued for a :class:`Translator` in batches.

    Args:
        translator: the model; its ``translate_nbest`` decodes when no ``decoders`` are given.
        max_wait_ms: how long a worker waits for more requests after the first one.
        max_batch_tokens: stop collecting once the collected sources have this many tokens.
        decoders: one worker thread per decoder, all taking from one queue; each decoder is
            called from its own thread only. None: ``translator.translate_nbest``, one thread.
    """

    def __init__(
        self,
        translator: Translator,
        max_wait_ms: float,
        max_batch_tokens: int,
        decoders: Sequence[Decoder] | None = None,
    ) -> None:
        self.translator = translator
        self.max_wait = max_wait_ms / 1000.0
        self.max_batch_tokens = max_batch_tokens
        self.decoders: list[Decoder] = list(decoders) if decoders else [self._in_process]
        self.requests = self.sentences = self.batches = 0
        self.busy_seconds = 0.0
        self._queue: queue.Queue[_Job | None] = queue.Queue()
        self._threads: list[threading.Thread] = []
        self._counting = threading.Lock()

    def _in_process(self, sentences: list[str], nbest: int, beam: int) -> NBest:
        return self.translator.translate_nbest(sentences, nbest=nbest, beam=beam)

    def start(self) -> None:
        self._threads = [
            threading.Thread(target=self._run, args=(decoder,), name="seq2seq-batcher", daemon=True)
            for decoder in self.decoders
        ]
        for thread in self._threads:
            thread.start()

    def stop(self) -> None:
        """Finish the queued requests, then end the workers."""
        for _ in self._threads:
            self._queue.put(None)
        for thread in self._threads:
            thread.join()
        rest = []  # requests queued behind the stops still get answers
        while not self._queue.empty():
            rest.append(self._queue.get())
        self._decode(self.decoders[0], [job for job in rest if job is not None])

    async def translate(
        self, sentences: list[str], tokens: int, beam: int, nbest: int
    ) -> list[list[tuple[str, float]]]:
        """Queue ``sentences`` and wait for their n-best lists (in order)."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future = loop.create_future()

        def settle(future: asyncio.Future, result: Any, error: BaseException | None) -> None:
            if future.done():  # the client went away and the handler was cancelled
                return
            if error is not None:
                future.set_exception(error)
            else:
                future.set_result(result)

        def done(result: Any, error: BaseException | None) -> None:
            loop.call_soon_threadsafe(settle, future, result, error)

        self._queue.put(_Job(sentences, tokens, beam, nbest, done))
        return await future

    def counters(self) -> dict[str, float]:
        """Requests, sentences and batches decoded, and the seconds spent decoding."""
        return {"requests": self.requests, "sentences": self.sentences, "batches": self.batches,
                "busy_seconds": self.busy_seconds}  # fmt: skip

    def _run(self, decoder: Decoder) -> None:
        carry: _Job | None = None
        while True:
            first = carry if carry is not None else self._queue.get()
            carry = None
            if first is None:
                return
            jobs, tokens, stopping = [first], first.tokens, False
            deadline = time.monotonic() + self.max_wait
            while tokens < self.max_batch_tokens:
                try:
                    job = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    break
                if job is None:
                    stopping = True
                    break
                if tokens + job.tokens > self.max_batch_tokens:
                    carry = job
                    break
                jobs.append(job)
                tokens += job.tokens
            self._decode(decoder, jobs)
            if stopping:
                return

    def _decode(self, decoder: Decoder, jobs: list[_Job]) -> None:
        groups: dict[tuple[int, int], list[_Job]] = {}
        for job in jobs:
            groups.setdefault((job.beam, job.nbest), []).append(job)
        for (beam, nbest), group in groups.items():
            sentences = [sentence for job in group for sentence in job.sentences]
            start = time.perf_counter()
            try:
                results = decoder(sentences, nbest, beam)
            except Exception as error:  # the callers get a 500; the worker lives on
                for job in group:
                    job.done(None, error)
                continue
            finally:
                with self._counting:
                    self.busy_seconds += time.perf_counter() - start
            with self._counting:
                self.batches += 1
                self.requests += len(group)
                self.sentences += len(sentences)
            start = 0
            for job in group:
                job.done(results[start : start + len(job.sentences)], None)
                start += len(job.sentences)
