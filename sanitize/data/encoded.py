"""Encoded images (files of an ImageFolder, members of tar shards): read with a size cap and validated once up front
(what cannot be used becomes a recorded skip), then decoded lazily, batch by batch.

Validation is `full` (every image decoded, so nothing can fail later) or `header` (bytes read and hashed, the format
and size read from the header, no pixel decoded: 6.7x faster, reports/imagenet-shaped). After a header-only
validation a file that does not decode (a truncated JPEG) is found by the first pass that reads it: that pass sees a
black image in its place, the failure is recorded in a folder (`record_failures_in`), and `without_late_failures`
later turns it into a recorded skip like the others."""

from __future__ import annotations

import dataclasses
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
from sanitize.data.decoded import DecodedCopy, open_decoded_copy
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


def open_checked(data: bytes) -> Image.Image:
    """Open image bytes (the header only) and refuse an empty file or one of more than MAX_IMAGE_PIXELS."""
    if not data:
        raise ValueError("empty file")
    with warnings.catch_warnings():  # PIL's warning for these sizes: the check below makes it a skip instead
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        opened = Image.open(io.BytesIO(data))
    if opened.width * opened.height > MAX_IMAGE_PIXELS:
        opened.close()
        raise ValueError(f"{opened.width}x{opened.height} px, more than {MAX_IMAGE_PIXELS // 10**6} Mpx")
    return opened


def decode_rgb(data: bytes) -> Image.Image:
    """Decode image bytes fully (so truncation shows now, not during training) and convert to RGB. An image of more
    than MAX_IMAGE_PIXELS is refused from its header, before a pixel is decoded."""
    with open_checked(data) as image:
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


VALIDATIONS = ("full", "header")
# images shrunk at least this much to the scan's size get a note: a poison's perturbation is what a downscale averages
# away (on CIFAR-10, 2x cost the proxy most of the poisons it found at their own size)
DOWNSCALE_NOTED = 1.5


class _Validate(Dataset):
    """Reads every source once: its size (from a full decode, or from the header), a content hash, or why it cannot be
    used."""

    def __init__(self, sources: list[Any], validation: str):
        self.sources, self.validation = sources, validation

    def __len__(self) -> int:
        return len(self.sources)

    def __getitem__(self, i: int) -> tuple[int, tuple[int, int] | None, bytes, str]:
        try:
            data = read_source(self.sources[i])
            if self.validation == "full":
                image = decode_rgb(data)
            else:
                with open_checked(data) as image:
                    pass
        except Exception as error:  # any decoder failure is a recorded skip, never a crash
            return i, None, b"", skip_reason(error)
        return i, (image.height, image.width), hashlib.sha256(data).digest(), ""


@dataclass(frozen=True)
class Entry:
    """One candidate example: its id, the path shown for it, its label and where its bytes are."""

    id: str
    path: str
    label: int
    source: Any


