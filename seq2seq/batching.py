"""Dynamic batching for ``seq2seq serve``: one worker thread per :class:`Translator` decodes the
requests queued for it together, and each caller's future gets back its own results.

The worker takes the first waiting request, then keeps taking requests until ``max_wait_ms`` has
passed or their sources reach ``max_batch_tokens``, and decodes all of them (grouped by beam and
n-best) in one :meth:`Translator.translate_nbest` call (length-sorted token-budget batches).
Requests arriving meanwhile form the next batch, so batches grow with the load.
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from seq2seq.api import Translator


@dataclass
class _Job:
    sentences: list[str]
    tokens: int
    beam: int
    nbest: int
    done: Callable[[list[list[tuple[str, float]]] | None, BaseException | None], None]


class Batcher:
    """One worker thread that decodes the requests queued for a :class:`Translator` in batches.

    Args:
        translator: the model; only its ``translate_nbest`` is called, from the worker thread.
        max_wait_ms: how long the worker waits for more requests after the first one.
        max_batch_tokens: stop collecting once the collected sources have this many tokens.
    """

    def __init__(self, translator: Translator, max_wait_ms: float, max_batch_tokens: int) -> None:
        self.translator = translator
        self.max_wait = max_wait_ms / 1000.0
        self.max_batch_tokens = max_batch_tokens
        self.requests = self.sentences = self.batches = 0
        self.busy_seconds = 0.0
        self._queue: queue.Queue[_Job | None] = queue.Queue()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="seq2seq-batcher", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Finish the queued requests, then end the worker."""
        self._queue.put(None)
        if self._thread is not None:
            self._thread.join()

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

    def _run(self) -> None:
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
            self._decode(jobs)
            if stopping:  # requests queued behind the stop still get answers
                rest = []
                while not self._queue.empty():
                    rest.append(self._queue.get())
                self._decode([job for job in rest if job is not None])
                return

    def _decode(self, jobs: list[_Job]) -> None:
        groups: dict[tuple[int, int], list[_Job]] = {}
        for job in jobs:
            groups.setdefault((job.beam, job.nbest), []).append(job)
        for (beam, nbest), group in groups.items():
            sentences = [sentence for job in group for sentence in job.sentences]
            start = time.perf_counter()
            try:
                results = self.translator.translate_nbest(sentences, nbest=nbest, beam=beam)
            except Exception as error:  # the callers get a 500; the worker lives on
                for job in group:
                    job.done(None, error)
                continue
            finally:
                self.busy_seconds += time.perf_counter() - start
            self.batches += 1
            self.requests += len(group)
            self.sentences += len(sentences)
            start = 0
            for job in group:
                job.done(results[start : start + len(job.sentences)], None)
                start += len(job.sentences)
