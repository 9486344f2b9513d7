"""seq2seq serve: the real server on a loopback port answers in order, in OpenNMT-py's format too,
routes concurrent requests back to their own callers, refuses every bad request with its 4xx, and
its page translates and shows a sentence's cross-attention in headless Chromium; /attention gives
exactly seq2seq.attention's weights. The batcher itself is tested without HTTP."""

from __future__ import annotations

import asyncio
import http.client
import json
import random
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from test_api import tiny_gpt_dir, tiny_translation_dir

pytest.importorskip("fastapi", reason="the serve extra (fastapi, uvicorn) is not installed")
pytest.importorskip("uvicorn", reason="the serve extra (fastapi, uvicorn) is not installed")

from seq2seq.api import LanguageModel, Translator  # noqa: E402
from seq2seq.attention import attention_maps  # noqa: E402
from seq2seq.batching import DecodeProcess  # noqa: E402
from seq2seq.config import DecodeConfig  # noqa: E402
from seq2seq.serve import Batcher, main  # noqa: E402

SENTENCES = ["hello world", "a dog runs.", "two men, one boat!", "ab", "the cat sat", "", "ok?"]
MAX_SENTENCES = 8
MAX_BODY = 20_000
MAX_ATTENTION = 20
CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def dirs(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("serve")
    return tiny_translation_dir(root / "tiny"), tiny_gpt_dir(root / "gpt")


@pytest.fixture(scope="module")
def translator(dirs) -> Translator:
    return Translator.load(dirs[0], device="cpu", precision="fp32")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def server(dirs, tmp_path_factory) -> str:
    """``seq2seq serve`` in a subprocess; yields its base URL."""
    log = tmp_path_factory.mktemp("serve-log") / "server.log"
    for _ in range(3):  # another process may take the free port before the server binds it
        port = _free_port()
        command = [
            sys.executable, "-m", "seq2seq", "serve", "--model", str(dirs[0]), "--model",
            str(dirs[1]), "--port", str(port), "--device", "cpu", "--precision", "fp32",
            "--threads", "1", "--max-sentences", str(MAX_SENTENCES),
            "--max-body-bytes", str(MAX_BODY), "--max-new-tokens", "64",
            "--max-attention-tokens", str(MAX_ATTENTION), "--decode-workers", "2",
        ]  # fmt: skip
        with open(log, "wb") as out:
            process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while process.poll() is None and time.monotonic() < deadline:
            try:
                if request(url, "/health")[0] == 200:
                    break
            except OSError:
                time.sleep(0.2)
        if process.poll() is None:
            break
    else:
        pytest.fail("the server did not start: " + log.read_text(errors="replace")[-2000:])
    yield url
    process.terminate()
    process.wait(timeout=30)


def request(url: str, path: str, body=None, raw: bytes | None = None) -> tuple[int, object]:
    """(status, parsed JSON or text) of GET ``path``, or POST of ``body`` as JSON / ``raw``."""
    data = raw if raw is not None else None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url + path, data=data, method="GET" if data is None else "POST")
    req.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(req, timeout=60) as response:
            status, payload, kind = response.status, response.read(), response.headers
    except urllib.error.HTTPError as error:
        status, payload, kind = error.code, error.read(), error.headers
    if "json" in kind.get("Content-Type", ""):
        return status, json.loads(payload)
    return status, payload.decode()


def test_translate_round_trip_in_order_with_scores(server, translator):
    status, body = request(server, "/translate", {"text": SENTENCES, "beam": 3, "nbest": 2})
    assert status == 200 and body["model"] == "tiny"
    expected = translator.translate_nbest(SENTENCES, nbest=2, beam=3)
    assert body["translations"] == [hyps[0][0] for hyps in expected]
    assert body["scores"] == pytest.approx([hyps[0][1] for hyps in expected], abs=1e-4)
    assert [[h["text"] for h in hyps] for hyps in body["nbest"]] == [
        [text for text, _ in hyps] for hyps in expected
    ]
    assert body["translations"][SENTENCES.index("")] == ""
    # defaults: the model's beam (3), one hypothesis, the first translation model
    status, body = request(server, "/translate", {"text": SENTENCES[::-1]})
    assert status == 200 and "nbest" not in body
    assert body["translations"] == translator.translate(SENTENCES, beam=3)[::-1]