@dataclass
class EncodedDataset(ImageDataset):
    """Examples decoded from their sources on every load, resized (shorter side) and centre-cropped to image_size.

    After a header-only validation (`validation="header"`) a source that does not decode loads as a black image and,
    once `record_failures_in` named a folder, is recorded there (one file per position, written by whichever process
    decoded it); without that folder it is an error, as after a full validation."""

    sources: list[Any] = field(default_factory=list)
    digests: np.ndarray = field(default_factory=lambda: np.zeros((0, 32), np.uint8))  # sha256 of each source's bytes
    validation: str = "full"
    failures: Path | None = None
    decoded: DecodedCopy | None = None  # where decoded images are kept (sanitize.data.decoded)

    def record_failures_in(self, folder: Path) -> EncodedDataset:
        """This dataset, recording late decode failures under `folder` (one subfolder per fingerprint, so a resumed
        run on the same data keeps what an earlier pass found)."""
        directory = folder / self.fingerprint.removeprefix("sha256:")[:16]
        directory.mkdir(parents=True, exist_ok=True)
        return dataclasses.replace(self, failures=directory)

    def with_decoded_copy(self, folder: Path) -> EncodedDataset:
        """This dataset, keeping what it decodes in a copy under `folder` and reading it back from there (a resumed
        run on the same data and size reuses the copy); raises OSError when the copy's space cannot be reserved."""
        return dataclasses.replace(
            self, decoded=open_decoded_copy(folder, self.fingerprint, len(self), self.image_size)
        )

    def load_image(self, index: int) -> torch.Tensor:
        if self.failures is not None and (self.failures / str(index)).exists():
            return self._black()
        kept = self.decoded.get(index) if self.decoded is not None else None
        if kept is not None:
            return kept
        try:
            image = decode_rgb(read_source(self.sources[index]))
        except Exception as error:
            if self.validation == "full" or self.failures is None:  # unexpected, or nowhere to record it
                why = (
                    "changed since validation and no longer decodes" if self.validation == "full" else "does not decode"
                )
                raise DataError(f"{self.paths[index]} {why}: {error}") from None
            record = self.failures / f"{index}.{os.getpid()}.tmp"
            record.write_text(skip_reason(error), encoding="utf-8")
            os.replace(record, self.failures / str(index))
            return self._black()
        array = np.array(fit_to_size(image, self.image_size), dtype=np.uint8)
        if self.decoded is not None:
            self.decoded.put(index, array)
        return torch.from_numpy(array).permute(2, 0, 1)

    def _black(self) -> torch.Tensor:
        return torch.zeros((3, *self.image_size), dtype=torch.uint8)

    def late_failures(self) -> dict[int, str]:
        """Position -> why, for the sources a pass found undecodable after a header-only validation."""
        if self.failures is None:
            return {}
        return {
            int(path.name): path.read_text(encoding="utf-8") for path in self.failures.iterdir() if path.name.isdigit()
        }

    def without_late_failures(self) -> tuple[EncodedDataset, np.ndarray]:
        """The examples that decoded (the others recorded skips, their reason marked as found late) and their positions
        here; the fingerprint is the one a full validation of the same data gives."""
        failed = self.late_failures()
        keep = np.setdiff1d(np.arange(len(self)), list(failed))
        if not failed:
            return self, keep
        if not len(keep):
            raise DataError(f"{self.source}: none of the {len(self)} image files decodes")
        late = [Skipped(self.ids[i], self.paths[i], f"{failed[i]} (found when first decoded)") for i in sorted(failed)]
        decoded = dataclasses.replace(
            self.subset(keep),
            skipped=[*self.skipped, *late],
            notes=[*self.notes, f"{plural(len(failed), 'image')} passed the header check but did not decode: skipped"],
        )
        return decoded, keep

    def subset(self, positions: np.ndarray) -> EncodedDataset:
        """The examples at `positions` (their ids kept, the fingerprint theirs), without the failure records and the
        decoded copy, whose rows are this dataset's positions."""
        ids = [self.ids[i] for i in positions]
        return dataclasses.replace(
            self,
            ids=ids,
            paths=[self.paths[i] for i in positions],
            labels=self.labels[positions],
            sources=[self.sources[i] for i in positions],
            digests=self.digests[positions],
            fingerprint=fingerprint(ids, self.labels[positions], self.digests[positions]),
            failures=None,
            decoded=None,
        )


def fingerprint(ids: list[str], labels: np.ndarray, digests: np.ndarray) -> str:
    """The data's identity: a hash over every example's id, label and bytes (its sha256), in order."""
    hashed = hashlib.sha256()
    for example_id, label, digest in zip(ids, labels, digests):
        hashed.update(f"{example_id}\0{label}\0{bytes(digest).hex()}\n".encode())
    return "sha256:" + hashed.hexdigest()


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
    validation: str = "full",
) -> EncodedDataset:
    """Decode every entry once, or read its header (`validation`; under torchrun each rank every world_size-th, results
    shared): unusable ones join `skipped`; the image size is `image_size` or the most common one; the fingerprint
    hashes ids, labels and bytes."""
    if validation not in VALIDATIONS:
        raise DataError(f"validation must be one of {', '.join(VALIDATIONS)}, not {validation!r}")
    mine = range(world.rank, len(entries), world.world_size)
    results = DataLoader(_Validate([entries[i].source for i in mine], validation), batch_size=None, num_workers=workers)
    checked = [
        (mine[j], size, digest, reason)
        for j, size, digest, reason in tqdm(results, total=len(mine), desc="validate", unit="img", disable=not progress)
    ]
    sizes: dict[int, tuple[int, int]] = {}
    digests: dict[int, bytes] = {}
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
    labels = np.array([entries[i].label for i in kept], dtype=np.int64)
    kept_digests = np.frombuffer(b"".join(digests[i] for i in kept), dtype=np.uint8).reshape(len(kept), 32)
    ids = [entries[i].id for i in kept]
    resized = sum(sizes[i] != size for i in kept)
    if resized:
        notes.append(f"{plural(resized, 'image')} not {size[0]}x{size[1]}: resized (shorter side) and centre-cropped")
    shrunk = [f for f in (min(sizes[i][0] / size[0], sizes[i][1] / size[1]) for i in kept) if f >= DOWNSCALE_NOTED]
    if shrunk:
        notes.append(
            f"{plural(len(shrunk), 'image')} downscaled (median {float(np.median(shrunk)):.1f}x): perturbations in them "
            "reach the proxy attenuated; a proxy that saw poisoned images at half their side missed most poisons "
            "(reports/imagenet-shaped)"
        )
    return dataset_type(
        source=str(root),
        kind=kind,
        classes=classes,
        ids=ids,
        paths=[entries[i].path for i in kept],
        labels=labels,
        image_size=size,
        fingerprint=fingerprint(ids, labels, kept_digests),
        skipped=skipped,
        notes=notes,
        sources=[entries[i].source for i in kept],
        digests=kept_digests,
        validation=validation,
    )
