"""Load test of ``seq2seq serve`` on loopback: served throughput and latency against offline decoding.

    python benchmarks/bench_serve.py --model runs/multi30k/avg      # 16 clients x 50 requests
    python benchmarks/bench_serve.py --clients 4 --requests 5       # a tiny random model, a smoke run

Each of ``--clients`` threads sends ``--requests`` POST /translate requests of 1 to
``--max-per-request`` sentences drawn (seeded) from Multi30k test2016 (``$SEQ2SEQ_DATA/multi30k``;
generated text when absent), one keep-alive connection per client, each request as soon as the
previous one answered. First the same sentences, in the same order, are translated offline in one
``Translator.translate`` call in this process (same threads, precision, beam); then the server runs
in a subprocess with the same ``--threads`` intra-op threads in all, split over its
``--decode-workers`` decoder processes (2 by default: one thread each). Printed: sentences/s served
and offline and their ratio, request latency p50/p99, the server's mean batch size, how busy its
decoders were, and the number of requests lost
(no 200 or the wrong count of translations) and of sentences whose served translation differs from
the offline one (routing errors would show here; so would a different batch composition changing
a near-tie, which fp32 makes rare).
"""

from __future__ import annotations

import argparse
import gzip
import http.client
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

from seq2seq.api import Translator
from seq2seq.checkpoint import save_checkpoint
from seq2seq.config import ModelConfig, RunConfig, replace
from seq2seq.model import build_model
from seq2seq.tokenizer import CharVocab, Tokenizer

TINY_CHARS = "abcdefghijklmnopqrstuvwxyzäöüßABCDEFGHIJKLMNOPQRSTUVWXYZÄÖÜ0123456789 .,!?'-"


def tiny_model(directory: Path) -> Path:
    """A random-weight char-level Transformer: exercises the server, says nothing about quality."""
    torch.manual_seed(0)
    model_config = ModelConfig(
        d_model=64, n_heads=4, d_ff=128, n_encoder_layers=2, n_decoder_layers=2, dropout=0.0,
        max_positions=256,
    )  # fmt: skip
    config = replace(
        RunConfig(model=model_config),
        data={"tokenizer": "char"},
        decode={"beam_size": 5, "max_len_a": 0.0, "max_len_b": 20},
    )
    tokenizer = Tokenizer("char", CharVocab(TINY_CHARS))
    model = build_model(config.model, tokenizer.src_vocab_size, tokenizer.tgt_vocab_size)
    return save_checkpoint(directory, model, config, tokenizer)


def test_sentences(data: str | None, lang: str) -> list[str]:
    root = Path(data or os.environ.get("SEQ2SEQ_DATA", "")) / "multi30k"
    path = root / f"test_2016_flickr.{lang}.gz"
    if path.is_file():
        with gzip.open(path, "rt", encoding="utf-8") as lines:
            return [line.rstrip("\n") for line in lines if line.strip()]
    print(f"bench_serve: {path} not found; using generated sentences", file=sys.stderr)
    rng = random.Random(1)
    words = ["ein", "hund", "läuft", "zwei", "männer", "auf", "der", "straße", "im", "park"]
    return [" ".join(rng.choices(words, k=rng.randint(3, 12))) + "." for _ in range(1000)]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(model: Path, args: argparse.Namespace) -> tuple[subprocess.Popen, int]:
    port = free_port()
    command = [
        sys.executable, "-m", "seq2seq", "serve", "--model", str(model), "--port", str(port),
        "--device", args.device, "--precision", args.precision, "--threads", str(args.threads),
        "--max-wait-ms", str(args.max_wait_ms), "--max-sentences", str(args.max_per_request),
        "--decode-workers", str(args.decode_workers),
    ]  # fmt: skip
    process = subprocess.Popen(command)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if process.poll() is not None:
            sys.exit(f"bench_serve: the server exited with {process.returncode}")
        try:
            status, _ = call(
                http.client.HTTPConnection("127.0.0.1", port, timeout=5), "GET", "/health"
            )
            if status == 200:
                return process, port
        except OSError:
            time.sleep(0.2)
    process.terminate()
    sys.exit("bench_serve: the server did not answer /health within 300 s")


