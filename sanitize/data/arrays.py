"""A dataset held in a .npz file: `x` (N, H, W, C) uint8 and `y` (N,), or `x_train` / `y_train`."""

from __future__ import annotations

import hashlib
import zipfile
from pathlib import Path

import numpy as np
import torch

from sanitize.data.base import ImageDataset
from sanitize.errors import DataError

KEY_PAIRS = (("x", "y"), ("x_train", "y_train"), ("x_test", "y_test"))


MAX_NPZ_BYTES = 32 * 2**30  # an archive declaring more is refused before anything is allocated (use folders beyond)
MAX_CLASSES = 100_000
MIN_SIDE = 8  # the smallest image side the models take (three 2x poolings)


def _declared_sizes(path: Path) -> dict[str, int]:
    """Each array member's size in bytes as its .npy header declares it, checked against the archive before numpy
    allocates anything: a zip bomb or a header claiming more than its member holds is a clear error."""
    if not zipfile.is_zipfile(path):
        with open(path, "rb") as handle:
            start = handle.read(6)
        if start == b"\x93NUMPY":
            raise DataError(
                f"{path} is a single .npy array, not an .npz archive of x and y (write it with numpy.savez)"
            )
        raise DataError(f"{path} is not an .npz archive (numpy.savez's zip of .npy arrays)")
    sizes = {}
    with zipfile.ZipFile(path) as archive:
        total = sum(info.file_size for info in archive.infolist())
        if total > MAX_NPZ_BYTES:
            raise DataError(
                f"{path} unpacks to {total / 2**30:.1f} GiB, over the {MAX_NPZ_BYTES // 2**30} GiB an .npz may hold"
            )
        for info in archive.infolist():
            if not info.filename.endswith(".npy"):
                continue
            with archive.open(info) as member:
                try:
                    version = np.lib.format.read_magic(member)
                    header = (
                        np.lib.format.read_array_header_1_0
                        if version == (1, 0)
                        else np.lib.format.read_array_header_2_0
                    )
                    shape, _, dtype = header(member)
                except Exception as error:  # numpy tokenises and evaluates the header: any failure means not an array
                    raise DataError(f"{path}: member {info.filename} is not a .npy array ({error})") from None
            if dtype.hasobject:
                raise DataError(f"{path}: member {info.filename} holds Python objects; only plain arrays are read")
            declared = int(np.prod(shape, dtype=object)) * dtype.itemsize
            if declared > info.file_size:
                raise DataError(f"{path}: member {info.filename} declares {shape} but holds {info.file_size} bytes")
            sizes[info.filename[: -len(".npy")]] = declared
    return sizes


def _load_arrays(path: Path) -> tuple[np.ndarray, np.ndarray, list[str] | None]:
    try:
        names = set(_declared_sizes(path))
        archive = np.load(path, allow_pickle=False)
    except (OSError, zipfile.BadZipFile, EOFError) as error:
        raise DataError(f"cannot read {path}: {error}") from None
    with archive:
        pair = next(((xk, yk) for xk, yk in KEY_PAIRS if xk in names and yk in names), None)
        if pair is None:
            raise DataError(
                f"{path} has keys {sorted(names)}; expected x and y (or x_train and y_train, x_test and y_test)"
            )
        try:
            x, y = archive[pair[0]], archive[pair[1]]
            classes = [str(c) for c in archive["classes"]] if "classes" in names else None
        except (ValueError, OSError, zipfile.BadZipFile, EOFError) as error:
            raise DataError(f"cannot read arrays from {path}: {error}") from None
    return x, y, classes


def _to_nhwc_rgb(x: np.ndarray, path: Path) -> np.ndarray:
    if x.dtype != np.uint8:
        raise DataError(f"{path}: images must be uint8 in 0..255, got {x.dtype}")
    if x.ndim == 3:
        x = x[..., None]
    if x.ndim != 4 or x.shape[-1] not in (1, 3, 4):
        raise DataError(f"{path}: images must be (N, H, W) or (N, H, W, C) with C in 1, 3, 4; got {x.shape}")
    if x.shape[-1] == 4:
        x = x[..., :3]
    return x


