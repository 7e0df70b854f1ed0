"""Spectral signatures (Tran, Li & Madry 2018): per class, centre the feature representations, score each example by
its squared projection on the top right singular vector, and remove the 1.5 x expected-count highest scores.

The rule needs an upper bound on the number of poisons: it must be given (`expected_poisons`) and the summary says it
was. Scores in [0, 1) for ranking: the squared projection's modified z-score within the class, mapped as knn_density's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from sanitize.density import robust_z, z_to_score
from sanitize.detectors import Detection, DetectorContext, check, register_detector
from sanitize.errors import SanitizeError

if TYPE_CHECKING:  # the detectors' modules stay light: the CLI reads their options without torch
    from sanitize.embeddings import Embeddings

REMOVAL_FACTOR = 1.5


def spectral_signature_flags(
    features: np.ndarray, labels: np.ndarray, num_classes: int, expected_poisons: int
) -> Detection:
    n = len(labels)
    scores, flags = np.zeros(n), np.zeros(n, dtype=bool)
    remove = int(round(REMOVAL_FACTOR * expected_poisons))
    for c in range(num_classes):
        members = np.flatnonzero(labels == c)
        if len(members) < 2:
            continue
        centred = np.asarray(features[members], dtype=np.float64)
        centred -= centred.mean(axis=0)
        top = np.linalg.svd(centred, full_matrices=False)[2][0]
        projection = (centred @ top) ** 2
        scores[members] = z_to_score(robust_z(projection))
        flags[members[np.argsort(-projection, kind="stable")[: min(remove, len(members))]]] = True
    return Detection(
        scores=scores,
        flags=flags,
        summary={"rule": "spectral_signatures", "removed_per_class": remove, "told_expected_poisons": expected_poisons},
    )


@dataclass(frozen=True)
class SpectralSignaturesOptions:
    expected_poisons: int | None = None  # required: the rule removes 1.5 x this many per class

    def validate(self) -> None:
        check([(self.expected_poisons is None or self.expected_poisons >= 1, "expected_poisons must be >= 1")])


@register_detector(SpectralSignaturesOptions)
def spectral_signatures(
    embeddings: Embeddings, options: SpectralSignaturesOptions, context: DetectorContext
) -> Detection:
    if not options.expected_poisons:
        raise SanitizeError(
            "spectral_signatures removes 1.5 x the expected number of poisons per class: give --expected-poisons"
        )
    return spectral_signature_flags(
        embeddings.features, embeddings.labels, embeddings.meta["num_classes"], options.expected_poisons
    )
