"""The most closed group of a class's k-NN graph: a set whose members name one another and that the rest rarely names.

A scan-aware attacker can pull its poisons into one tight group inside their class (attacks.adaptive's `clump` term):
no member is a lone point, so isolation rules rank them below clean examples, yet the group is closed, its members'
nearest neighbours each other and almost nobody else's. Closure is measured by conductance (the edges leaving a set
over the smaller of its volume and the rest's) in the union k-NN graph of the class (an edge where either end names
the other). The lowest-conductance set within a size range is searched by sweep cuts along the leading eigenvectors of
the normalised graph (spectral partitioning, Cheeger's inequality); measured on real scans in
reports/adaptive-attack/closed-groups. Sparse throughout: a class of n examples costs O(n k) memory.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

EIGENVECTORS = 8  # leading non-trivial eigenvectors swept
MIN_CLASS = 20  # smaller classes are not searched (too few examples for a group and a rest)


class ClosedGroup(NamedTuple):
    """A class's most closed set (positions in the class, sorted), its conductance, and the lowest conductance the
    sweeps reached at every set size (entry t: t + 1 examples), the class's profile."""

    members: np.ndarray
    conductance: float
    profile: np.ndarray


def class_graph(neighbours: np.ndarray, kind: str = "union"):
    """The symmetric, unweighted k-NN graph (scipy CSR) of one class from its (n, k) neighbour positions in the class
    (-1: none): `union` has an edge where either end names the other, `mutual` where both do."""
    from scipy.sparse import csr_matrix

    n, k = neighbours.shape
    rows, cols = np.repeat(np.arange(n), k), neighbours.ravel()
    named = (cols >= 0) & (cols != rows)
    directed = csr_matrix((np.ones(int(named.sum())), (rows[named], cols[named])), shape=(n, n))
    directed.data[:] = 1.0  # a neighbour named twice is one edge
    graph = directed.multiply(directed.T) if kind == "mutual" else directed.maximum(directed.T)
    return csr_matrix(graph)


def prefix_conductance(order: np.ndarray, graph, degrees: np.ndarray) -> np.ndarray:
    """The conductance of every prefix of `order` (entry t: its first t + 1 examples), in O(edges). An edge is inside
    the prefix from the length that reaches the later of its two ends."""
    rank = np.empty(len(order), dtype=np.int64)
    rank[order] = np.arange(len(order))
    edges = graph.tocoo()
    once = edges.row < edges.col
    joins = np.maximum(rank[edges.row[once]], rank[edges.col[once]])
    internal = np.cumsum(np.bincount(joins, weights=edges.data[once], minlength=len(order)))
    volume = np.cumsum(degrees[order])
    smaller = np.minimum(volume, volume[-1] - volume)
    return np.divide(volume - 2 * internal, smaller, out=np.full(len(order), np.inf), where=smaller > 0)


def set_conductance(graph, inside: np.ndarray) -> float:
    """The conductance of one set (a boolean mask over the class) in `graph`."""
    degrees = np.asarray(graph.sum(axis=1)).ravel()
    volume = degrees[inside].sum()
    internal = graph[inside][:, inside].sum()
    smaller = min(volume, degrees.sum() - volume)
    return float((volume - internal) / smaller) if smaller > 0 else float("inf")


def size_range(n: int, min_fraction: float, max_fraction: float) -> tuple[int, int]:
    """The smallest and largest set searched in a class of n (at least 2 examples; empty when max < min)."""
    return max(int(np.ceil(min_fraction * n)), 2), int(max_fraction * n)


def closed_group(graph, sizes: tuple[int, int], seed: int = 0) -> ClosedGroup:
    """The lowest-conductance set of `graph` (one class) of `sizes[0]` to `sizes[1]` examples found by sweep cuts.
    Raises ValueError for a class under MIN_CLASS examples or an empty size range."""
    from scipy.sparse import diags
    from scipy.sparse.linalg import ArpackNoConvergence, eigsh

    n = graph.shape[0]
    if n < MIN_CLASS or not 1 <= sizes[0] <= sizes[1] < n:
        raise ValueError(f"a class of {n} examples has no sets of {sizes[0]}-{sizes[1]} to search")
    degrees = np.asarray(graph.sum(axis=1)).ravel()
    scale = 1 / np.sqrt(np.maximum(degrees, 1e-12))
    normalised = diags(scale) @ graph @ diags(scale)
    start = np.random.default_rng(seed).random(n)
    try:
        _, vectors = eigsh(normalised, k=min(EIGENVECTORS + 1, n - 2), which="LA", v0=start)
    except ArpackNoConvergence as partial:  # the vectors that converged still give sweeps
        vectors = partial.eigenvectors
    allowed = np.zeros(n, dtype=bool)
    allowed[sizes[0] - 1 : sizes[1]] = True
    profile = np.full(n, np.inf)
    best, best_conductance = np.zeros(0, dtype=np.int64), float("inf")
    for vector in vectors.T:
        ordered = np.argsort(vector * scale, kind="stable")
        for order in (ordered, ordered[::-1]):
            conductance = prefix_conductance(order, graph, degrees)
            profile = np.minimum(profile, conductance)
            length = int(np.argmin(np.where(allowed, conductance, np.inf))) + 1
            if conductance[length - 1] < best_conductance:
                best, best_conductance = np.sort(order[:length]), float(conductance[length - 1])
    return ClosedGroup(best, best_conductance, profile)


def local_neighbours(neighbours: np.ndarray, members: np.ndarray, n_total: int) -> np.ndarray:
    """The (len(members), k) neighbour lists of one class as positions in `members` (-1 where a neighbour is absent
    or outside the class), from lists of dataset indices."""
    position = np.full(n_total, -1, dtype=np.int64)
    position[members] = np.arange(len(members))
    rows = np.asarray(neighbours[members])
    return np.where(rows >= 0, position[np.maximum(rows, 0)], -1)
