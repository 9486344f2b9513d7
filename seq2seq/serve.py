"""HTTP serving of model directories, with dynamic batching over the Python API.

    seq2seq serve --model runs/m30k/avg [--model runs/gpt ...] [--host 127.0.0.1] [--port 8000]

Needs the ``serve`` extra (``pip install 'seq2seq[serve]'``: FastAPI and uvicorn). Each model is
named after its directory (``avg``, then ``avg-2`` for a second one of that name) and numbered
from 0 in ``--model`` order. Endpoints (errors are ``{"error": "one line"}`` with a 4xx status):

- ``GET /``: a page to try the translation models (one sentence per line, a beam choice);
- ``POST /translate`` ``{"text": ["..."], "beam": 5, "nbest": 1, "model": "avg"}`` (only ``text``
  required) -> ``{"model", "translations": [...], "scores": [...]}`` in input order, plus
  ``"nbest": [[{"text", "score"}, ...], ...]`` when ``nbest > 1``. Scores are length-normalised
  log-probabilities (see :mod:`seq2seq.search`); an empty string translates to ``""``, score 0;
- ``POST /translator/translate``: OpenNMT-py's REST format, ``[{"src": "...", "id": 0}]`` ->
  ``[[{"src", "tgt", "n_best": 1, "pred_score"}, ...]]`` (one inner list, one entry per input in
  order; ``id`` is a model's number or name, the first translation model when absent);
  ``GET /translator/health`` answers ``{"status": "ok"}`` as OpenNMT-py's does;
- ``POST /generate`` ``{"prompt", "max_new_tokens", "temperature", "top_k", "top_p", "seed",
  "model"}`` for GPT directories -> ``{"model", "text"}`` (the prompt and its continuation);
- ``GET /health`` (status and batching counters) and ``GET /models`` (name, id, kind, languages,
  parameters, precision, device, the longest source accepted).

Dynamic batching: every translation model has one worker thread and a queue. The worker takes the
first waiting request, then keeps taking requests until ``max_wait_ms`` has passed or their
sources reach ``max_batch_tokens``, and decodes all of them (grouped by beam and n-best) in one
:meth:`Translator.translate_nbest` call (length-sorted token-budget batches). Requests arriving
meanwhile form the next batch, so batches grow with the load; each future gets its own results.

Limits (:class:`ServeLimits`): body bytes and sentences per request (413), a sentence longer
than the model accepts, out-of-range settings, wrong types, unknown keys (422), malformed JSON
or the wrong kind of model (400), unknown model (404).
"""

import argparse
import asyncio
import contextlib
import dataclasses
import importlib.resources
import json
import math
import queue
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from seq2seq.api import LanguageModel, Translator
from seq2seq.checkpoint import CheckpointError, load_config_file
from seq2seq.config import ConfigError


@dataclass(frozen=True)
class ServeLimits:
    """What one request may ask for, and how long the batcher waits for company."""

    max_body_bytes: int = 1 << 20
    max_sentences: int = 64
    max_beam: int = 16
    max_new_tokens: int = 1024
    max_prompt_chars: int = 20_000
    max_wait_ms: float = 5.0
    max_batch_tokens: int = 8192  # source tokens (EOS excluded) collected into one batch