def test_opennmt_py_format(server, translator):
    items = [{"src": "hello world", "id": 0}, {"src": "ab", "id": "tiny"}, {"src": ""}]
    status, body = request(server, "/translator/translate", items)
    assert status == 200 and len(body) == 1 and len(body[0]) == 3
    expected = translator.translate_nbest([item["src"] for item in items], beam=3)
    for item, out, hyps in zip(items, body[0], expected):
        assert set(out) == {"src", "tgt", "n_best", "pred_score"}
        assert out["src"] == item["src"] and out["tgt"] == hyps[0][0] and out["n_best"] == 1
        assert out["pred_score"] == pytest.approx(hyps[0][1], abs=1e-4)
    assert request(server, "/translator/health") == (200, {"status": "ok"})


def test_concurrent_clients_get_exactly_their_own_translations(server, translator):
    rng = random.Random(0)
    jobs = [
        [(rng.sample(SENTENCES, rng.randint(1, 4)), rng.choice([1, 3])) for _ in range(4)]
        for _ in range(8)
    ]
    answers: dict[tuple[int, int], list[str]] = {}
    start = threading.Barrier(len(jobs))

    def client(index: int) -> None:
        start.wait()
        for number, (sentences, beam) in enumerate(jobs[index]):
            status, body = request(server, "/translate", {"text": sentences, "beam": beam})
            answers[index, number] = body["translations"] if status == 200 else [str(body)]

    threads = [threading.Thread(target=client, args=(i,)) for i in range(len(jobs))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    for index, requests in enumerate(jobs):
        for number, (sentences, beam) in enumerate(requests):
            assert answers[index, number] == translator.translate(sentences, beam=beam)
    counters = request(server, "/health")[1]["batching"]["tiny"]
    print("batching counters after the concurrent clients:", counters)
    assert counters["requests"] >= sum(len(requests) for requests in jobs)


def test_models_and_page(server):
    status, models = request(server, "/models")
    assert status == 200 and [m["name"] for m in models] == ["tiny", "gpt"]
    tiny, gpt = models
    assert tiny["kind"] == "translation" and gpt["kind"] == "language"
    assert (tiny["source_lang"], tiny["target_lang"], tiny["max_source_tokens"]) == ("de", "en", 31)
    assert tiny["parameters"] > 0 and tiny["precision"] == "fp32" and tiny["id"] == 0
    status, page = request(server, "/")
    assert status == 200 and '<textarea id="source"' in page and 'id="beam"' in page
    for external in ("http://", "https://", "//cdn", "src=", "<link"):
        assert external not in page  # everything inline: the page works offline


def test_generate_is_seeded_and_equals_the_api(server, dirs):
    lm = LanguageModel.load(dirs[1], device="cpu", precision="fp32")
    body = {"prompt": "abc", "max_new_tokens": 12, "temperature": 0.9, "top_k": 5, "seed": 4}
    status, first = request(server, "/generate", body)
    assert status == 200 and first["model"] == "gpt"
    assert request(server, "/generate", body)[1] == first
    assert first["text"] == lm.generate("abc", 12, 0.9, 5, None, seed=4)


BAD_REQUESTS = [
    ("/translate", b'{"text": ["a"', 400, "malformed JSON"),
    ("/translate", b"\xff\xfe", 400, "malformed JSON"),
    ("/translate", b'["a"]', 422, "expected a JSON object"),
    ("/translate", b'{"text": "abc"}', 422, "body.text: expected array of strings"),
    ("/translate", b'{"text": ["a", 1]}', 422, r"body.text\[1\]: expected a string"),
    ("/translate", b'{"beam": 2}', 422, "body.text: required"),
    ("/translate", b'{"text": ["a"], "beam": "5"}', 422, "body.beam: expected integer"),
    ("/translate", b'{"text": ["a"], "beam": true}', 422, "body.beam: expected integer"),
    ("/translate", b'{"text": ["a"], "beam": 0}', 422, "beam: 0 is outside"),
    ("/translate", b'{"text": ["a"], "beam": 17}', 422, "beam: 17 is outside"),
    ("/translate", b'{"text": ["a"], "beam": 2, "nbest": 3}', 422, "nbest: 3 is outside"),
    ("/translate", b'{"text": ["a"], "beam_size": 2}', 422, "unknown key 'beam_size'"),
    ("/translate", json.dumps({"text": ["a"] * 9}).encode(), 413, "9 sentences; at most 8"),
    ("/translate", json.dumps({"text": ["ok", "a" * 40]}).encode(), 422, r"text\[1\]: 40 tokens"),
    ("/translate", b'{"text": ["a"], "model": "nope"}', 404, "unknown model 'nope'"),
    ("/translate", b'{"text": ["a"], "model": "gpt"}', 400, "use /generate"),
    ("/translate", json.dumps({"text": ["a" * 30] * 700}).encode(), 413, "body over 20000 bytes"),
    ("/translator/translate", b'{"src": "a"}', 422, "expected an array of objects"),
    ("/translator/translate", b'[{"id": 0}]', 422, r"body\[0\].src: required"),
    ("/translator/translate", b'[{"src": "a", "id": 7}]', 404, "unknown model 7"),
    ("/translator/translate", b'[{"src": 5}]', 422, r"body\[0\].src: expected string"),
    ("/generate", b'{"prompt": "a", "max_new_tokens": 65}', 422, "max_new_tokens: 65 is outside"),
    ("/generate", b'{"prompt": "a", "top_p": 0}', 422, "top_p: 0 is outside"),
    ("/generate", b'{"prompt": "a", "temperature": -1}', 422, "temperature: -1 is outside"),
    ("/generate", b'{"prompt": 3}', 422, "body.prompt: expected string"),
    ("/generate", b'{"prompt": "a", "model": "tiny"}', 400, "use /translate"),
    ("/attention", b'{"beam": 2}', 422, "body.text: required"),
    ("/attention", b'{"text": ["a"]}', 422, "body.text: expected string"),
    ("/attention", b'{"text": "  "}', 422, "body.text: empty"),
    ("/attention", json.dumps({"text": "a" * 21}).encode(), 422, "text: 21 tokens; the atten"),
    ("/attention", json.dumps({"text": "a", "target": "b" * 25}).encode(), 422, "target: 25 tok"),
    ("/attention", b'{"text": "a", "beam": 0}', 422, "beam: 0 is outside"),
    ("/attention", b'{"text": "a", "model": "gpt"}', 400, "use /generate"),
    ("/attention", b'{"text": "a", "model": "nope"}', 404, "unknown model 'nope'"),
    ("/nothing", b"{}", 404, "Not Found"),
]


def test_every_bad_request_gets_its_4xx_and_the_server_lives_on(server, translator):
    for path, raw, status, pattern in BAD_REQUESTS:
        got_status, body = request(server, path, raw=raw)
        assert (got_status, isinstance(body, dict)) == (status, True), (path, raw[:60], body)
        assert list(body) == ["error"], body
        assert re.search(pattern, body["error"]), (pattern, body["error"])
    # a chunked body declares no length: the bound holds while it streams in
    connection = http.client.HTTPConnection(server.removeprefix("http://"), timeout=60)
    chunks = iter([b'{"text": ["', *[b"a" * 1000] * 30, b'"]}'])
    connection.request("POST", "/translate", body=chunks, encode_chunked=True)
    response = connection.getresponse()
    assert response.status == 413 and b"body over 20000 bytes" in response.read()
    connection.close()
    status, body = request(server, "/translate", {"text": ["hello world"]})
    assert status == 200 and body["translations"] == translator.translate(["hello world"], beam=3)


def test_attention_endpoint_gives_attention_maps_cross_weights(server, translator):
    for target in (None, "a cat"):
        body = {"text": "hello world", "beam": 2} | ({} if target is None else {"target": target})
        status, got = request(server, "/attention", body)
        assert status == 200 and got["model"] == "tiny", got
        maps = attention_maps(
            translator.model, translator.tokenizer, "hello world", target,
            DecodeConfig(beam_size=2, max_len_a=1.0, max_len_b=5), "cpu",
        )  # fmt: skip
        expected = maps.weights["cross"]
        assert (got["layers"], got["heads"]) == tuple(expected.shape[:2]) == (2, 4)
        assert got["source"] == maps.keys["cross"] and got["target"] == maps.queries["cross"]
        assert got["weights"] == expected.tolist()  # float32 values survive JSON exactly
        for layer in got["weights"]:
            for head in layer:
                assert [sum(row) for row in head] == pytest.approx([1.0] * len(head), abs=1e-5)
    assert got["target"][-1] == "</s>" and len(got["target"]) == len("a cat") + 1


class _ScriptedTranslator:
    """Records each translate_nbest call; the "translation" is the sentence upper-cased."""

    def __init__(self, fail_on: str = "") -> None:
        self.calls: list[list[str]] = []
        self.fail_on = fail_on

    def translate_nbest(self, sentences, nbest, beam):
        self.calls.append(list(sentences))
        if self.fail_on in sentences:
            raise RuntimeError("scripted failure")
        return [[(s.upper(), -float(beam))] * nbest for s in sentences]


def _run_batched(batcher: Batcher, requests: list[tuple[list[str], int, int]]) -> list:
    async def go():
        tasks = [
            asyncio.create_task(batcher.translate(sentences, len(sentences), beam, nbest))
            for sentences, beam, nbest in requests
        ]
        await asyncio.sleep(0)  # every task queues its request before the worker starts
        batcher.start()
        return await asyncio.gather(*tasks, return_exceptions=True)

    try:
        return asyncio.run(go())
    finally:
        batcher.stop()


def test_batcher_decodes_queued_requests_together_and_routes_results_back():
    requests = [(["a", "b"], 4, 1), (["c"], 4, 1), (["d", "e", "f"], 4, 1), (["g"], 2, 2)]
    fake = _ScriptedTranslator()
    results = _run_batched(Batcher(fake, max_wait_ms=50, max_batch_tokens=100), requests)
    assert fake.calls == [["a", "b", "c", "d", "e", "f"], ["g"]]  # grouped by (beam, nbest)
    for (sentences, beam, nbest), result in zip(requests, results):
        assert result == [[(s.upper(), -float(beam))] * nbest for s in sentences]

    # the token bound splits the queue (each sentence counts one token here)
    fake = _ScriptedTranslator()
    _run_batched(Batcher(fake, max_wait_ms=50, max_batch_tokens=3), requests[:3])
    assert fake.calls == [["a", "b", "c"], ["d", "e", "f"]]


def test_batcher_failure_reaches_only_that_batch_and_the_worker_lives_on():
    fake = _ScriptedTranslator(fail_on="boom")
    batcher = Batcher(fake, max_wait_ms=50, max_batch_tokens=100)
    results = _run_batched(batcher, [(["boom"], 4, 1), (["x"], 4, 1), (["y"], 1, 1)])
    assert all(isinstance(r, RuntimeError) for r in results[:2])
    assert results[2] == [[("Y", -1.0)]]
    counters = batcher.counters()
    assert counters.pop("busy_seconds") > 0.0  # two decode calls ran, the failed one included
    assert counters == {"requests": 1, "sentences": 1, "batches": 1}


def test_batcher_spreads_batches_over_its_decoders_and_routes_results_back():
    first, second = _ScriptedTranslator(), _ScriptedTranslator()

    def slow(sentences, nbest, beam):  # holds its batch while the other decoder takes the next
        time.sleep(0.2)
        return first.translate_nbest(sentences, nbest, beam)

    batcher = Batcher(None, max_wait_ms=20, max_batch_tokens=100,
                      decoders=[slow, second.translate_nbest])  # fmt: skip

    async def go():
        batcher.start()
        early = asyncio.create_task(batcher.translate(["a", "b"], 2, 4, 1))
        await asyncio.sleep(0.1)  # past the first batch's wait: the next batch forms apart
        late = [asyncio.create_task(batcher.translate([s], 1, 4, 1)) for s in ("c", "d")]
        return await asyncio.gather(early, *late)

    try:
        results = asyncio.run(go())
    finally:
        batcher.stop()
    assert sorted(first.calls + second.calls) == [["a", "b"], ["c", "d"]]
    assert first.calls and second.calls  # one batch each: the second did not wait for the first
    assert results == [[[("A", -4.0)], [("B", -4.0)]], [[("C", -4.0)]], [[("D", -4.0)]]]


@pytest.mark.slow  # spawns two processes that import torch
def test_decode_process_equals_the_translator_and_reports_failures(dirs, translator, tmp_path):
    process = DecodeProcess(dirs[0], "cpu", "fp32", threads=1)
    process.start()
    try:
        assert process(SENTENCES, 2, 3) == translator.translate_nbest(SENTENCES, nbest=2, beam=3)
        with pytest.raises(RuntimeError, match="beam"):
            process(["ab"], 1, 0)  # the process answers with the error and lives on
        assert process(["ab"], 1, 3) == translator.translate_nbest(["ab"], beam=3)
    finally:
        process.close()
    broken = DecodeProcess(tmp_path / "absent", "cpu", "fp32", threads=1)
    with pytest.raises(RuntimeError, match="decoder process: .*absent"):
        broken.start()
    broken.close()


def test_cli_refuses_a_missing_directory_with_one_line(tmp_path, capsys):
    assert main(["--model", str(tmp_path / "absent")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "absent: no such model directory" in err
    assert main(["--model", str(tmp_path), "--threads", "0"]) == 2
    assert "--threads must be >= 1" in capsys.readouterr().err
    assert main(["--model", str(tmp_path), "--decode-workers", "0"]) == 2
    assert "--decode-workers must be >= 1" in capsys.readouterr().err


CHROMIUM_FLAGS = (
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--disable-dev-shm-usage",
)  # fmt: skip


@pytest.mark.slow
@pytest.mark.skipif(
    not (CHROMIUM and CHROMEDRIVER), reason="needs Debian's chromium and chromium-driver"
)
def test_page_translates_in_headless_chromium(server, translator, tmp_path, monkeypatch):
    pytest.importorskip("selenium", reason="the browser extra (selenium) is not installed")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    monkeypatch.setenv("SE_OFFLINE", "true")  # Selenium Manager must never download a driver
    monkeypatch.setenv("SE_AVOID_STATS", "true")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (*CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile'}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=Service(executable_path=CHROMEDRIVER))
    try:
        driver.get(server + "/")
        wait = WebDriverWait(driver, 60)
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#model option"))
        driver.find_element(By.ID, "source").send_keys("hello world\nab")
        Select(driver.find_element(By.ID, "beam")).select_by_value("4")
        driver.find_element(By.ID, "translate").click()
        wait.until(lambda d: d.find_element(By.ID, "results").get_attribute("data-done"))
        shown = [
            item.get_attribute("textContent")
            for item in driver.find_elements(By.CSS_SELECTOR, "#results .translation")
        ]
        assert driver.find_element(By.ID, "status").get_attribute("class") != "error"
        driver.find_elements(By.CSS_SELECTOR, "#results .translation")[0].click()
        wait.until(lambda d: d.find_element(By.ID, "attention").get_attribute("data-done"))
        cells = driver.find_elements(By.CSS_SELECTOR, "#att-svg rect.att-cell")
        sources = [e.get_attribute("textContent") for e in
                   driver.find_elements(By.CSS_SELECTOR, "#att-svg .source-piece")]  # fmt: skip
        targets = [e.get_attribute("textContent") for e in
                   driver.find_elements(By.CSS_SELECTOR, "#att-svg .target-piece")]  # fmt: skip
        shown_weights = [float(cell.get_attribute("data-weight")) for cell in cells]
        Select(driver.find_element(By.ID, "att-head")).select_by_value("1")
        head_weights = [
            float(cell.get_attribute("data-weight"))
            for cell in driver.find_elements(By.CSS_SELECTOR, "#att-svg rect.att-cell")
        ]
        assert driver.find_element(By.ID, "status").get_attribute("class") != "error"
    finally:
        driver.quit()
    assert shown == translator.translate(["hello world", "ab"], beam=4)
    _, expected = request(server, "/attention", {"text": "hello world", "beam": 4})
    assert (sources, targets) == (expected["source"], expected["target"])
    last = expected["weights"][-1]  # the page opens on the last layer, mean of its heads
    mean = [sum(h[q][k] for h in last) / len(last) for q in range(len(targets))
            for k in range(len(sources))]  # fmt: skip
    assert shown_weights == pytest.approx(mean, abs=1e-6)
    assert head_weights == pytest.approx([w for row in last[1] for w in row], abs=1e-6)
