"""Small real image datasets built from scikit-learn's bundled digits (no downloads): for the demo and the tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image


def digits_arrays(size: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """The 1,797 8x8 digits as (N, size, size, 3) uint8 RGB images and (N,) labels."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    gray = (digits.images * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)
    images = np.stack([np.asarray(Image.fromarray(g).resize((size, size), Image.BILINEAR)) for g in gray])
    return np.repeat(images[..., None], 3, axis=3), digits.target.astype(np.int64)


def mislabel(labels: np.ndarray, fraction: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Move `fraction` of the examples to a random other class; returns new labels and the moved positions."""
    rng = np.random.default_rng(seed)
    moved = np.sort(rng.choice(len(labels), size=max(1, round(fraction * len(labels))), replace=False))
    new = labels.copy()
    new[moved] = (labels[moved] + rng.integers(1, labels.max() + 1, size=len(moved))) % (labels.max() + 1)
    return new, moved


def stamp_group(images: np.ndarray, labels: np.ndarray, label: int, count: int, seed: int = 0) -> np.ndarray:
    """A stand-in for a targeted attack's poisons: `count` images of one class (never a moved one, as the caller
    passes only clean ones) share a stamped corner pattern, so they form a tight group of their own inside that
    class, as poisons crafted for one target do. Changes `images` in place; returns the stamped positions."""
    rng = np.random.default_rng([seed, 7])
    stamped = np.sort(rng.choice(np.flatnonzero(labels == label), count, replace=False))
    side = images.shape[1] // 3  # a third of the side, in 2-pixel squares: a 1-pixel quarter-side checkerboard was
    # caught or missed depending on the thread count that trained the proxy
    pattern = ((np.indices((side, side)) // 2).sum(axis=0) % 2 * 255).astype(np.uint8)
    images[stamped, :side, :side, :] = pattern[None, :, :, None]
    return stamped


def write_image_folder(root: Path, images: np.ndarray, labels: np.ndarray, class_names: list[str]) -> list[str]:
    """Write PNGs as root/<class>/<index>.png (lossless); returns the ids (relative paths) in input order."""
    ids = []
    for name in class_names:
        (root / name).mkdir(parents=True, exist_ok=True)
    for i, (image, label) in enumerate(zip(images, labels)):
        rel = f"{class_names[label]}/{i:06d}.png"
        Image.fromarray(image).save(root / rel)
        ids.append(rel)
    return ids
