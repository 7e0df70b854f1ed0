"""Running under torchrun: the rank and world from its environment, how work is split, and the few collectives used.

One process per device, launched by `torchrun --nproc_per_node G [--nnodes M ...] -m sanitize scan|train ...`. Every
rank reads the same DATA and writes to the same OUT (a filesystem all ranks see). Training is data parallel (DDP,
each rank one share of every epoch's permutation); the embedding pass and predictions are split into contiguous row
ranges; validation of an ImageFolder is split file by file; everything after the embeddings (FAISS, detectors,
outputs) runs on rank 0. Without torchrun's variables this is one process of a world of one and nothing here costs
anything.
"""

from __future__ import annotations

import atexit
import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TypeVar

import numpy as np
import torch
import torch.distributed as dist

from sanitize.errors import SanitizeError

T = TypeVar("T")
RANK_0_ALONE = timedelta(hours=6)  # the longest the other ranks wait on rank 0 (detector, report) before giving up


@dataclass(frozen=True)
class World:
    """This process's place: rank among world_size processes, local_rank on its machine (its GPU)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def row_range(self, n: int) -> tuple[int, int]:
        """This rank's contiguous share [lo, hi) of n rows (shares differ by at most one row)."""
        return n * self.rank // self.world_size, n * (self.rank + 1) // self.world_size

    def epoch_share(self, order: np.ndarray) -> np.ndarray:
        """This rank's share of an epoch's order: every world_size-th example from rank, after cutting the order to a
        multiple of world_size so that every rank takes as many steps (DDP needs it)."""
        if not self.distributed:
            return order
        return order[: len(order) - len(order) % self.world_size][self.rank :: self.world_size]


def current_world() -> World:
    """The World from torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK); the process group is started on first use
    (NCCL where CUDA is present, else Gloo), with a long timeout: the other ranks wait while rank 0 runs the detector."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return World()
    world = World(
        rank=int(os.environ["RANK"]), world_size=world_size, local_rank=int(os.environ.get("LOCAL_RANK", "0"))
    )
    if not dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(world.local_rank)
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo", timeout=RANK_0_ALONE)
        atexit.register(_leave_process_group)
    return world


def _leave_process_group() -> None:
    """At exit, end the process group: a rank leaving with its communication threads alive aborted in teardown
    ('terminate called without an active exception') while the other rank was still finishing."""
    if dist.is_initialized():
        dist.destroy_process_group()


def refuse_torchrun(command: str) -> None:
    """Commands that are not split across ranks would run once per rank and race on their outputs: refuse them."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise SanitizeError(
            f"`sanitize {command}` runs in one process; under torchrun only scan and train are split across ranks"
            " (evaluate's victims split across processes with --seeds)"
        )


def barrier(world: World) -> None:
    if world.distributed:
        dist.barrier()


def all_reduce_sum(values: list[float], world: World) -> list[float]:
    """Element-wise sum of `values` over the ranks (float64 on the CPU: a handful of counters)."""
    if not world.distributed:
        return values
    tensor = torch.tensor(values, dtype=torch.float64)
    if dist.get_backend() == "nccl":
        tensor = tensor.cuda()
    dist.all_reduce(tensor)
    return tensor.cpu().tolist()


def gather_rows(rows: np.ndarray, world: World) -> np.ndarray:
    """Concatenate every rank's rows in rank order (each rank holds its `row_range` share), on every rank."""
    return np.concatenate(gather_lists([rows], world)) if world.distributed else rows


def gather_lists(items: list[T], world: World) -> list[T]:
    """Concatenate every rank's list in rank order, on every rank."""
    if not world.distributed:
        return items
    shares: list[Any] = [None] * world.world_size
    dist.all_gather_object(shares, items)
    return [item for share in shares for item in share]


def broadcast_from_main(value: T, world: World) -> T:
    """Rank 0's `value` on every rank."""
    if not world.distributed:
        return value
    box = [value if world.is_main else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]
