"""The default rule: per-class k-NN isolation at two scales, robustly normalised within each class.

The small scale (k_small neighbours) finds lone points. Poisons crafted for one target chase the same gradient and
can form a tight group of their own, which a small k sees as dense; the large scale (k = k_fraction of the class,
capped at k_max) must leave such a group to find its neighbours, so a small dense group far from the bulk of its
class is isolated there. Per scale and class: log of the mean distance to the k neighbours, modified z-score
(median / MAD), and the larger of the two scales is mapped to [0, 1) with 0.5 at z = 3.5 (Iglewicz & Hoaglin's
outlier cut-off). Nothing here knows the poison budget or rate.
"""

from __future__ import annotations

import numpy as np
from tqdm import tqdm

from sanitize.config import ScanConfig
from sanitize.density import choose_index, knn, robust_z, z_to_score
from sanitize.detectors import Detection, register_detector
from sanitize.embeddings import Embeddings, cross_entropy


def scales(n: int, k_small: int, k_fraction: float, k_max: int) -> list[int]:
    """The neighbour counts used for a class of n examples (each < n)."""
    small = min(k_small, n - 1)
    large = min(max(small, round(k_fraction * n)), k_max, n - 1)
    return sorted({small, large})


@register_detector
def knn_density(embeddings: Embeddings, config: ScanConfig, progress: bool = True) -> Detection:
    """The default: two-scale per-class k-NN isolation in the space `config.embedding` names."""
    loss = cross_entropy(np.asarray(embeddings.logits), embeddings.labels) if config.low_loss_weight else None
    return knn_isolation(
        embeddings.space(config.embedding), embeddings.labels, embeddings.meta["num_classes"], threshold=config.threshold,
        k_small=config.k_small, k_fraction=config.k_fraction, k_max=config.k_max, distance=config.distance,
        loss=loss, low_loss_weight=config.low_loss_weight, index=config.index, exact_max=config.exact_max,
        seed=config.seed, progress=progress,
    )


def knn_isolation(
    space: np.ndarray,
    labels: np.ndarray,
    num_classes: int,
    threshold: float = 0.5,
    k_small: int = 10,
    k_fraction: float = 0.2,
    k_max: int = 256,
    distance: str = "mean",
    loss: np.ndarray | None = None,
    low_loss_weight: float = 0.0,
    index: str = "auto",
    exact_max: int = 50_000,
    seed: int = 0,
    progress: bool = True,
) -> Detection:
    n = len(labels)
    scores = np.zeros(n, dtype=np.float64)
    neighbours = np.full((n, k_small), -1, dtype=np.int64)
    per_class = {}
    for c in tqdm(range(num_classes), desc="density", unit="class", disable=not progress):
        members = np.flatnonzero(labels == c)
        if len(members) < 3:
            per_class[c] = {"n": int(len(members)), "note": "fewer than 3 examples: not scored"}
            continue
        ks = scales(len(members), k_small, k_fraction, k_max)
        kind = choose_index(len(members), index, exact_max)
        distances, nearest = knn(np.asarray(space[members]), max(ks), kind=kind, seed=seed)
        statistic = (lambda k: distances[:, :k].mean(axis=1)) if distance == "mean" else (lambda k: distances[:, k - 1])
        z = np.stack([robust_z(np.log(statistic(k) + 1e-12)) for k in ks]).max(axis=0)
        if loss is not None and low_loss_weight:
            ease = robust_z(-np.log(loss[members] + 1e-12))
            z = (z + low_loss_weight * ease) / np.sqrt(1 + low_loss_weight**2)
        scores[members] = z_to_score(z)
        width = min(k_small, nearest.shape[1])
        neighbours[members, :width] = members[nearest[:, :width]]
        per_class[c] = {"n": int(len(members)), "k": ks, "index": kind}
    return Detection(
        scores=scores,
        flags=scores >= threshold,
        summary={"rule": "knn_density", "threshold": threshold, "distance": distance, "low_loss_weight": low_loss_weight if loss is not None else 0.0,
                 "per_class": per_class},
        arrays={"neighbours": neighbours},
    )
