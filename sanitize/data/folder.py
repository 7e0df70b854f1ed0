"""An ImageFolder directory (DATA/<class>/**/<image>), validated once and decoded lazily, batch by batch."""

from __future__ import annotations

import hashlib
import io
import os
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageFile
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from sanitize.data.base import ImageDataset, Skipped
from sanitize.distributed import World, gather_lists
from sanitize.errors import DataError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff", ".ppm", ".pgm", ".pbm")
ImageFile.LOAD_TRUNCATED_IMAGES = False  # a truncated file is an error to record, not an image to pad with grey


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


class _Validate(Dataset):
    """Reads and decodes every file once: its size, a content hash, or why it cannot be used."""

    def __init__(self, files: list[Path]):
        self.files = files

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> tuple[int, tuple[int, int] | None, str, str]:
        try:
            data = self.files[i].read_bytes()
            image = decode_rgb(data)
        except Exception as error:  # any decoder failure is a recorded skip, never a crash
            return i, None, "", f"{type(error).__name__}: {error}" if str(error) else type(error).__name__
        return i, (image.height, image.width), hashlib.sha256(data).hexdigest(), ""


def _list_classes(root: Path) -> tuple[list[str], list[tuple[Path, int]], int]:
    try:
        class_dirs = sorted(
            (e for e in os.scandir(root) if e.is_dir() and not e.name.startswith(".")), key=lambda e: e.name
        )
    except OSError as error:
        raise DataError(f"cannot list {root}: {error}") from None
    classes = [entry.name for entry in class_dirs]
    files: list[tuple[Path, int]] = []
    ignored = 0
    for label, entry in enumerate(class_dirs):
        for dirpath, dirnames, filenames in os.walk(entry.path, followlinks=True):
            dirnames.sort()
            for name in sorted(filenames):
                if name.lower().endswith(IMAGE_EXTENSIONS):
                    files.append((Path(dirpath) / name, label))
                else:
                    ignored += 1
    return classes, files, ignored


def open_folder(
    root: Path, image_size: int | None = None, workers: int = 0, progress: bool = True, world: World = World()
) -> FolderDataset:
    """List and validate an ImageFolder tree; undecodable files are recorded in `skipped`, not raised. Under torchrun
    every rank decodes every world_size-th file and all ranks share the results."""
    classes, files, ignored = _list_classes(root)
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
    skipped = []
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
    fingerprint = hashlib.sha256()
    for i in kept:
        fingerprint.update(f"{files[i][0].relative_to(root).as_posix()}\0{files[i][1]}\0{digests[i]}\n".encode())
    notes = [f"{ignored} files without an image extension were ignored"] if ignored else []
    resized = sum(sizes[i] != size for i in kept)
    if resized:
        notes.append(f"{resized} images are not {size[0]}x{size[1]} and are resized (shorter side) and centre-cropped")
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
            image = decode_rgb(Path(path).read_bytes())
        except Exception as error:
            raise DataError(f"{path} changed since validation and no longer decodes: {error}") from None
        array = np.asarray(fit_to_size(image, self.image_size), dtype=np.uint8)
        return torch.from_numpy(array.copy()).permute(2, 0, 1)