class RequestError(Exception):
    """A bad request: its HTTP status and a one-line message for the client."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


# ------------------------------------------------------------------------------ batching


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

    def counters(self) -> dict[str, int]:
        return {"requests": self.requests, "sentences": self.sentences, "batches": self.batches}

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
            try:
                results = self.translator.translate_nbest(sentences, nbest=nbest, beam=beam)
            except Exception as error:  # the callers get a 500; the worker lives on
                for job in group:
                    job.done(None, error)
                continue
            self.batches += 1
            self.requests += len(group)
            self.sentences += len(sentences)
            start = 0
            for job in group:
                job.done(results[start : start + len(job.sentences)], None)
                start += len(job.sentences)


# ------------------------------------------------------------------------- request checks


def _parse_json(raw: bytes) -> Any:
    try:
        return json.loads(raw)
    except UnicodeDecodeError:
        raise RequestError(400, "malformed JSON: the body is not UTF-8") from None
    except json.JSONDecodeError as error:
        raise RequestError(400, f"malformed JSON: {error}") from None


def _type_name(value: Any) -> str:
    return {dict: "object", list: "array", str: "string", bool: "boolean"}.get(
        type(value), "null" if value is None else "number"
    )


def _fields(body: Any, allowed: dict[str, str], where: str = "body") -> dict[str, Any]:
    """``body`` checked to be a JSON object with only ``allowed`` keys (key -> expected kind)."""
    if not isinstance(body, dict):
        raise RequestError(422, f"{where}: expected a JSON object, got {_type_name(body)}")
    unknown = sorted(set(body) - set(allowed))
    if unknown:
        raise RequestError(
            422, f"{where}: unknown key {unknown[0]!r} (expected {', '.join(allowed)})"
        )
    for key, kind in allowed.items():
        value = body.get(key)
        if value is None:
            continue
        ok = {
            "string": isinstance(value, str),
            "integer": isinstance(value, int) and not isinstance(value, bool),
            "number": isinstance(value, (int, float)) and not isinstance(value, bool),
            "array of strings": isinstance(value, list),
            "integer or string": isinstance(value, (int, str)) and not isinstance(value, bool),
        }[kind]
        if not ok:
            raise RequestError(422, f"{where}.{key}: expected {kind}, got {_type_name(value)}")
        if kind == "array of strings":
            for index, item in enumerate(value):
                if not isinstance(item, str):
                    raise RequestError(
                        422, f"{where}.{key}[{index}]: expected a string, got {_type_name(item)}"
                    )
        if kind == "number" and not math.isfinite(value):
            raise RequestError(422, f"{where}.{key}: must be a finite number")
    return body


def _in_range(where: str, value: int | float, low: float, high: float) -> None:
    if not low <= value <= high:
        raise RequestError(422, f"{where}: {value} is outside [{low:g}, {high:g}]")


def _finite(score: float) -> float | None:
    return score if math.isfinite(score) else None  # JSON has no -inf


# -------------------------------------------------------------------------------- the app


def _unique_names(models: Sequence[Translator | LanguageModel]) -> list[str]:
    names: list[str] = []
    for model in models:
        base = model.name or "model"
        name, n = base, 1
        while name in names:
            n += 1
            name = f"{base}-{n}"
        names.append(name)
    return names


def _page() -> str:
    return importlib.resources.files("seq2seq").joinpath("static/index.html").read_text("utf-8")


def create_app(models: Sequence[Translator | LanguageModel], limits: ServeLimits | None = None):
    """The FastAPI application serving ``models`` (see the module docstring for the endpoints).

    Args:
        models: loaded translators and language models, in the order that numbers them.
        limits: request bounds and batching settings; the defaults when None.

    Returns:
        A ``fastapi.FastAPI`` app; its lifespan starts and stops one batcher per translator.
    """
    from fastapi import FastAPI, Request
    from fastapi.responses import HTMLResponse, JSONResponse
    from starlette.exceptions import HTTPException

    limits = limits or ServeLimits()
    if not models:
        raise ValueError("no models to serve")
    named = dict(zip(_unique_names(models), models))
    numbered = list(named)
    batchers = {
        name: Batcher(model, limits.max_wait_ms, limits.max_batch_tokens)
        for name, model in named.items()
        if isinstance(model, Translator)
    }
    page = _page()

    def lookup(key: Any, kind: type) -> tuple[str, Any]:
        if key is None:
            for name, model in named.items():
                if isinstance(model, kind):
                    return name, model
            raise RequestError(400, f"no {_KIND[kind]} model is served here")
        name = numbered[key] if isinstance(key, int) and 0 <= key < len(numbered) else key
        if name not in named:
            raise RequestError(404, f"unknown model {key!r} (served: {', '.join(numbered)})")
        if not isinstance(named[name], kind):
            other = "/generate" if kind is Translator else "/translate"
            raise RequestError(400, f"model {name!r} is not a {_KIND[kind]} model; use {other}")
        return name, named[name]

    async def translate(name: str, sentences: list[str], beam: Any, nbest: Any, where: str):
        translator: Translator = named[name]
        if len(sentences) > limits.max_sentences:
            raise RequestError(
                413,
                f"{where}: {len(sentences)} sentences; at most {limits.max_sentences} a request",
            )
        beam = translator.config.decode.beam_size if beam is None else beam
        nbest = 1 if nbest is None else nbest
        _in_range("beam", beam, 1, limits.max_beam)
        _in_range("nbest", nbest, 1, beam)
        lengths = translator.source_lengths([s if s.strip() else "" for s in sentences])
        for index, length in enumerate(lengths):
            if length > translator.max_source_tokens:
                raise RequestError(
                    422,
                    f"{where}[{index}]: {length} tokens; model {name!r} accepts at most "
                    f"{translator.max_source_tokens}",
                )
        return await batchers[name].translate(list(sentences), sum(lengths), beam, nbest)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        for batcher in batchers.values():
            batcher.start()
        yield
        for batcher in batchers.values():
            await asyncio.to_thread(batcher.stop)

    app = FastAPI(title="seq2seq serve", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.add_middleware(_BodyLimit, max_bytes=limits.max_body_bytes)

    @app.exception_handler(RequestError)
    async def request_error(request: Request, error: RequestError):
        return JSONResponse({"error": error.message}, status_code=error.status)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, error: HTTPException):
        return JSONResponse({"error": str(error.detail)}, status_code=error.status_code)

    @app.get("/", response_class=HTMLResponse)
    async def index():
        return page

    @app.get("/health")
    async def health():
        counters = {name: batcher.counters() for name, batcher in batchers.items()}
        return {"status": "ok", "models": len(named), "batching": counters}

    @app.get("/translator/health")
    async def onmt_health():
        return {"status": "ok"}

    @app.get("/models")
    async def list_models():
        return [_describe(index, name, model) for index, (name, model) in enumerate(named.items())]

    @app.post("/translate")
    async def translate_endpoint(request: Request):
        body = _fields(
            _parse_json(await request.body()),
            {"text": "array of strings", "beam": "integer", "nbest": "integer", "model": "string"},
        )
        if body.get("text") is None:
            raise RequestError(422, "body.text: required (an array of strings)")
        name, _ = lookup(body.get("model"), Translator)
        nbest = 1 if body.get("nbest") is None else body["nbest"]
        results = await translate(name, body["text"], body.get("beam"), nbest, "body.text")
        response: dict[str, Any] = {
            "model": name,
            "translations": [hyps[0][0] for hyps in results],
            "scores": [_finite(hyps[0][1]) for hyps in results],
        }
        if nbest > 1:
            response["nbest"] = [
                [{"text": text, "score": _finite(score)} for text, score in hyps]
                for hyps in results
            ]
        return response

    @app.post("/translator/translate")
    async def onmt_translate(request: Request):
        body = _parse_json(await request.body())
        if not isinstance(body, list):
            raise RequestError(422, f"body: expected an array of objects, got {_type_name(body)}")
        items = [
            _fields(item, {"src": "string", "id": "integer or string"}, f"body[{index}]")
            for index, item in enumerate(body)
        ]
        if len(items) > limits.max_sentences:
            raise RequestError(
                413, f"body: {len(items)} sentences; at most {limits.max_sentences} a request"
            )
        groups: dict[str, list[int]] = {}
        for index, item in enumerate(items):
            if item.get("src") is None:
                raise RequestError(422, f"body[{index}].src: required (a string)")
            name, _ = lookup(item.get("id"), Translator)
            groups.setdefault(name, []).append(index)
        outputs: list[dict[str, Any]] = [{} for _ in items]

        async def run(name: str, indices: list[int]) -> None:
            sources = [items[i]["src"] for i in indices]
            results = await translate(name, sources, None, 1, "body")
            for i, hyps in zip(indices, results):
                text, score = hyps[0]
                outputs[i] = {"src": items[i]["src"], "tgt": text, "n_best": 1,
                              "pred_score": _finite(score)}  # fmt: skip

        await asyncio.gather(*(run(name, indices) for name, indices in groups.items()))
        return [outputs]

    @app.post("/generate")
    async def generate_endpoint(request: Request):
        body = _fields(
            _parse_json(await request.body()),
            {"prompt": "string", "max_new_tokens": "integer", "temperature": "number",
             "top_k": "integer", "top_p": "number", "seed": "integer", "model": "string"},
        )  # fmt: skip
        name, lm = lookup(body.get("model"), LanguageModel)
        prompt = body.get("prompt") or ""
        if len(prompt) > limits.max_prompt_chars:
            raise RequestError(
                422, f"body.prompt: {len(prompt)} characters; at most {limits.max_prompt_chars}"
            )
        decode = lm.config.decode
        max_new = body.get("max_new_tokens")
        max_new = min(decode.max_new_tokens, limits.max_new_tokens) if max_new is None else max_new
        _in_range("max_new_tokens", max_new, 0, limits.max_new_tokens)
        temperature = body.get("temperature")
        top_k, top_p = body.get("top_k"), body.get("top_p")
        for key, value, high in (("temperature", temperature, 100.0), ("top_k", top_k, 1 << 31)):
            if value is not None:
                _in_range(key, value, 0, high)
        if top_p is not None and not 0.0 < top_p <= 1.0:
            raise RequestError(422, f"top_p: {top_p} is outside (0, 1]")
        text = await asyncio.to_thread(
            lm.generate, prompt, max_new, temperature, top_k, top_p, body.get("seed")
        )
        return {"model": name, "text": text}

    return app


_KIND = {Translator: "translation", LanguageModel: "language"}


def _describe(index: int, name: str, model: Translator | LanguageModel) -> dict[str, Any]:
    info: dict[str, Any] = {
        "name": name,
        "id": index,
        "kind": _KIND[type(model)],
        "parameters": model.parameters,
        "precision": model.precision.precision,
        "device": str(model.device),
        "max_positions": model.max_positions,
    }
    if isinstance(model, Translator):
        info.update(
            source_lang=model.source_lang,
            target_lang=model.target_lang,
            max_source_tokens=model.max_source_tokens,
            beam=model.config.decode.beam_size,
        )
    return info


class _BodyLimit:
    """ASGI middleware: a body over ``max_bytes`` (declared or streamed) gets a 413 JSON error
    before the application reads any of it."""

    def __init__(self, app: Any, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        declared = headers.get(b"content-length", b"0")
        too_big = not declared.isdigit() or int(declared) > self.max_bytes
        chunks: list[bytes] = []
        size = 0
        while not too_big:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            too_big = size > self.max_bytes
            if not message.get("more_body", False):
                break
        if too_big:
            payload = json.dumps({"error": f"request body over {self.max_bytes} bytes"}).encode()
            await send({"type": "http.response.start", "status": 413, "headers": [
                (b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode()),
                (b"connection", b"close"),
            ]})  # fmt: skip
            await send({"type": "http.response.body", "body": payload})
            return
        body, replayed = b"".join(chunks), False

        async def replay() -> dict:
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)


# -------------------------------------------------------------------------------------- CLI


def load_models(
    directories: Sequence[str], device: str = "auto", precision: str = "auto"
) -> list[Translator | LanguageModel]:
    """Each directory as a :class:`Translator` or, for ``arch: gpt``, a :class:`LanguageModel`.

    Raises:
        CheckpointError: a missing or corrupt file, named in the message.
        ValueError: an unknown device or precision.
    """
    models: list[Translator | LanguageModel] = []
    for directory in directories:
        arch = load_config_file(directory).model.arch
        kind = LanguageModel if arch == "gpt" else Translator
        models.append(kind.load(directory, device=device, precision=precision))
    return models


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="seq2seq serve",
        description="Serve model directories over HTTP (a page at /, JSON endpoints).",
    )
    p.add_argument("--model", action="append", required=True, metavar="DIR",
                   help="model directory; repeat to serve several")  # fmt: skip
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")
    p.add_argument("--precision", default="auto", help="auto, fp32, bf16 or fp16")
    p.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's)")
    defaults = ServeLimits()
    for field in dataclasses.fields(ServeLimits):
        flag = "--" + field.name.replace("_", "-")
        default = getattr(defaults, field.name)
        p.add_argument(flag, type=type(default), default=default, help=f"default: {default}")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        import uvicorn
    except ImportError:
        print(
            "seq2seq serve: error: needs FastAPI and uvicorn: pip install 'seq2seq[serve]'",
            file=sys.stderr,
        )
        return 2
    limits = ServeLimits(**{f.name: getattr(args, f.name) for f in dataclasses.fields(ServeLimits)})
    try:
        if args.threads is not None:
            if args.threads < 1:
                raise ValueError(f"--threads must be >= 1, got {args.threads}")
            import torch

            torch.set_num_threads(args.threads)
        for directory in args.model:
            if not Path(directory).is_dir():
                raise CheckpointError(f"{directory}: no such model directory")
        models = load_models(args.model, args.device, args.precision)
    except (CheckpointError, ConfigError, ValueError) as error:
        print(f"seq2seq serve: error: {error}", file=sys.stderr)
        return 2
    app = create_app(models, limits)
    for index, (name, model) in enumerate(zip(_unique_names(models), models)):
        print(
            f"serve: model {index} {name!r} ({_KIND[type(model)]}, {model.parameters:,} "
            f"parameters) on {model.device}, {model.precision.describe(args.precision)}",
            file=sys.stderr,
        )
    print(f"serve: http://{args.host}:{args.port}/", file=sys.stderr, flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0


if __name__ == "__main__":
    sys.exit(main())
