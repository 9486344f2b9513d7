"""Data parallelism from ``torchrun``'s environment (RANK, WORLD_SIZE, LOCAL_RANK), no framework.

A plain ``python -m seq2seq.train`` run is world size 1 and never touches ``torch.distributed``.
Under ``torchrun --nproc_per_node N`` each process joins an NCCL group (CUDA) or a gloo group (CPU).
:func:`launch_local` is ``torchrun --standalone`` from inside a program (``train.processes``).
All state lives in ``torch.distributed`` itself; this module keeps no globals.
"""

from __future__ import annotations

import os
import sys
import uuid
from dataclasses import dataclass

import torch
import torch.distributed as dist

from seq2seq import hardware
from seq2seq.config import ConfigError


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits in the job and which device it computes on."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


@dataclass(frozen=True)
class LaunchEnv:
    """What torchrun told this process (all zeros and one without torchrun)."""

    rank: int
    world_size: int
    local_rank: int


def launch_env() -> LaunchEnv:
    """Read RANK, WORLD_SIZE and LOCAL_RANK; valid before and after the process group exists."""
    rank = int(os.environ.get("RANK", "0"))
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", str(rank)))
    return LaunchEnv(rank, world_size, local_rank)


def setup(device_preference: str = "auto") -> DistInfo:
    """Read torchrun's environment, pick the device and join the process group when world > 1.

    Args:
        device_preference: ``auto``, ``cpu``, ``cuda`` or ``cuda:N`` (``train.device``).

    Returns:
        This process's :class:`DistInfo`.

    Raises:
        ConfigError: ``device_preference`` is no device, or one this machine lacks.
    """
    env = launch_env()
    rank, world_size, local_rank = env.rank, env.world_size, env.local_rank
    try:
        device = hardware.resolve_device(device_preference, local_rank)
    except ValueError as error:
        raise ConfigError(f"train.device: {error}") from None
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world_size > 1 and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, rank=rank, world_size=world_size)
    return DistInfo(rank=rank, world_size=world_size, local_rank=local_rank, device=device)


def is_main() -> bool:
    """True on rank 0, and in any process that is not part of a process group."""
    return not dist.is_initialized() or dist.get_rank() == 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def all_reduce_sum(values: torch.Tensor | list[float]) -> torch.Tensor | list[float]:
    """Sum over ranks: a tensor is reduced in place and returned; a list of floats comes back.

    Floats travel as float64 so token counts and loss sums stay exact well past 2**24.
    """
    if isinstance(values, torch.Tensor):
        if dist.is_initialized():
            dist.all_reduce(values, op=dist.ReduceOp.SUM)
        return values
    if not dist.is_initialized():
        return [float(v) for v in values]
    device = torch.device("cuda", torch.cuda.current_device()) if _uses_nccl() else None
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor.tolist()


def all_gather_objects(value: object) -> list[object]:
    """Every rank's ``value`` in rank order (``[value]`` outside a process group)."""
    if not dist.is_initialized():
        return [value]
    gathered: list[object] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, value)
    return gathered


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def teardown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def _uses_nccl() -> bool:
    return dist.get_backend() == "nccl"


def launch_local(
    processes: int, module: str, argv: list[str], device_preference: str = "auto"
) -> int:
    """Run ``python -m module *argv`` as ``processes`` ranks on this machine and wait for them.

    This is what ``torchrun --standalone --nproc-per-node N -m module ...`` does, through the
    launcher API torchrun itself is built on: a rendezvous on a free local port, no restarts. Each
    rank gets ``cores // processes`` OpenMP threads unless ``OMP_NUM_THREADS`` is set. The workers
    inherit this process's environment (its allocator preload included) and standard streams.

    Returns:
        0, or the exit code of the first rank that failed (a signal ``s`` as ``128 + s``).

    Raises:
        ConfigError: the ranks would need more CUDA devices than this machine has.
    """
    try:
        hardware.resolve_device(device_preference, processes - 1)  # the last rank's device
    except ValueError as error:
        raise ConfigError(f"train.processes={processes}: {error}") from None
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (cores or 1) // processes)))
    config = LaunchConfig(
        min_nodes=1,
        max_nodes=1,
        nproc_per_node=processes,
        run_id=str(uuid.uuid4()),
        rdzv_backend="c10d",
        rdzv_endpoint="localhost:0",
        rdzv_configs={"rank": 0},
        max_restarts=0,
    )
    try:
        elastic_launch(config, sys.executable)("-m", module, *argv)
    except ChildFailedError as error:
        _, failure = error.get_first_failure()
        return failure.exitcode if failure.exitcode >= 0 else 128 - failure.exitcode
    except SignalException as error:
        return 128 + int(error.sigval)
    return 0
