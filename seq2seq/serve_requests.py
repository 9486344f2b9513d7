"""What a ``seq2seq serve`` request may contain: the limits, JSON parsing and type checks with
one-line messages, and an ASGI middleware that bounds the body before anything reads it."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


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
    max_attention_tokens: int = 128  # source or target tokens of an /attention sentence
    decode_workers: int = 1  # >1: that many decoder processes, each with its share of threads


class RequestError(Exception):
    """A bad request: its HTTP status and a one-line message for the client."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def parse_json(raw: bytes) -> Any:
    try:
        return json.loads(raw)
    except UnicodeDecodeError:
        raise RequestError(400, "malformed JSON: the body is not UTF-8") from None
    except json.JSONDecodeError as error:
        raise RequestError(400, f"malformed JSON: {error}") from None


def type_name(value: Any) -> str:
    return {dict: "object", list: "array", str: "string", bool: "boolean"}.get(
        type(value), "null" if value is None else "number"
    )


def fields(body: Any, allowed: dict[str, str], where: str = "body") -> dict[str, Any]:
    """``body`` checked to be a JSON object with only ``allowed`` keys (key -> expected kind)."""
    if not isinstance(body, dict):
        raise RequestError(422, f"{where}: expected a JSON object, got {type_name(body)}")
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
            raise RequestError(422, f"{where}.{key}: expected {kind}, got {type_name(value)}")
        if kind == "array of strings":
            for index, item in enumerate(value):
                if not isinstance(item, str):
                    raise RequestError(
                        422, f"{where}.{key}[{index}]: expected a string, got {type_name(item)}"
                    )
        if kind == "number" and not math.isfinite(value):
            raise RequestError(422, f"{where}.{key}: must be a finite number")
    return body


def in_range(where: str, value: int | float, low: float, high: float) -> None:
    if not low <= value <= high:
        raise RequestError(422, f"{where}: {value} is outside [{low:g}, {high:g}]")


def finite(score: float) -> float | None:
    return score if math.isfinite(score) else None  # JSON has no -inf


class BodyLimit:
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
