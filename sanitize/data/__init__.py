"""Data sources: ImageFolder directories and .npz arrays, behind one `open_dataset`."""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from sanitize.data.arrays import ArrayDataset, open_npz
from sanitize.data.base import ImageDataset, Skipped, iterate_batches
from sanitize.data.decoded import decoded_copy_plan
from sanitize.data.encoded import VALIDATIONS, EncodedDataset
from sanitize.data.folder import FolderDataset, open_folder
from sanitize.data.shards import ShardDataset, is_shard_folder, open_shards
from sanitize.distributed import World
from sanitize.errors import DataError, SanitizeError

__all__ = [
    "OUTPUT_LOCK",
    "VALIDATIONS",
    "ArrayDataset",
    "EncodedDataset",
    "FolderDataset",
    "ImageDataset",
    "ShardDataset",
    "Skipped",
    "claimed_output",
    "ensure_outside",
    "excluding",
    "iterate_batches",
    "keep_decoded",
    "drop_decoded",
    "open_dataset",
    "removed_if_left_empty",
    "prepare_output",
    "write_atomic",
]


def open_dataset(
    path: str | Path,
    image_size: int | None = None,
    workers: int = 0,
    progress: bool = True,
    world: World = World(),
    validation: str = "full",
) -> ImageDataset:
    """Open DATA: a directory is an ImageFolder (validated in shares under torchrun), a .npz file holds arrays, a .tar
    file or a folder of them (and no class folders) are WebDataset shards. `validation` (folders and shards): decode
    every image up front (`full`), or read headers only (`header`; sanitize.data.encoded says what follows)."""
    path = Path(path)
    opened = {"image_size": image_size, "workers": workers, "progress": progress, "world": world}
    if (path.is_dir() and is_shard_folder(path)) or (path.is_file() and path.suffix.lower() == ".tar"):
        return open_shards(path, **opened, validation=validation)
    if path.is_dir():
        return open_folder(path, **opened, validation=validation)
    if path.is_file() and path.suffix.lower() == ".npz":
        dataset = open_npz(path)
        if image_size is not None and dataset.image_size != (image_size, image_size):
            raise DataError(f"{path}: arrays are {dataset.image_size}; --image-size applies to folders only")
        return dataset
    if not path.exists():
        raise DataError(f"{path} does not exist")
    raise DataError(f"{path} is neither an ImageFolder directory, a .npz file nor .tar shards")


def keep_decoded(dataset: ImageDataset, out: Path, mode: str, passes: int) -> ImageDataset:
    """A folder's or shards' dataset that keeps its decoded images in out/decoded while a run reads them `passes`
    times (`mode` auto/on/off: sanitize.data.decoded.decoded_copy_plan); the choice is one of the dataset's notes."""
    if not isinstance(dataset, EncodedDataset):
        return dataset
    keep, note = decoded_copy_plan(mode, passes, len(dataset), dataset.image_size, out)
    if keep:
        try:
            dataset = dataset.with_decoded_copy(out / "decoded")
        except OSError as error:
            if mode == "on":
                raise DataError(f"decoded_cache on: cannot reserve the copy: {error.strerror or error}") from None
            note = f"no decoded copy ({error.strerror or error}): every pass decodes the files again"
    return dataclasses.replace(dataset, notes=[*dataset.notes, note]) if note else dataset


