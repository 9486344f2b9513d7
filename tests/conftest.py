"""Shared fixtures: the shared data folder (skips with a reason when absent), torch seeding,
one-thread pinning, and a small generated parallel corpus with a matching run config."""

from __future__ import annotations

import gzip
import os
import random
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from seq2seq.config import config_from_dict

DATA_ENV = "SEQ2SEQ_DATA"
WORDS_DE = "der die das ein haus katze hund baum auto fährt schnell rot blau groß klein".split()
WORDS_EN = "the a house cat dog tree car drives fast red blue big small green old".split()


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The read-only data folder named by $SEQ2SEQ_DATA (multi30k/, tinyshakespeare/, dialogsum/)."""
    value = os.environ.get(DATA_ENV)
    if not value:
        pytest.skip(f"${DATA_ENV} is not set: point it at the shared data folder to run this test")
    path = Path(value)
    if not (path / "multi30k").is_dir():
        pytest.skip(f"${DATA_ENV}={value} has no multi30k/ folder")
    return path


@pytest.fixture(autouse=True)
def _seed_torch():
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="module")
def one_thread():
    """Pin torch to one intra-op thread for a module (``pytestmark = usefixtures(...)``), then
    restore: tiny models run many small ops, and extra threads only add overhead on a busy
    machine."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def make_pairs(n: int, seed: int = 0) -> list[tuple[str, str]]:
    """``n`` German-looking / English-looking sentence pairs of similar lengths."""
    rng = random.Random(seed)
    pairs = []
    for _ in range(n):
        length = rng.randint(2, 10)
        src = " ".join(rng.choice(WORDS_DE) for _ in range(length))
        tgt = " ".join(rng.choice(WORDS_EN) for _ in range(length + rng.randint(-1, 2)))
        pairs.append((src, tgt))
    return pairs


def write_text(folder: Path, split: str, pairs, gz: bool = False) -> None:
    """Write ``{split}.de`` / ``{split}.en`` (optionally gzipped) into ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    for lang, side in (("de", 0), ("en", 1)):
        payload = "".join(pair[side] + "\n" for pair in pairs).encode("utf-8")
        name = folder / f"{split}.{lang}"
        if gz:
            Path(f"{name}.gz").write_bytes(gzip.compress(payload))
        else:
            name.write_bytes(payload)


def make_config(root: Path, prepare: dict | None = None, batch: dict | None = None, **data):
    """A run config over ``root/corpus`` writing to ``root/run``; ``data`` fields as keywords."""
    data = {"path": str(root / "corpus"), "vocab_size": 60, **data}
    model = {"preset": "gpt_mini"} if data.get("format") == "lm" else {}
    raw = {"model": model, "data": data, "train": {"out_dir": str(root / "run")}}
    raw["prepare"] = {"num_workers": 1, **(prepare or {})}
    raw["batch"] = batch or {}
    return config_from_dict(raw)


@pytest.fixture
def toy() -> SimpleNamespace:
    """The corpus helpers above: ``toy.pairs(n)``, ``toy.write(folder, split, pairs)``,
    ``toy.config(root, prepare={...}, batch={...}, **data) -> RunConfig``, ``toy.words_en``."""
    return SimpleNamespace(
        pairs=make_pairs, write=write_text, config=make_config, words_en=WORDS_EN
    )
