"""Encoded images (files of an ImageFolder, members of tar shards): read with a size cap, decoded fully, validated
once up front (what cannot be used becomes a recorded skip), and decoded again lazily, batch by batch."""

from __future__ import annotations

import hashlib
import io
import os
import re
import stat
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageFile
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from sanitize.data.arrays import MIN_SIDE
from sanitize.data.base import ImageDataset, Skipped
from sanitize.distributed import World, gather_lists
from sanitize.errors import DataError
from sanitize.wording import plural

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff", ".ppm", ".pgm", ".pbm")
ImageFile.LOAD_TRUNCATED_IMAGES = False  # a truncated file is an error to record, not an image to pad with grey
MAX_IMAGE_BYTES = 64 * 2**20  # a larger file is skipped unread: no image of a training set needs more
# PIL's decompression-bomb warning level (a warning there, an error only at twice it): a skip here, since decoding
# one such file takes gigabytes (a 13,000 x 13,000 PNG of a few KB decodes to 500 MB as RGB)
MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS or 89_478_485


def read_image_bytes(path: str | os.PathLike) -> bytes:
    """The bytes of a regular file of at most MAX_IMAGE_BYTES. Opened without blocking and checked after opening, so
    a FIFO, a device or a file swapped for one raises instead of hanging or reading without end."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    with os.fdopen(fd, "rb") as handle:
        info = os.fstat(handle.fileno())
        if not stat.S_ISREG(info.st_mode):
            raise ValueError("not a regular file")
        if info.st_size > MAX_IMAGE_BYTES:
            raise ValueError(f"larger than {MAX_IMAGE_BYTES // 2**20} MiB")
        data = handle.read(MAX_IMAGE_BYTES + 1)
    if len(data) > MAX_IMAGE_BYTES:
        raise ValueError(f"larger than {MAX_IMAGE_BYTES // 2**20} MiB")
    return data


def decode_rgb(data: bytes) -> Image.Image:
    """Decode image bytes fully (so truncation shows now, not during training) and convert to RGB. An image of more
    than MAX_IMAGE_PIXELS is refused from its header, before a pixel is decoded."""
    if not data:
        raise ValueError("empty file")
    with warnings.catch_warnings():  # PIL's warning for these sizes: the check below makes it a skip instead
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        opened = Image.open(io.BytesIO(data))
    with opened as image:
        if image.width * image.height > MAX_IMAGE_PIXELS:
            raise ValueError(f"{image.width}x{image.height} px, more than {MAX_IMAGE_PIXELS // 10**6} Mpx")
        image.load()
        return image.convert("RGB")


def fit_to_size(image: Image.Image, size: tuple[int, int]) -> Image.Image:
    """Resize the shorter side to fit (H, W) and centre-crop; images already of that size are left alone."""
    height, width = size
    if image.size == (width, height):
        return image
    scale = max(width / image.width, height / image.height)
    resized = image.resize(
        (max(width, round(image.width * scale)), max(height, round(image.height * scale))), Image.BILINEAR
    )
    left, top = (resized.width - width) // 2, (resized.height - height) // 2
    return resized.crop((left, top, left + width, top + height))


def skip_reason(error: Exception) -> str:
    """A decoder's error as a reason a user reads: its type and message, without Python object reprs."""
    message = re.sub(r"<[\w.]+ object at 0x[0-9a-f]+>", "the file", str(error))
    return f"{type(error).__name__}: {message}" if message else type(error).__name__


def read_source(source: Any) -> bytes:
    """The bytes behind a source: a file path, or anything with a `read()` (a tar member)."""
    return source.read() if hasattr(source, "read") else read_image_bytes(source)


class _Validate(Dataset):
    """Reads and decodes every source once: its size, a content hash, or why it cannot be used."""

    def __init__(self, sources: list[Any]):
        self.sources = sources

    def __len__(self) -> int:
        return len(self.sources)

    def __getitem__(self, i: int) -> tuple[int, tuple[int, int] | None, str, str]:
        try:
            data = read_source(self.sources[i])
            image = decode_rgb(data)
        except Exception as error:  # any decoder failure is a recorded skip, never a crash
            return i, None, "", skip_reason(error)
        return i, (image.height, image.width), hashlib.sha256(data).hexdigest(), ""


@dataclass(frozen=True)
class Entry:
    """One candidate example: its id, the path shown for it, its label and where its bytes are."""

    id: str
    path: str
    label: int
    source: Any


@dataclass
class EncodedDataset(ImageDataset):
    """Examples decoded from their sources on every load, resized (shorter side) and centre-cropped to image_size."""

    sources: list[Any] = field(default_factory=list)

    def load_image(self, index: int) -> torch.Tensor:
        try:
            image = decode_rgb(read_source(self.sources[index]))
        except Exception as error:
            raise DataError(f"{self.paths[index]} changed since validation and no longer decodes: {error}") from None
        array = np.asarray(fit_to_size(image, self.image_size), dtype=np.uint8)
        return torch.from_numpy(array.copy()).permute(2, 0, 1)


def validated(
    root: Path,
    kind: str,
    dataset_type: type[EncodedDataset],
    classes: list[str],
    entries: list[Entry],
    skipped: list[Skipped],
    notes: list[str],
    image_size: int | None,
    workers: int,
    progress: bool,
    world: World,
) -> EncodedDataset:
    """Decode every entry once (under torchrun each rank every world_size-th, results shared): undecodable ones join
    `skipped`; the image size is `image_size` or the most common one; the fingerprint hashes ids, labels and bytes."""
    mine = range(world.rank, len(entries), world.world_size)
    results = DataLoader(_Validate([entries[i].source for i in mine]), batch_size=None, num_workers=workers)
    checked = [
        (mine[j], size, digest, reason)
        for j, size, digest, reason in tqdm(results, total=len(mine), desc="validate", unit="img", disable=not progress)
    ]
    sizes: dict[int, tuple[int, int]] = {}
    digests: dict[int, str] = {}
    for i, size, digest, reason in sorted(gather_lists(checked, world), key=lambda result: result[0]):
        if size is None:
            skipped.append(Skipped(id=entries[i].id, path=entries[i].path, reason=reason))
        else:
            sizes[i], digests[i] = (int(size[0]), int(size[1])), digest
    kept = sorted(sizes)
    if not kept:
        raise DataError(f"{root}: none of the {len(entries)} image files could be decoded")
    if image_size is None:
        size = Counter(sizes[i] for i in kept).most_common(1)[0][0]
    else:
        size = (image_size, image_size)
    if min(size) < MIN_SIDE:
        raise DataError(
            f"{root}: most images are {size[0]}x{size[1]} px; the models need at least {MIN_SIDE}x{MIN_SIDE} "
            f"(--image-size {MIN_SIDE} or more resizes them)"
        )
    fingerprint = hashlib.sha256()
    for i in kept:
        fingerprint.update(f"{entries[i].id}\0{entries[i].label}\0{digests[i]}\n".encode())
    resized = sum(sizes[i] != size for i in kept)
    if resized:
        notes.append(f"{plural(resized, 'image')} not {size[0]}x{size[1]}: resized (shorter side) and centre-cropped")
    return dataset_type(
        source=str(root),
        kind=kind,
        classes=classes,
        ids=[entries[i].id for i in kept],
        paths=[entries[i].path for i in kept],
        labels=np.array([entries[i].label for i in kept], dtype=np.int64),
        image_size=size,
        fingerprint="sha256:" + fingerprint.hexdigest(),
        skipped=skipped,
        notes=notes,
        sources=[entries[i].source for i in kept],
    )
