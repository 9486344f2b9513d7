"""Shared fixtures: the shared data folder (skips with a reason when absent) and small corpora."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

DATA_ENV = "SEQ2SEQ_DATA"


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
def _seed_and_threads():
    torch.manual_seed(0)
    yield