def open_npz(path: Path) -> ArrayDataset:
    """Read and validate an .npz dataset; images stay as one in-memory array (use folders for data beyond RAM)."""
    x, y, classes = _load_arrays(path)
    x = _to_nhwc_rgb(x, path)
    if y.ndim != 1 or len(y) != len(x):
        raise DataError(f"{path}: labels must be (N,) with N = {len(x)} images, got {y.shape}")
    if len(x) == 0:
        raise DataError(f"{path}: no images")
    if not np.issubdtype(y.dtype, np.integer) or y.min() < 0:
        raise DataError(f"{path}: labels must be non-negative integers, got {y.dtype} min {y.min()}")
    if int(y.max()) >= MAX_CLASSES:  # checked before the cast: a uint64 2**64-1 would wrap to -1
        raise DataError(f"{path}: a label of {int(y.max())}; labels are class indices below {MAX_CLASSES}")
    if min(x.shape[1:3]) < MIN_SIDE:
        raise DataError(
            f"{path}: images of {x.shape[1]}x{x.shape[2]} px; the models need at least {MIN_SIDE}x{MIN_SIDE}"
        )
    labels = y.astype(np.int64)
    num_classes = int(labels.max()) + 1
    if classes is None:
        classes = [str(c) for c in range(num_classes)]
    elif len(classes) < num_classes:
        raise DataError(f"{path}: {len(classes)} class names but labels go up to {num_classes - 1}")
    return from_arrays(x, labels, classes, source=str(path))


def from_arrays(
    x: np.ndarray, labels: np.ndarray, classes: list[str], source: str, ids: list[str] | None = None
) -> ArrayDataset:
    """An in-memory dataset over (N, H, W, C) uint8 images; its fingerprint hashes the array bytes."""
    digest = hashlib.sha256()
    for array in (x, labels):
        digest.update(str(array.shape).encode())
        digest.update(np.ascontiguousarray(array).tobytes())
    dataset = ArrayDataset(
        source=source,
        kind="npz",
        classes=list(classes),
        ids=ids if ids is not None else [str(i) for i in range(len(x))],
        paths=[""] * len(x),
        labels=labels,
        image_size=(int(x.shape[1]), int(x.shape[2])),
        fingerprint="sha256:" + digest.hexdigest(),
    )
    dataset.images = x
    return dataset


class ArrayDataset(ImageDataset):
    images: np.ndarray

    def subset(self, positions: np.ndarray) -> ArrayDataset:
        """The examples at `positions`, keeping their ids (so results trace back to the source)."""
        positions = np.asarray(positions, dtype=np.int64)
        return from_arrays(
            self.images[positions], self.labels[positions], self.classes, self.source, [self.ids[p] for p in positions]
        )

    def with_images(self, images: np.ndarray) -> ArrayDataset:
        """The same examples with other pixels (a poisoned copy); ids and labels unchanged."""
        return from_arrays(images, self.labels, self.classes, self.source, list(self.ids))

    def load_image(self, index: int) -> torch.Tensor:
        return self._gray_to_rgb(torch.from_numpy(np.ascontiguousarray(self.images[index])).permute(2, 0, 1))

    def load_batch(self, indices):
        positions = np.asarray(indices, dtype=np.int64)
        images = torch.from_numpy(np.ascontiguousarray(self.images[positions])).permute(0, 3, 1, 2)
        return self._gray_to_rgb(images), torch.from_numpy(self.labels[positions]), torch.from_numpy(positions)

    @staticmethod
    def _gray_to_rgb(images: torch.Tensor) -> torch.Tensor:
        channel_dim = images.dim() - 3
        if images.shape[channel_dim] == 1:
            images = images.repeat_interleave(3, dim=channel_dim)
        return images.contiguous()
