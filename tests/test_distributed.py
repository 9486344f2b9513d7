"""torchrun-environment plumbing: single-process defaults and a real two-process gloo group."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from seq2seq import distributed
from seq2seq.config import ConfigError


def test_single_process_defaults(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    info = distributed.setup("cpu")
    assert (info.rank, info.world_size, info.local_rank) == (0, 1, 0)
    assert info.device == torch.device("cpu") and info.is_main
    assert not torch.distributed.is_initialized()
    assert distributed.is_main() and distributed.world_size() == 1
    assert distributed.all_reduce_sum([1, 2.5]) == [1.0, 2.5]
    tensor = torch.tensor([3.0])
    assert distributed.all_reduce_sum(tensor) is tensor and tensor.item() == 3.0
    assert distributed.all_gather_objects({"a": 1}) == [{"a": 1}]
    distributed.barrier()
    distributed.teardown()


def test_device_resolution_and_clear_errors(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert distributed.setup("auto").device.type == expected
    assert distributed.setup("cpu").device == torch.device("cpu")
    with pytest.raises(ConfigError, match=r"^train\.device: (unknown|unsupported) device 'tpu'"):
        distributed.setup("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match=r"^train\.device: .*CUDA is not available"):
            distributed.setup("cuda")
    else:
        assert distributed.setup("cuda").device == torch.device("cuda", 0)


def _worker(rank: int, world_size: int, port: int, results) -> None:
    os.environ.update(
        RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(rank),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    info = distributed.setup("cpu")
    try:
        summed = distributed.all_reduce_sum([rank + 1.0, 10.0 * rank])
        tensor = distributed.all_reduce_sum(torch.tensor([rank, 1], dtype=torch.int64))
        gathered = distributed.all_gather_objects({"rank": rank})
        distributed.barrier()
        results.put(
            (
                info.rank,
                info.world_size,
                info.is_main,
                distributed.is_main(),
                summed,
                tensor.tolist(),
                gathered,
            )
        )
    finally:
        distributed.teardown()


def test_two_process_gloo_group():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    context = mp.get_context("spawn")
    results = context.Queue()
    mp.start_processes(_worker, args=(2, port, results), nprocs=2, join=True, start_method="spawn")
    by_rank = {}
    for _ in range(2):
        rank, world, info_main, main, summed, tensor, gathered = results.get(timeout=30)
        by_rank[rank] = (world, info_main, main, summed, tensor, gathered)
    for rank, (world, info_main, main, summed, tensor, gathered) in by_rank.items():
        assert world == 2 and info_main == main == (rank == 0)
        assert summed == [3.0, 10.0] and tensor == [1, 2]
        assert gathered == [{"rank": 0}, {"rank": 1}]
