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
- ``POST /attention`` ``{"text": "...", "target": "...", "beam": 5, "model": "avg"}`` (only
  ``text`` required) -> ``{"model", "source", "target", "layers", "heads", "weights"}``: the
  cross-attention of :func:`seq2seq.attention.attention_maps` as nested lists (layers, heads,
  target pieces, source pieces), each row summing to 1, with the pieces as labels; without
  ``target``, the target is the model's beam output;
- ``GET /health`` (status and batching counters) and ``GET /models`` (name, id, kind, languages,
  parameters, precision, device, the longest source accepted).

Dynamic batching (:mod:`seq2seq.batching`): every translation model has one worker thread that
decodes the requests queued within ``max_wait_ms`` of each other in one batch.

Limits (:class:`ServeLimits`): body bytes and sentences per request (413), a sentence longer
than the model accepts, out-of-range settings, wrong types, unknown keys (422), malformed JSON
or the wrong kind of model (400), unknown model (404).
"""

import argparse
import asyncio
import contextlib
import dataclasses
import importlib.resources
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from seq2seq.api import LanguageModel, Translator
from seq2seq.attention import attention_maps
from seq2seq.batching import Batcher, DecodeProcess
from seq2seq.checkpoint import CheckpointError, load_config_file
from seq2seq.config import ConfigError
from seq2seq.serve_requests import (
    BodyLimit,
    RequestError,
    ServeLimits,
    fields,
    finite,
    in_range,
    parse_json,
    type_name,
)

__all__ = ["Batcher", "RequestError", "ServeLimits", "create_app", "load_models", "main"]


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


def create_app(
    models: Sequence[Translator | LanguageModel],
    limits: ServeLimits | None = None,
    directories: Sequence[str | Path] | None = None,
):
    """The FastAPI application serving ``models`` (see the module docstring for the endpoints).

    Args:
        models: loaded translators and language models, in the order that numbers them.
        limits: request bounds and batching settings; the defaults when None.
        directories: each model's directory, which ``limits.decode_workers > 1`` loads again in
            each decoder process; with 1 (or None here), translators decode in this process.

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
    in_process = limits.decode_workers <= 1 or directories is None
    threads = max(1, torch.get_num_threads() // max(1, limits.decode_workers))
    processes = {
        name: [
            DecodeProcess(directory, str(model.device), model.precision.precision, threads)
            for _ in range(limits.decode_workers)
        ]
        for name, model, directory in zip(named, models, directories or [])
        if isinstance(model, Translator) and not in_process
    }
    batchers = {
        name: Batcher(model, limits.max_wait_ms, limits.max_batch_tokens, processes.get(name))
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
        in_range("beam", beam, 1, limits.max_beam)
        in_range("nbest", nbest, 1, beam)
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
        decoders = [process for group in processes.values() for process in group]
        await asyncio.gather(*(asyncio.to_thread(process.start) for process in decoders))
        for batcher in batchers.values():
            batcher.start()
        yield
        for batcher in batchers.values():
            await asyncio.to_thread(batcher.stop)
        for process in decoders:
            await asyncio.to_thread(process.close)

    app = FastAPI(title="seq2seq serve", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.add_middleware(BodyLimit, max_bytes=limits.max_body_bytes)

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
        body = fields(
            parse_json(await request.body()),
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
            "scores": [finite(hyps[0][1]) for hyps in results],
        }
        if nbest > 1:
            response["nbest"] = [
                [{"text": text, "score": finite(score)} for text, score in hyps] for hyps in results
            ]
        return response

    @app.post("/translator/translate")
    async def onmt_translate(request: Request):
        body = parse_json(await request.body())
        if not isinstance(body, list):
            raise RequestError(422, f"body: expected an array of objects, got {type_name(body)}")
        items = [
            fields(item, {"src": "string", "id": "integer or string"}, f"body[{index}]")
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
                              "pred_score": finite(score)}  # fmt: skip

        await asyncio.gather(*(run(name, indices) for name, indices in groups.items()))
        return [outputs]

    attention_slot = asyncio.Semaphore(1)  # one map at a time: each is a decode beside the batcher

    @app.post("/attention")
    async def attention_endpoint(request: Request):
        body = fields(
            parse_json(await request.body()),
            {"text": "string", "target": "string", "beam": "integer", "model": "string"},
        )
        if body.get("text") is None:
            raise RequestError(422, "body.text: required (a string)")
        name, translator = lookup(body.get("model"), Translator)
        text, target = body["text"], body.get("target")
        if not text.strip():
            raise RequestError(422, "body.text: empty; there is no attention to show")
        limit = min(translator.max_source_tokens, limits.max_attention_tokens)
        sides = [("text", translator.source_lengths([text])[0])]
        if target is not None:
            sides.append(("target", len(translator.tokenizer.encode_target(target))))
        for key, length in sides:
            if length > limit:
                raise RequestError(
                    422, f"body.{key}: {length} tokens; the attention view takes at most {limit}"
                )
        beam = translator.config.decode.beam_size if body.get("beam") is None else body["beam"]
        in_range("beam", beam, 1, limits.max_beam)
        decode = dataclasses.replace(translator.config.decode, beam_size=beam, nbest=1)
        async with attention_slot:
            maps = await asyncio.to_thread(
                attention_maps, translator.model, translator.tokenizer, text, target, decode,
                translator.device,
            )  # fmt: skip
        weights = maps.weights["cross"]
        return {
            "model": name,
            "source": maps.keys["cross"],
            "target": maps.queries["cross"],
            "layers": weights.shape[0],
            "heads": weights.shape[1],
            "weights": weights.tolist(),
        }

    @app.post("/generate")
    async def generate_endpoint(request: Request):
        body = fields(
            parse_json(await request.body()),
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
        in_range("max_new_tokens", max_new, 0, limits.max_new_tokens)
        temperature = body.get("temperature")
        top_k, top_p = body.get("top_k"), body.get("top_p")
        for key, value, high in (("temperature", temperature, 100.0), ("top_k", top_k, 1 << 31)):
            if value is not None:
                in_range(key, value, 0, high)
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
            torch.set_num_threads(args.threads)
        if args.decode_workers < 1:
            raise ValueError(f"--decode-workers must be >= 1, got {args.decode_workers}")
        for directory in args.model:
            if not Path(directory).is_dir():
                raise CheckpointError(f"{directory}: no such model directory")
        models = load_models(args.model, args.device, args.precision)
    except (CheckpointError, ConfigError, ValueError) as error:
        print(f"seq2seq serve: error: {error}", file=sys.stderr)
        return 2
    app = create_app(models, limits, args.model)
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
