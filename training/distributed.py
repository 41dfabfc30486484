"""This process's place in a torchrun job, and the collectives the trainer needs (none without torchrun).

* :class:`World`: rank, size and device from the torchrun environment (rank 0 of 1 without one).
* :func:`wrap`: a network as the job trains it: itself, under DDP, or FSDP2-sharded per joint block.
* :func:`on_main`: work done on rank 0 only (files, the run record), its expected failure raised on every rank.
* :func:`run_lock`: the run folder's lock, held by rank 0 for the whole job.
* :func:`min_over_ranks`, :func:`check_replicas`, :func:`barrier`: the ranks agreeing on numbers and weights.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist

from ..flash_core.errors import FlashError, one_line
from .config import Config
from .run_folder import RunLock, remove_leftovers
from .state import TrainingError


@dataclass
class World:
    """This process's place in a torchrun job (rank 0 of 1 without one)."""

    rank: int = 0
    size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_env(cls, config: Config) -> World:
        size = int(os.environ.get("WORLD_SIZE", "1"))
        device = _device(config.model.device)
        if size > 1 and not dist.is_initialized():
            backend = config.distributed.backend
            if backend == "auto":
                backend = "nccl" if device.type == "cuda" else "gloo"
            dist.init_process_group(backend)
        rank = dist.get_rank() if size > 1 else 0
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
            torch.cuda.set_device(device)
        return cls(rank, size, device)

    def local(self, x: torch.Tensor) -> torch.Tensor:
        """This rank's slice of a global-batch tensor."""
        n = x.shape[0] // self.size
        return x[self.rank * n:(self.rank + 1) * n]


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def wrap(model: torch.nn.Module, world: World, sharded: bool) -> torch.nn.Module:
    """The model as this job trains it: itself (one process), FSDP2-sharded per joint block (``sharded``), or
    under DDP."""
    if world.size == 1:
        return model
    if sharded:
        from torch.distributed.fsdp import fully_shard

        for block in model.joint_blocks:
            fully_shard(block)
        fully_shard(model)
        return model
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(model, device_ids=[world.device] if world.device.type == "cuda" else None)


def on_main(world: World, fn: Callable[[], object], share: bool = False):
    """``fn()`` on rank 0 only. Its expected failure is raised on every rank (none is left waiting in a
    collective); with ``share`` every rank gets its value, else the others get None."""
    if world.size == 1:
        return fn()
    result, error = None, None
    if world.main:
        try:
            result = fn()
        except (FlashError, ValueError, OSError) as err:
            error = err
    box = [(None if error is None else one_line(error), result if share else None)]
    dist.broadcast_object_list(box, src=0)
    message, shared = box[0]
    if error is not None:
        raise error
    if message is not None:
        raise TrainingError(message)
    return result if world.main else shared


@contextlib.contextmanager
def run_lock(world: World, out: Path) -> Iterator[None]:
    """The run folder's lock (:class:`.run_folder.RunLock`, taken by rank 0; every rank stops when it cannot be),
    with the temporary files of a stopped write removed once it is held."""
    def take() -> RunLock:
        lock = RunLock.acquire(out)
        try:
            remove_leftovers(out)
        except BaseException:
            lock.release()
            raise
        return lock

    lock = on_main(world, take)
    try:
        yield
    finally:
        if lock is not None:
            lock.release()


def min_over_ranks(world: World, values: list[float]) -> list[float]:
    """Each of ``values``' minimum over the ranks (one all-reduce, in float64)."""
    flags = torch.tensor(values, dtype=torch.float64, device=world.device)
    dist.all_reduce(flags, op=dist.ReduceOp.MIN)
    return flags.tolist()


def check_replicas(world: World, stage: str, models: dict[str, torch.nn.Module]) -> None:
    """Under DDP, that every rank holds the same weights for each of ``models`` (sum, sum of squares and largest
    magnitude compared exactly); a RuntimeError naming the stage and the network otherwise."""
    for name, model in models.items():
        flat = torch.cat([p.detach().double().flatten() for p in model.parameters()])
        stats = torch.stack([flat.sum(), flat.square().sum(), flat.abs().max()]).to(world.device)
        gathered = [torch.zeros_like(stats) for _ in range(world.size)]
        dist.all_gather(gathered, stats)
        if any(not torch.equal(gathered[0], other) for other in gathered[1:]):
            raise RuntimeError(f"{stage}: the ranks' {name} weights differ after training: {gathered}")


def barrier(world: World) -> None:
    """Every rank waits for the others (nothing to wait for in one process)."""
    if world.size > 1:
        dist.barrier()
