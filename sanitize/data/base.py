"""The dataset view every phase works on: per-example ids, paths and labels, and batched uint8 loading."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset


@dataclass
class Skipped:
    """A file or record left out of the scan, and why."""

    id: str
    path: str
    reason: str


@dataclass
class ImageDataset:
    """Base for the sources: subclasses fill the metadata and implement `load_image`.

    Examples are addressed by position 0..N-1; `ids` are stable names (a path relative to the data root, or the array
    index) that outputs use. Images come back as uint8 tensors (3, H, W) of `image_size`.
    """

    source: str
    kind: str
    classes: list[str]
    ids: list[str]
    paths: list[str]
    labels: np.ndarray
    image_size: tuple[int, int]
    fingerprint: str
    skipped: list[Skipped] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def class_counts(self) -> dict[str, int]:
        counts = np.bincount(self.labels, minlength=self.num_classes)
        return {name: int(c) for name, c in zip(self.classes, counts)}

    def load_image(self, index: int) -> torch.Tensor:
        raise NotImplementedError

    def subset(self, positions: np.ndarray) -> ImageDataset:
        """The examples at `positions`, keeping their ids (so results trace back to the source)."""
        raise NotImplementedError

    def load_batch(self, indices: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Images (B, 3, H, W) uint8, labels (B,) int64 and positions (B,) int64 for these positions."""
        images = torch.stack([self.load_image(int(i)) for i in indices])
        positions = torch.as_tensor(np.asarray(indices, dtype=np.int64))
        return images, torch.as_tensor(self.labels[positions.numpy()]), positions


class _Batches(Dataset):
    """Item b of this view is the whole b-th batch, so workers decode batches, not single images."""

    def __init__(self, dataset: ImageDataset, batches: list[np.ndarray]):
        self.dataset, self.batches = dataset, batches

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, b: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.dataset.load_batch(self.batches[b])


def iterate_batches(
    dataset: ImageDataset,
    indices: np.ndarray,
    batch_size: int,
    workers: int = 0,
    pin_memory: bool = False,
) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Stream (images, labels, positions) over `indices` in order, `batch_size` at a time."""
    batches = [indices[s : s + batch_size] for s in range(0, len(indices), batch_size)]
    loader = DataLoader(
        _Batches(dataset, batches),
        batch_size=None,
        shuffle=False,
        num_workers=workers,
        pin_memory=pin_memory,
        persistent_workers=False,
    )
    yield from loader
