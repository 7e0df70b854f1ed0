"""Model FLOPs: what a phase cost, independent of the machine's load.

Process CPU seconds on a shared machine measure the sharing as well as the work (robust training read 0.59x plain
training in reports/gradient-matching-full-tuning because its undefended twins ran beside more jobs). The floating-point
operations of a model's convolutions and matrix products do not change with load, machine or device. They are counted
once per architecture and input size by torch's FlopCounterMode on a fresh model (a training step: forward and
backward; a scoring pass: forward in eval mode), per example; a phase multiplies them by the examples it trained on and
scored. Not counted: decoding, augmentation, normalisation layers, the gradient sketch, FAISS searches and medoid
selection (the scan's phase table times those).
"""

from __future__ import annotations

import dataclasses
import functools
import json
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

from sanitize.models import create_model

COUNTING_BATCH = 2  # batch norm needs two examples in training mode; the counts are linear in the batch


@dataclasses.dataclass(frozen=True)
class ExampleFlops:
    """FLOPs of one example: a training step (forward and backward) and a scoring pass (forward, eval mode)."""

    train: float
    score: float


def example_flops(model: str, num_classes: int, in_shape: tuple[int, ...], **model_kwargs: Any) -> ExampleFlops:
    """Per-example FLOPs of architecture `model` on inputs of `in_shape` (C, H, W); counted once per process."""
    return _counted(model, num_classes, tuple(in_shape), json.dumps(model_kwargs, sort_keys=True))


@functools.cache
def _counted(model: str, num_classes: int, in_shape: tuple[int, ...], model_kwargs: str) -> ExampleFlops:
    with torch.random.fork_rng(devices=[]):  # building the model must not move the caller's random stream
        torch.manual_seed(0)
        net = create_model(model, num_classes, in_shape, **json.loads(model_kwargs))
        x = torch.randn(COUNTING_BATCH, *in_shape)
    net.train()
    with FlopCounterMode(display=False) as counter:
        net(x).sum().backward()
    train = counter.get_total_flops()
    net.eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        net(x)
    return ExampleFlops(train=train / COUNTING_BATCH, score=counter.get_total_flops() / COUNTING_BATCH)


def reduced_size(image_size: tuple[int, int], side: int | None) -> tuple[int, int]:
    """(H, W) with the shorter side resized to `side`, aspect kept (progressive resizing's reduced epochs); the size
    itself for None."""
    if side is None:
        return tuple(image_size)
    scale = side / min(image_size)
    return max(1, round(image_size[0] * scale)), max(1, round(image_size[1] * scale))


def trained_per_epoch(examples: int, batch_size: int) -> int:
    """How many of an epoch's `examples` a single process trains on: a last batch of one is left out (batch norm
    cannot normalise it)."""
    return examples - 1 if examples % batch_size == 1 else examples


def trained_examples(size: int, epochs: int, batch_size: int, drop_rounds: list[int] | None = None) -> int:
    """Examples a single-process training run of `epochs` steps through, when robust training left each dropped example
    out from the 0-based epoch of its round on (`drop_rounds`, one entry per dropped example; none for plain runs)."""
    rounds = drop_rounds or []
    return sum(trained_per_epoch(size - sum(r <= epoch for r in rounds), batch_size) for epoch in range(epochs))


def phase_work(flops: ExampleFlops, trained: int, scored: int) -> dict[str, Any]:
    """A phase's record: examples trained on and scored, the per-example FLOPs, and their total."""
    return {
        "trained_examples": int(trained),
        "scored_examples": int(scored),
        "flops_per_example": dataclasses.asdict(flops),
        "flops": flops.train * trained + flops.score * scored,
    }
