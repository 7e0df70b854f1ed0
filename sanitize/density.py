"""k-nearest-neighbour search with FAISS, an index chosen by size, GPU when faiss sees one; distances -> isolation.

Indexes: `flat` (exact), `ivf` (inverted lists, approximate, for classes beyond `exact_max`) and `hnsw` (graph,
approximate, CPU only). `auto` takes flat up to `exact_max` points and IVF above.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import faiss


def _faiss():
    """faiss, imported on first use (the CLI's help and option defaults load no index library)."""
    import faiss

    return faiss


CHUNK_BYTES = 16 * 2**20  # a pass over every row of an (N, C) or (N, D) array holds at most this much of it at a time


def row_chunks(n: int, row_bytes: int, budget: int = CHUNK_BYTES) -> list[slice]:
    """Slices over `n` rows of `row_bytes` each, every one within `budget` bytes (at least one row): passes over
    embeddings hold the same memory at 10,000 rows or 1.28M, and at 10 classes or 1,000."""
    step = max(1, budget // max(1, row_bytes))
    return [slice(start, min(start + step, n)) for start in range(0, n, step)]


def softmax(logits: np.ndarray) -> np.ndarray:
    """The proxy's class probabilities, row by row (shifted by the row maximum: no overflow)."""
    p = np.exp(logits - logits.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    return p


def gpu_available() -> bool:
    faiss = _faiss()
    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


def choose_index(n: int, requested: str = "auto", exact_max: int = 50_000) -> str:
    if requested != "auto":
        return requested
    return "flat" if n <= exact_max else "ivf"


def ivf_lists(n: int) -> int:
    """About 4 sqrt(n) inverted lists, each with >= 39 training points as faiss asks."""
    return int(max(1, min(4 * math.sqrt(n), n // 39, 65_536)))


def build_index(x: np.ndarray, kind: str, seed: int = 0, nprobe: int | None = None) -> faiss.Index:
    """An index over the rows of `x` (float32, C-contiguous)."""
    faiss = _faiss()
    n, d = x.shape
    if kind == "flat":
        index = faiss.IndexFlatL2(d)
    elif kind == "ivf":
        nlist = ivf_lists(n)
        index = faiss.IndexIVFFlat(faiss.IndexFlatL2(d), d, nlist)
        index.cp.seed = seed
        index.train(x)
        index.nprobe = nprobe or min(nlist, 32)  # recall@10 1.0 on 1M x 128 (reports/scan-benchmark), 0.94 at 16
    elif kind == "hnsw":
        index = faiss.IndexHNSWFlat(d, 32)
        index.hnsw.efConstruction = 80
    else:
        raise ValueError(f"unknown index kind {kind!r}")
    if gpu_available() and kind != "hnsw":
        index = faiss.index_cpu_to_gpu(faiss.StandardGpuResources(), 0, index)
    index.add(x)
    return index


def knn(
    x: np.ndarray, k: int, kind: str = "flat", seed: int = 0, nprobe: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Euclidean distances (n, k) and positions (n, k) of each row's k nearest other rows, nearest first."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    n = len(x)
    k = min(k, n - 1)
    index = build_index(x, kind, seed=seed, nprobe=nprobe)
    if kind == "hnsw":
        index.hnsw.efSearch = max(64, 2 * (k + 1))
    squared, neighbours = index.search(x, k + 1)
    return _drop_self(np.sqrt(np.maximum(squared, 0)), neighbours, k)


def _drop_self(distances: np.ndarray, neighbours: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Remove each row's own entry (or, when exact duplicates hid it, the farthest one) to keep k per row."""
    n = len(neighbours)
    is_self = neighbours == np.arange(n)[:, None]
    drop = np.where(is_self.any(axis=1), is_self.argmax(axis=1), k)
    keep = np.ones_like(is_self)
    keep[np.arange(n), drop] = False
    return distances[keep].reshape(n, k), neighbours[keep].reshape(n, k)


def robust_z(values: np.ndarray) -> np.ndarray:
    """Iglewicz & Hoaglin's modified z-score, 0.6745 (x - median) / MAD, with a mean-deviation fallback at MAD = 0."""
    median = np.median(values)
    deviation = np.abs(values - median)
    mad = np.median(deviation)
    if mad > 0:
        return 0.6745 * (values - median) / mad
    mean_dev = deviation.mean()
    return (values - median) / (1.2533 * mean_dev) if mean_dev > 0 else np.zeros_like(values)


def z_to_score(z: np.ndarray, z_at_half: float = 3.5) -> np.ndarray:
    """Map z to [0, 1): 0 at or below the median, 0.5 at `z_at_half`, -> 1 as z grows; monotone, never saturating."""
    positive = np.maximum(z, 0.0)
    return positive / (positive + z_at_half)
