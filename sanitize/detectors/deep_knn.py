"""Deep k-NN (Peri et al. 2020): an example whose label is not the plurality label of its k nearest neighbours in
feature space is removed. Neighbours come from the whole training set, not the example's class.

The paper's guideline puts k between one and two times the number of poisons in a class; given `expected_poisons`
the rule takes k = 2 x expected (and the summary says it was told), otherwise `k_default`. Score: the share of the
k neighbours that disagree with the example's label.
"""

from __future__ import annotations

import numpy as np

from sanitize.config import ScanConfig
from sanitize.density import choose_index, knn
from sanitize.detectors import Detection, register_detector
from sanitize.embeddings import Embeddings

K_DEFAULT = 50


def deep_knn_flags(
    features: np.ndarray,
    labels: np.ndarray,
    num_classes: int,
    k: int,
    index: str = "auto",
    exact_max: int = 50_000,
    seed: int = 0,
) -> Detection:
    n = len(labels)
    _, neighbours = knn(np.asarray(features), k, kind=choose_index(n, index, exact_max), seed=seed)
    votes = np.zeros((n, num_classes), dtype=np.int64)
    np.add.at(votes, (np.repeat(np.arange(n), neighbours.shape[1]), labels[neighbours].ravel()), 1)
    own = votes[np.arange(n), labels]
    flags = own < votes.max(axis=1)  # ties keep the example: its label is among the pluralities
    return Detection(
        scores=1.0 - own / neighbours.shape[1], flags=flags, summary={"rule": "deep_knn", "k": int(neighbours.shape[1])}
    )


@register_detector
def deep_knn(embeddings: Embeddings, config: ScanConfig, progress: bool = True) -> Detection:
    k = 2 * config.expected_poisons if config.expected_poisons else K_DEFAULT
    detection = deep_knn_flags(
        embeddings.features,
        embeddings.labels,
        embeddings.meta["num_classes"],
        k,
        config.index,
        config.exact_max,
        config.seed,
    )
    detection.summary["told_expected_poisons"] = config.expected_poisons
    return detection
