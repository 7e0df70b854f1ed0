"""A decoded copy of a folder's or shards' images on disk, at the size every phase sees them, so each file is decoded
once: the first pass that decodes an image stores its pixels there, and every later pass (the proxy's other epochs,
the embedding pass) reads them back instead of decoding the file again (reports/imagenet-shaped measures both).

The copy is two memory-mapped .npy files in a folder named by the data's fingerprint and size: `pixels.npy`
(N, H, W, 3) uint8 and `checks.npy`, a crc32 per row (+ 2**32 once written; 0 while empty). A row whose check does not
match (a machine that lost power mid-write) is decoded again, so a resumed run never trains on a torn image. Its
space is reserved up front (posix_fallocate), so a full disk is an error when the copy is made, never a crash later in
a memory-mapped write. The folder is made under a temporary name and renamed, so processes that open it at once
(DataLoader workers, torchrun ranks) share one copy."""

from __future__ import annotations

import os
import shutil
import zlib
from pathlib import Path

import numpy as np
import torch

from sanitize.config import DECODED_CACHE_MODES
from sanitize.errors import DataError
from sanitize.wording import disk_size

WRITTEN = 1 << 32


def copy_bytes(rows: int, image_size: tuple[int, int]) -> int:
    """The disk a decoded copy of `rows` images of `image_size` takes."""
    return rows * image_size[0] * image_size[1] * 3 + rows * 8


class DecodedCopy:
    """Rows of pixels and their checks, memory-mapped once per process (workers inherit this object, not its maps)."""

    def __init__(self, directory: Path):
        self.directory = directory
        self._maps: tuple[int, np.ndarray, np.ndarray] | None = None

    def __getstate__(self) -> dict:
        return {"directory": self.directory, "_maps": None}

    def _opened(self) -> tuple[np.ndarray, np.ndarray]:
        if self._maps is None or self._maps[0] != os.getpid():
            pixels = np.load(self.directory / "pixels.npy", mmap_mode="r+", allow_pickle=False)
            checks = np.load(self.directory / "checks.npy", mmap_mode="r+", allow_pickle=False)
            self._maps = (os.getpid(), pixels, checks)
        return self._maps[1], self._maps[2]

    def get(self, index: int) -> torch.Tensor | None:
        """Row `index` as a (3, H, W) uint8 tensor, or None while it has not been written (or was torn)."""
        pixels, checks = self._opened()
        check = int(checks[index])
        if check == 0:
            return None
        row = np.array(pixels[index])
        if check != WRITTEN + zlib.crc32(row):
            return None
        return torch.from_numpy(row).permute(2, 0, 1)

    def put(self, index: int, image: np.ndarray) -> None:
        """Store row `index` (H, W, 3) uint8, then its check."""
        pixels, checks = self._opened()
        pixels[index] = image
        checks[index] = WRITTEN + zlib.crc32(np.ascontiguousarray(image))

    def written(self) -> int:
        """How many rows hold pixels."""
        return int(np.count_nonzero(self._opened()[1]))


def open_decoded_copy(folder: Path, fingerprint: str, rows: int, image_size: tuple[int, int]) -> DecodedCopy:
    """The copy for this data (its fingerprint) and size under `folder`, made with its space reserved if it is not there;
    raises OSError when the space cannot be reserved."""
    height, width = image_size
    directory = folder / f"{fingerprint.removeprefix('sha256:')[:16]}-{height}x{width}"
    if not directory.is_dir():
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / f".{directory.name}.{os.getpid()}.tmp"
        try:
            tmp.mkdir()
            _reserved(tmp / "pixels.npy", np.uint8, (rows, height, width, 3))
            _reserved(tmp / "checks.npy", np.uint64, (rows,))
            os.rename(tmp, directory)
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)
            if not directory.is_dir():  # not another process's copy made first: a real failure
                raise
    return DecodedCopy(directory)


def _reserved(path: Path, dtype: type, shape: tuple[int, ...]) -> None:
    """An .npy file of zeros whose blocks are allocated now (not a sparse file that a full disk turns into SIGBUS)."""
    array = np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=shape)
    offset, size = array.offset, array.nbytes
    del array
    with open(path, "r+b") as handle:
        os.posix_fallocate(handle.fileno(), offset, size)


def decoded_copy_plan(
    mode: str, passes: int, rows: int, image_size: tuple[int, int], out: Path
) -> tuple[bool, str | None]:
    """Whether to keep a decoded copy under `out`, and a line for the summary's notes when it matters: `auto` keeps one
    when the images are read more than once (`passes`) and it takes at most half the free space; `on` always (an error
    when the space is not there); `off` never."""
    if mode not in DECODED_CACHE_MODES:
        raise DataError(f"decoded_cache must be one of {', '.join(DECODED_CACHE_MODES)}, not {mode!r}")
    if mode == "off" or (mode == "auto" and passes < 2):
        return False, None
    need = copy_bytes(rows, image_size)
    size = f"{disk_size(need)} at {image_size[0]}x{image_size[1]}"
    if not hasattr(os, "posix_fallocate"):
        if mode == "on":
            raise DataError("decoded_cache on needs posix_fallocate, which this platform lacks")
        return False, "no decoded copy: this platform cannot reserve its space; every pass decodes the files again"
    free = shutil.disk_usage(out).free
    if mode == "on" and need > free:
        raise DataError(f"decoded_cache on: the copy needs {size}, {out} has {disk_size(free)} free")
    if mode == "auto" and need > free // 2:
        return False, f"no decoded copy ({size}, more than half of {disk_size(free)} free): every pass decodes again"
    return True, f"decoded images kept in {out / 'decoded'} while running ({size}), removed at the end"
