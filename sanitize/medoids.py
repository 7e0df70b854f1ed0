"""Facility-location medoids and EPIC's isolation rule (Yang, Liu & Mirzasoleiman 2022).

Per class, medoids maximise F(S) = sum_i max_{j in S} sim(i, j) with sim = max distance - distance, chosen by lazy
greedy (F is submodular, so a gain computed earlier bounds the gain now; ties go to the lower index, so the medoids
are deterministic). Every example joins its nearest medoid; a medoid whose cluster is itself alone is isolated: that is
what a poison pulled towards the target's gradient becomes. Classes up to `dense_max` examples use the dense distance
matrix; larger ones a sparse k-NN similarity from FAISS (a point only counts its k nearest as candidates), so no
N_c x N_c matrix is ever formed.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Iterable

import numpy as np
import torch
from scipy import sparse

from sanitize.density import choose_index, knn


def medoid_count(class_size: int, fraction: float) -> int:
    """EPIC's per-class budget, the class's share of fraction x N: ceil(fraction x class size), at least 1."""
    return int(min(class_size, max(1, math.ceil(fraction * class_size))))


def _lazy_greedy(column_gain, n_candidates: int, count: int, update) -> list[int]:
    """Generic lazy greedy: `column_gain(j)` is j's marginal gain now, `update(j)` commits j."""
    heap = [(-column_gain(j), j) for j in range(n_candidates)]
    heapq.heapify(heap)
    chosen: list[int] = []
    while heap and len(chosen) < count:
        _, j = heapq.heappop(heap)
        gain = column_gain(j)
        if not heap or gain >= -heap[0][0] - 1e-12 * max(1.0, abs(gain)):
            chosen.append(j)
            update(j)
        else:
            heapq.heappush(heap, (-gain, j))
    return chosen


def facility_location(points: np.ndarray, count: int, dense_max: int = 5000, k: int = 64, seed: int = 0) -> np.ndarray:
    """Positions of `count` medoids of `points` (n, d), in the order lazy greedy picked them."""
    n = len(points)
    count = min(count, n)
    x = torch.as_tensor(np.ascontiguousarray(points, dtype=np.float32))
    if n <= dense_max:
        distance = torch.cdist(x, x).numpy().astype(np.float64)
        similarity = distance.max() - distance
        best = np.zeros(n)

        def gain(j: int) -> float:
            return float(np.maximum(similarity[:, j] - best, 0).sum())

        def update(j: int) -> None:
            np.maximum(best, similarity[:, j], out=best)
    else:
        distances, neighbours = knn(points, min(k, n - 1), kind=choose_index(n), seed=seed)
        rows = np.repeat(np.arange(n), neighbours.shape[1] + 1)
        cols = np.concatenate([np.arange(n)[:, None], neighbours], axis=1).ravel()
        values = np.concatenate([np.zeros((n, 1)), distances], axis=1).ravel()
        values = values.max() - values + 1e-6  # similarity; every stored entry > 0
        similarity = sparse.csc_matrix((values, (rows, cols)), shape=(n, n))
        best = np.zeros(n)

        def gain(j: int) -> float:
            start, end = similarity.indptr[j], similarity.indptr[j + 1]
            column_rows, column_values = similarity.indices[start:end], similarity.data[start:end]
            return float(np.maximum(column_values - best[column_rows], 0).sum())

        def update(j: int) -> None:
            start, end = similarity.indptr[j], similarity.indptr[j + 1]
            column_rows, column_values = similarity.indices[start:end], similarity.data[start:end]
            np.maximum.at(best, column_rows, column_values)

    return np.asarray(_lazy_greedy(gain, n, count, update), dtype=np.int64)


def assign(points: np.ndarray, medoids: np.ndarray, chunk: int = 8192) -> np.ndarray:
    """Index into `medoids` of each point's nearest medoid (a medoid is its own nearest)."""
    x = torch.as_tensor(np.ascontiguousarray(points, dtype=np.float32))
    centres = x[torch.as_tensor(medoids)]
    nearest = [torch.cdist(x[i : i + chunk], centres).argmin(dim=1) for i in range(0, len(x), chunk)]
    result = torch.cat(nearest).numpy()
    result[medoids] = np.arange(len(medoids))
    return result


def isolated_medoids(
    space: np.ndarray,
    labels: np.ndarray,
    num_classes: int,
    fraction: float,
    dense_max: int = 5000,
    classes: Iterable[int] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """EPIC's rule: per class, facility-location medoids (ceil(fraction x class size)), nearest-medoid clusters, and
    the medoids whose cluster is a singleton. Returns (isolated positions, cluster size of every row; 0 outside
    `classes`). `space` may be memory-mapped: only one class's rows are read at a time."""
    cluster_size = np.zeros(len(labels), dtype=np.int64)
    isolated = [np.zeros(0, np.int64)]
    for c in range(num_classes) if classes is None else classes:
        members = np.flatnonzero(labels == c)
        if len(members) == 0:
            continue
        points = np.asarray(space[members], dtype=np.float32)
        medoids = facility_location(points, medoid_count(len(members), fraction), dense_max=dense_max)
        owner = assign(points, medoids)
        sizes = np.bincount(owner, minlength=len(medoids))
        cluster_size[members] = sizes[owner]
        isolated.append(members[medoids[sizes == 1]])
    return np.sort(np.concatenate(isolated)), cluster_size
