"""How much the gradient sketch changes what the scan sees when the head is ImageNet's (C = 1,000).

    python benchmarks/gradient_sketch.py --out reports/gradient-sketch

Above `exact_gradient_max` (8,192) dimensions the last-layer gradient g (x) f~ (C x (D + 1): 513,000 for a ResNet-18
on ImageNet) is sketched to m dimensions (sanitize/embeddings.py). Its exact geometry stays computable without
forming it, since <G_i, G_j> = <g_i, g_j><f~_i, f~_j>: per class, the exact pairwise distances come from two Gram
matrices. For every class of a synthetic ImageNet-shaped set (class-clustered non-negative features, as a ResNet's
pooled ones are, and logits from a linear head scaled so that the mean top softmax probability is a trained network's)
this compares, exact against sketched: the recall of the k nearest neighbours at knn_density's two scales, the rank
correlation of its neighbour statistic (distance to the k-th) and of its isolation z (the larger over the two scales
of the modified z within the class), and the overlap of the 1% most isolated examples by that z.
Writes OUT/results.json and OUT/README.md.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from scipy.stats import spearmanr

from sanitize.density import robust_z, softmax
from sanitize.detectors.knn_density import KnnDensityOptions, neighbour_statistic, scales
from sanitize.embeddings import GradientEmbedder
from sanitize.embeddings import softmax_minus_onehot as gradient_factor


def synthetic_head(classes: int, per_class: int, dim: int, confidence: float, seed: int):
    """(features (N, D) >= 0, logits (N, C), labels): class-clustered features and a linear head whose scale gives a
    mean top softmax probability of `confidence`."""
    rng = np.random.default_rng(seed)
    means = rng.normal(size=(classes, dim)).astype(np.float32)
    labels = np.repeat(np.arange(classes), per_class)
    features = np.abs(means[labels] + rng.normal(size=(len(labels), dim)).astype(np.float32))
    centred = features - features.mean(axis=0)
    raw = centred @ (means / np.linalg.norm(means, axis=1, keepdims=True)).T
    low, high = 0.0, 10.0
    for _ in range(40):  # bisect the head's scale for the wanted mean confidence
        scale = (low + high) / 2
        low, high = (scale, high) if softmax(scale * raw).max(axis=1).mean() < confidence else (low, scale)
    return features, (scale * raw).astype(np.float32), labels


def pairwise(vectors: np.ndarray) -> np.ndarray:
    squared = (vectors.astype(np.float64) ** 2).sum(axis=1)
    return np.sqrt(np.maximum(squared[:, None] + squared[None, :] - 2 * vectors @ vectors.T, 0.0))


def exact_pairwise(g: np.ndarray, f_tilde: np.ndarray) -> np.ndarray:
    """Distances between the gradients g_i (x) f~_i without forming them: <G_i, G_j> = <g_i, g_j><f~_i, f~_j>."""
    gram = (g.astype(np.float64) @ g.T) * (f_tilde.astype(np.float64) @ f_tilde.T)
    squared = np.diag(gram)
    return np.sqrt(np.maximum(squared[:, None] + squared[None, :] - 2 * gram, 0.0))


def top_overlap(a: np.ndarray, b: np.ndarray, fraction: float) -> float:
    """Share of the `fraction` highest of `a` that are also among the `fraction` highest of `b`."""
    count = max(1, round(fraction * len(a)))
    return len(set(np.argsort(-a)[:count]) & set(np.argsort(-b)[:count])) / count


def neighbours(distances: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(sorted distances to the others, their indices), self excluded."""
    masked = distances + np.diag(np.full(len(distances), np.inf))
    order = np.argsort(masked, axis=1)[:, :-1]
    return np.take_along_axis(masked, order, axis=1), order


def compare(classes: int, per_class: int, dim: int, sketch_dim: int, confidence: float, seed: int) -> dict:
    features, logits, labels = synthetic_head(classes, per_class, dim, confidence, seed)
    g = gradient_factor(logits, labels)
    f_tilde = np.concatenate([features, np.ones((len(features), 1), np.float32)], axis=1)
    embedder = GradientEmbedder(classes, dim, sketch_dim, exact_max=0, seed=seed)
    started = time.perf_counter()
    sketched = embedder(torch.from_numpy(g), torch.from_numpy(f_tilde)).numpy()
    sketch_seconds = time.perf_counter() - started
    o = KnnDensityOptions()
    recall: dict[int, list[float]] = {}
    correlation: dict[int, list[float]] = {}
    z_exact, z_sketch = np.zeros(len(labels)), np.zeros(len(labels))
    for c in range(classes):
        members = np.flatnonzero(labels == c)
        d_exact, i_exact = neighbours(exact_pairwise(g[members], f_tilde[members]))
        d_sketch, i_sketch = neighbours(pairwise(sketched[members]))
        ks = scales(len(members), o.k_small, o.k_fraction, o.k_max)
        for k in ks:
            hits = [len(set(a[:k]) & set(b[:k])) / k for a, b in zip(i_exact, i_sketch)]
            recall.setdefault(k, []).append(float(np.mean(hits)))
            statistic_exact = neighbour_statistic(d_exact, k, o.distance)
            statistic_sketch = neighbour_statistic(d_sketch, k, o.distance)
            correlation.setdefault(k, []).append(float(spearmanr(statistic_exact, statistic_sketch).statistic))
        for z, d in ((z_exact, d_exact), (z_sketch, d_sketch)):
            z[members] = np.max([robust_z(np.log(neighbour_statistic(d, k, o.distance) + 1e-12)) for k in ks], axis=0)
    return {
        "classes": classes,
        "per_class": per_class,
        "feature_dim": dim,
        "gradient_dim": classes * (dim + 1),
        "sketch_dim": sketch_dim,
        "mean_top_probability": float(softmax(logits).max(axis=1).mean()),
        "knn_recall": {str(k): float(np.mean(v)) for k, v in recall.items()},
        "statistic_spearman": {str(k): float(np.mean(v)) for k, v in correlation.items()},
        "z_spearman": float(spearmanr(z_exact, z_sketch).statistic),
        "top_1_percent_overlap": top_overlap(z_exact, z_sketch, 0.01),
        "sketch_seconds_per_1000": round(1000 * sketch_seconds / len(labels), 4),
        "bytes_per_example": 4 * sketch_dim,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--per-class", type=int, default=60)
    parser.add_argument("--feature-dim", type=int, default=512)
    parser.add_argument("--sketch-dims", default="256,1024,4096")
    parser.add_argument("--confidence", type=float, default=0.7, help="Mean top softmax probability of the head.")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    rows = [
        compare(args.classes, args.per_class, args.feature_dim, int(m), args.confidence, args.seed)
        for m in args.sketch_dims.split(",")
    ]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(rows, indent=2) + "\n")
    for row in rows:
        print(json.dumps(row))


if __name__ == "__main__":
    main()
