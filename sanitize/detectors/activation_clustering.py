"""Activation clustering (Chen et al. 2018): per class, reduce the penultimate activations to 10 independent
components, split them by 2-means, and call the smaller cluster poisoned when it holds less than 35% of the class and
the split is real (silhouette score above 0.10, the threshold of ART's silhouette analysis).

Size alone would flag the smaller half of every clean class; requiring a cohesive split is what keeps clean classes
clean, and no poison count is needed. Score: the example's cluster's (1 - relative size) times the class's
silhouette when its cluster is the smaller one, else 0.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from sanitize.detectors import Detection, DetectorContext, register_detector

if TYPE_CHECKING:  # the detectors' modules stay light: the CLI reads their options without torch
    from sanitize.embeddings import Embeddings

COMPONENTS = 10
SIZE_THRESHOLD = 0.35
SILHOUETTE_THRESHOLD = 0.10
SILHOUETTE_SAMPLE = 10_000  # silhouette is quadratic in n; a seeded sample above this size


def _independent_components(x: np.ndarray, seed: int) -> np.ndarray:
    """Up to COMPONENTS independent components; dead (constant) and collinear directions are dropped first, since
    FastICA's whitening divides by their zero variance."""
    from sklearn.decomposition import FastICA  # scikit-learn loads when the rule runs, not when its options are read
    from sklearn.exceptions import ConvergenceWarning

    centred = x - x.mean(axis=0)
    _, singular, vt = np.linalg.svd(centred, full_matrices=False)
    rank = int((singular > singular[0] * 1e-6).sum()) if singular.size and singular[0] > 0 else 0
    components = min(COMPONENTS, rank)
    if components < 2:
        return centred @ vt[:1].T if rank else np.zeros((len(x), 1))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        return FastICA(n_components=components, whiten="unit-variance", random_state=seed, max_iter=400).fit_transform(
            centred @ vt[:rank].T
        )


def activation_cluster_flags(features: np.ndarray, labels: np.ndarray, num_classes: int, seed: int = 0) -> Detection:
    from sklearn.cluster import KMeans
    from sklearn.metrics import silhouette_score

    n = len(labels)
    scores, flags = np.zeros(n), np.zeros(n, dtype=bool)
    per_class = {}
    for c in range(num_classes):
        members = np.flatnonzero(labels == c)
        x = np.asarray(features[members], dtype=np.float64)
        if len(members) < max(2 * COMPONENTS, 4):
            per_class[c] = {"n": int(len(members)), "note": "too few examples to cluster"}
            continue
        reduced = _independent_components(x, seed)
        clusters = KMeans(n_clusters=2, n_init=10, random_state=seed).fit_predict(reduced)
        sizes = np.bincount(clusters, minlength=2) / len(members)
        smaller = int(np.argmin(sizes))
        silhouette = float(
            silhouette_score(reduced, clusters, sample_size=min(len(members), SILHOUETTE_SAMPLE), random_state=seed)
        )
        in_smaller = clusters == smaller
        scores[members[in_smaller]] = (1 - sizes[smaller]) * max(silhouette, 0.0)
        poisoned = sizes[smaller] < SIZE_THRESHOLD and silhouette > SILHOUETTE_THRESHOLD
        flags[members[in_smaller]] = poisoned
        per_class[c] = {
            "n": int(len(members)),
            "smaller_fraction": round(float(sizes[smaller]), 4),
            "silhouette": round(silhouette, 4),
            "flagged": bool(poisoned),
        }
    return Detection(
        scores=scores,
        flags=flags,
        summary={
            "rule": "activation_clustering",
            "size_threshold": SIZE_THRESHOLD,
            "silhouette_threshold": SILHOUETTE_THRESHOLD,
            "per_class": per_class,
        },
    )


@dataclass(frozen=True)
class ActivationClusteringOptions:
    """No options: the size and silhouette thresholds are the method's (module constants)."""


@register_detector(ActivationClusteringOptions)
def activation_clustering(
    embeddings: Embeddings, options: ActivationClusteringOptions, context: DetectorContext
) -> Detection:
    return activation_cluster_flags(
        embeddings.features, embeddings.labels, embeddings.meta["num_classes"], context.seed
    )