def call(connection: http.client.HTTPConnection, method: str, path: str, body=None):
    payload = None if body is None else json.dumps(body).encode()
    connection.request(method, path, body=payload, headers={"Content-Type": "application/json"})
    response = connection.getresponse()
    return response.status, json.loads(response.read())


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="model directory (default: a tiny random model)")
    parser.add_argument("--data", help="shared data folder (default: $SEQ2SEQ_DATA)")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--requests", type=int, default=50, help="requests per client")
    parser.add_argument("--max-per-request", type=int, default=5, help="sentences: 1 to this")
    parser.add_argument("--beam", type=int, help="beam size (default: the model's)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads, offline and server")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", default="fp32")
    parser.add_argument("--max-wait-ms", type=float, default=5.0, help="server batching wait")
    parser.add_argument("--decode-workers", type=int, default=2,
                        help="server decoder processes, sharing the --threads threads")  # fmt: skip
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory() as scratch:
        model_dir = Path(args.model) if args.model else tiny_model(Path(scratch) / "tiny")
        torch.set_num_threads(args.threads)
        translator = Translator.load(model_dir, device=args.device, precision=args.precision)
        beam = args.beam or translator.config.decode.beam_size
        pool = test_sentences(args.data, translator.source_lang)
        rng = random.Random(args.seed)
        plan = [
            [rng.sample(pool, rng.randint(1, args.max_per_request)) for _ in range(args.requests)]
            for _ in range(args.clients)
        ]
        flat = [s for requests in plan for sentences in requests for s in sentences]
        print(f"bench_serve: {model_dir}, beam {beam}, {args.precision}, {args.threads} threads: "
              f"{args.clients} clients x {args.requests} requests, {len(flat)} sentences",
              file=sys.stderr)  # fmt: skip

        start = time.perf_counter()
        offline = translator.translate(flat, beam=beam)
        offline_seconds = time.perf_counter() - start
        expected = dict(zip(flat, offline))
        del translator

        process, port = start_server(model_dir, args)
        latencies: list[float] = []
        lost = differing = 0
        lock = threading.Lock()
        barrier = threading.Barrier(args.clients + 1)

        def client(requests: list[list[str]]) -> None:
            nonlocal lost, differing
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
            barrier.wait()
            for sentences in requests:
                sent = time.perf_counter()
                try:
                    status, body = call(
                        connection, "POST", "/translate", {"text": sentences, "beam": beam}
                    )
                except (OSError, http.client.HTTPException, ValueError):
                    status, body = 0, {}
                    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
                elapsed = time.perf_counter() - sent
                got = body.get("translations") if status == 200 else None
                with lock:
                    latencies.append(elapsed)
                    if got is None or len(got) != len(sentences):
                        lost += 1
                    else:
                        differing += sum(t != expected[s] for s, t in zip(sentences, got))
            connection.close()

        threads = [threading.Thread(target=client, args=(requests,)) for requests in plan]
        for thread in threads:
            thread.start()
        barrier.wait()
        start = time.perf_counter()
        for thread in threads:
            thread.join()
        served_seconds = time.perf_counter() - start
        counters = call(http.client.HTTPConnection("127.0.0.1", port), "GET", "/health")[1]
        process.terminate()
        process.wait(timeout=60)

    batching = next(iter(counters["batching"].values()))
    result = {
        "model": str(args.model or "tiny random"),
        "clients": args.clients,
        "requests": args.clients * args.requests,
        "sentences": len(flat),
        "beam": beam,
        "precision": args.precision,
        "threads": args.threads,
        "decode_workers": args.decode_workers,
        "served_sentences_per_s": len(flat) / served_seconds,
        "offline_sentences_per_s": len(flat) / offline_seconds,
        "ratio": offline_seconds / served_seconds,
        "latency_p50_ms": 1000 * statistics.median(latencies),
        "latency_p99_ms": 1000 * percentile(latencies, 0.99),
        "mean_batch_sentences": batching["sentences"] / max(1, batching["batches"]),
        "decoders_busy": batching["busy_seconds"] / served_seconds / args.decode_workers,
        "lost_requests": lost,
        "sentences_differing_from_offline": differing,
        "load_average": os.getloadavg()[0],
    }
    print(
        f"served:  {result['served_sentences_per_s']:.1f} sentences/s "
        f"(p50 {result['latency_p50_ms']:.0f} ms, p99 {result['latency_p99_ms']:.0f} ms per request, "
        f"mean batch {result['mean_batch_sentences']:.1f} sentences, "
        f"{args.decode_workers} decoder(s) busy {100 * result['decoders_busy']:.0f}% of the time)\n"
        f"offline: {result['offline_sentences_per_s']:.1f} sentences/s (one translate call)\n"
        f"ratio served/offline: {result['ratio']:.2f}\n"
        f"lost requests: {lost}; sentences differing from offline: {differing} of {len(flat)}; "
        f"load average {result['load_average']:.1f}"
    )
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    return 0 if lost == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
