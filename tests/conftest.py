"""Small data the tests build themselves (no ../shared): scikit-learn's digits and synthetic images."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from sanitize.data.digits import digits_arrays, write_image_folder


@pytest.fixture(scope="session")
def digits16() -> tuple[np.ndarray, np.ndarray]:
    return digits_arrays(size=16)


@pytest.fixture(scope="session")
def digits_npz(tmp_path_factory, digits16) -> Path:
    x, y = digits16
    path = tmp_path_factory.mktemp("npz") / "digits.npz"
    np.savez(path, x=x, y=y)
    return path


@pytest.fixture
def digits_folder(tmp_path, digits16) -> Path:
    """400 digit PNGs in 10 class folders (a fresh copy per test, so tests may damage it)."""
    x, y = digits16
    root = tmp_path / "data"
    write_image_folder(root, x[:400], y[:400], [f"digit_{d}" for d in range(10)])
    return root


@pytest.fixture(scope="session")
def mislabeled_npz(tmp_path_factory, digits16) -> tuple[Path, np.ndarray]:
    """1,000 digits, 20 of them moved to a wrong label: the isolated examples EPIC's rule exists to drop."""
    x, y = digits16
    x, y = x[:1000], y[:1000].copy()
    rng = np.random.default_rng(0)
    planted = np.sort(rng.choice(len(y), 20, replace=False))
    y[planted] = (y[planted] + rng.integers(1, 10, 20)) % 10
    path = tmp_path_factory.mktemp("robust") / "mislabeled.npz"
    np.savez(path, x=x, y=y)
    return path, planted
