"""Deep k-NN (Peri et al. 2020): an example whose label is not the plurality label of its k nearest neighbours in
feature space is removed. Neighbours come from the whole training set, not the example's class.

The paper's guideline puts k between one and two times the number of poisons in a class; given `expected_poisons`
the rule takes k = 2 x expected (and the summary says it was told), otherwise `k_default`. Score: the share of the
k neighbours that disagree with the example's label.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from sanitize.density import choose_index, knn
from sanitize.detectors import Detection, DetectorContext, check, register_detector

if TYPE_CHECKING:  # the detectors' modules stay light: the CLI reads their options without torch
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


@dataclass(frozen=True)
class DeepKnnOptions:
    expected_poisons: int | None = None  # told the poison count: k = 2 x this (the paper's guideline), else K_DEFAULT

    def validate(self) -> None:
        check([(self.expected_poisons is None or self.expected_poisons >= 1, "expected_poisons must be >= 1")])


@register_detector(DeepKnnOptions)
def deep_knn(embeddings: Embeddings, options: DeepKnnOptions, context: DetectorContext) -> Detection:
    k = 2 * options.expected_poisons if options.expected_poisons else K_DEFAULT
    features, labels = embeddings.features, embeddings.labels
    detection = deep_knn_flags(
        features, labels, embeddings.meta["num_classes"], k, context.index, context.exact_max, context.seed
    )
    detection.summary["told_expected_poisons"] = options.expected_poisons
    return detection