def excluding(dataset: ImageDataset, listing: Path) -> tuple[ImageDataset, dict[str, Any]]:
    """The dataset without the examples whose ids `listing` names, one a line (a scan's flagged.txt, perhaps edited
    after review), and a record of the list as read (its path, sha256, how many it left out). An id the data does not
    have is an error: the list was made for other data."""
    try:
        content = listing.read_bytes()
        named = {line for line in content.decode("utf-8").splitlines() if line.strip()}
    except (OSError, UnicodeDecodeError) as error:
        raise DataError(
            f"cannot read the exclusion list {listing}: {getattr(error, 'strerror', None) or error}"
        ) from None
    position = {example_id: i for i, example_id in enumerate(dataset.ids)}
    unknown = sorted(named - position.keys())
    if unknown:
        raise DataError(
            f"{listing} names {len(unknown):,} id(s) that {dataset.source} does not have (first: {unknown[0]!r}); "
            "was the list made from other data?"
        )
    if len(named) == len(dataset):
        raise DataError(f"{listing} names every example of {dataset.source}: nothing left to train on")
    record = {"list": str(listing.resolve()), "sha256": hashlib.sha256(content).hexdigest(), "examples": len(named)}
    if not named:
        return dataset, record
    drop = np.zeros(len(dataset), dtype=bool)
    drop[[position[example_id] for example_id in named]] = True
    return dataset.subset(np.flatnonzero(~drop)), record


def drop_decoded(dataset: ImageDataset) -> None:
    """Remove the dataset's decoded copy at the end of a run (a killed run keeps it, for its rerun)."""
    if isinstance(dataset, EncodedDataset) and dataset.decoded is not None:
        shutil.rmtree(dataset.decoded.directory, ignore_errors=True)


def ensure_outside(data: str | Path, out: str | Path) -> None:
    """Refuse an output location inside (or equal to) DATA, and DATA inside the output location (a run writes proxy/,
    embeddings/ and more there): sanitize only ever reads the data."""
    data, out = Path(data).resolve(), Path(out).resolve()
    if out == data or (data.is_dir() and data in out.parents):
        raise DataError(f"output {out} is inside DATA {data}; sanitize never writes into the data")
    if out in data.parents:
        raise DataError(f"DATA {data} is inside the output folder {out}; choose an output folder beside the data")


def prepare_output(data: str | Path, out: str | Path) -> tuple[Path, Path]:
    """Check DATA exists and OUT lies outside it, create OUT; (data, out) as Paths."""
    data, out = Path(data), Path(out)
    if not data.exists():
        raise DataError(f"{data} does not exist")
    ensure_outside(data, out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".sanitize-write-test-{os.getpid()}"  # one per process: torchrun ranks probe at once
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as error:
        raise DataError(f"cannot write the output folder {out}: {error.strerror or error}") from None
    return data, out


OUTPUT_LOCK = ".sanitize.lock"  # held in OUT while a run writes there


@contextlib.contextmanager
def claimed_output(data: str | Path | ImageDataset, out: str | Path, world: World = World()) -> Iterator[None]:
    """Around a run: OUT (created, outside DATA) is written by this run alone. A second run writing to the same folder
    meanwhile is a one-line error, not two interleaved sets of outputs and a verdict from either. Under torchrun rank 0
    claims it for every rank."""
    out = Path(out)
    if not world.is_main:
        yield
        return
    if isinstance(data, ImageDataset):
        out.mkdir(parents=True, exist_ok=True)
    else:
        prepare_output(data, out)
    lock = out / OUTPUT_LOCK
    with open(lock, "w") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise SanitizeError(
                f"another run is writing to {out} (it holds {lock}): wait for it to end, or choose another --out"
            ) from None
        try:
            yield
        finally:
            lock.unlink(missing_ok=True)


@contextlib.contextmanager
def removed_if_left_empty(out: str | Path) -> Iterator[None]:
    """Around a run: when it fails, an output folder it created and left without a file is removed again."""
    out = Path(out)
    created = not out.exists()
    try:
        yield
    except BaseException:
        if created and out.is_dir():
            folders = [Path(root) for root, _, _ in os.walk(out, topdown=False)]
            if not any(p.is_file() or p.is_symlink() for p in out.rglob("*")):
                for folder in folders:
                    folder.rmdir()
        raise


def write_atomic(path: Path, content: str | bytes) -> None:
    """Write `content` (text as UTF-8, or bytes) to `path` through a temporary file and a rename, so a kill never leaves
    half a file."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(content.encode("utf-8") if isinstance(content, str) else content)
    os.replace(tmp, path)
