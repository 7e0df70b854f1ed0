"""An ImageFolder directory (DATA/<class>/**/<image>), validated once and decoded lazily, batch by batch."""

from __future__ import annotations

import hashlib
import io
import os
import re
import stat
from collections import Counter
from pathlib import Path

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
    """Decode image bytes fully (so truncation shows now, not during training) and convert to RGB."""
    if not data:
        raise ValueError("empty file")
    with Image.open(io.BytesIO(data)) as image:
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


class _Validate(Dataset):
    """Reads and decodes every file once: its size, a content hash, or why it cannot be used."""

    def __init__(self, files: list[Path]):
        self.files = files

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> tuple[int, tuple[int, int] | None, str, str]:
        try:
            data = read_image_bytes(self.files[i])
            image = decode_rgb(data)
        except Exception as error:  # any decoder failure is a recorded skip, never a crash
            return i, None, "", skip_reason(error)
        return i, (image.height, image.width), hashlib.sha256(data).hexdigest(), ""


def unusable_name(name: str) -> str | None:
    """Why a file or folder name cannot be an id (ids are one per line in flagged.txt), or None."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return "its name is not valid UTF-8"
    if any(ord(c) < 32 or ord(c) == 127 for c in name):
        return "its name contains a control character (newline, tab, ...)"
    return None


def _walk(top: Path, root: Path, skipped: list[Skipped]) -> tuple[list[Path], list[str]]:
    """Image files under `top`, depth first in name order, without recursion (any depth) and without following
    directory symlinks (no loops, nothing outside DATA twice); what is left out and why goes to `skipped`."""
    files, ignored, stack = [], [], [top]
    while stack:
        folder = stack.pop()
        try:
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
        except OSError as error:
            skipped.append(
                Skipped(_rel(folder, root), str(folder), f"folder cannot be read: {error.strerror or error}")
            )
            continue
        subfolders = []
        for entry in entries:
            path = Path(entry.path)
            why = unusable_name(entry.name)
            try:
                if why is None and entry.is_dir(follow_symlinks=False):
                    subfolders.append(path)
                    continue
                if why is None and entry.is_symlink() and entry.is_dir():
                    why = "a symlink to a folder (not followed)"
                elif why is None and not entry.name.lower().endswith(IMAGE_EXTENSIONS):
                    ignored.append(_rel(path, root))
                    continue
                elif why is None and not stat.S_ISREG(entry.stat().st_mode):
                    why = "not a regular file"
            except OSError as error:  # a dangling symlink, a vanished file
                why = f"cannot be read: {error.strerror or error}"
            if why is None:
                files.append(path)
            else:
                skipped.append(Skipped(_rel(path, root), _printable(path), why))
        stack.extend(reversed(subfolders))
    return files, ignored


def _rel(path: Path, root: Path) -> str:
    return _printable(Path(os.path.relpath(path, root)))


def _printable(path: Path) -> str:
    """A path as text that encodes to UTF-8 (undecodable bytes as backslash escapes), for records of skipped files."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def _list_classes(root: Path) -> tuple[list[str], list[tuple[Path, int]], list[str], list[Skipped]]:
    try:
        entries = sorted(os.scandir(root), key=lambda e: e.name)
    except OSError as error:
        raise DataError(f"cannot list {root}: {error}") from None
    skipped: list[Skipped] = []
    class_dirs = []
    for entry in entries:
        if entry.name.startswith(".") or not entry.is_dir(follow_symlinks=False):
            continue
        why = unusable_name(entry.name)
        if why:
            skipped.append(Skipped(_rel(Path(entry.path), root), _printable(Path(entry.path)), f"class folder: {why}"))
        else:
            class_dirs.append(entry)
    classes = [entry.name for entry in class_dirs]
    files: list[tuple[Path, int]] = []
    ignored: list[str] = []
    for label, entry in enumerate(class_dirs):
        found, others = _walk(Path(entry.path), root, skipped)
        files.extend((path, label) for path in found)
        ignored.extend(others)
    return classes, files, ignored, skipped


def open_folder(
    root: Path, image_size: int | None = None, workers: int = 0, progress: bool = True, world: World = World()
) -> FolderDataset:
    """List and validate an ImageFolder tree; undecodable files are recorded in `skipped`, not raised. Under torchrun
    every rank decodes every world_size-th file and all ranks share the results."""
    classes, files, ignored, skipped = _list_classes(root)
    if not classes:
        raise DataError(f"{root} has no class subfolders (expected DATA/<class>/<image>)")
    if not files:
        raise DataError(f"{root} has no image files ({', '.join(IMAGE_EXTENSIONS)})")
    mine = range(world.rank, len(files), world.world_size)
    results = DataLoader(_Validate([files[i][0] for i in mine]), batch_size=None, num_workers=workers)
    checked = [
        (mine[j], size, digest, reason)
        for j, size, digest, reason in tqdm(results, total=len(mine), desc="validate", unit="img", disable=not progress)
    ]
    sizes: dict[int, tuple[int, int]] = {}
    digests: dict[int, str] = {}
    for i, size, digest, reason in sorted(gather_lists(checked, world), key=lambda result: result[0]):
        rel = files[i][0].relative_to(root).as_posix()
        if size is None:
            skipped.append(Skipped(id=rel, path=str(files[i][0]), reason=reason))
        else:
            sizes[i], digests[i] = (int(size[0]), int(size[1])), digest
    kept = sorted(sizes)
    if not kept:
        raise DataError(f"{root}: none of the {len(files)} image files could be decoded")
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
        fingerprint.update(f"{files[i][0].relative_to(root).as_posix()}\0{files[i][1]}\0{digests[i]}\n".encode())
    notes = []
    if ignored:
        named = ", ".join(ignored[:5]) + (", ..." if len(ignored) > 5 else "")
        notes.append(f"{plural(len(ignored), 'file')} without an image extension ignored: {named}")
    resized = sum(sizes[i] != size for i in kept)
    if resized:
        notes.append(f"{plural(resized, 'image')} not {size[0]}x{size[1]}: resized (shorter side) and centre-cropped")
    return FolderDataset(
        source=str(root),
        kind="folder",
        classes=classes,
        ids=[files[i][0].relative_to(root).as_posix() for i in kept],
        paths=[str(files[i][0]) for i in kept],
        labels=np.array([files[i][1] for i in kept], dtype=np.int64),
        image_size=size,
        fingerprint="sha256:" + fingerprint.hexdigest(),
        skipped=skipped,
        notes=notes,
    )


class FolderDataset(ImageDataset):
    def load_image(self, index: int) -> torch.Tensor:
        path = self.paths[index]
        try:
            image = decode_rgb(read_image_bytes(path))
        except Exception as error:
            raise DataError(f"{path} changed since validation and no longer decodes: {error}") from None
        array = np.asarray(fit_to_size(image, self.image_size), dtype=np.uint8)
        return torch.from_numpy(array.copy()).permute(2, 0, 1)
