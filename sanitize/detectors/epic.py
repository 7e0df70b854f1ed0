"""EPIC applied once (Yang, Liu & Mirzasoleiman 2022): on a trained proxy, per class, facility-location medoids of the
last-layer gradient proxy softmax - onehot (eval mode, no augmentation), and the medoids left alone in their cluster are
flagged. `sanitize train --robust` applies the same rule periodically during training.

Score: 1 / the size of the example's cluster (1 for an isolated medoid).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from sanitize.detectors import Detection, DetectorContext, check, register_detector

if TYPE_CHECKING:  # the detectors' modules stay light: the CLI reads their options without torch
    from sanitize.embeddings import Embeddings


def epic_flags(gradient_proxy: np.ndarray, labels: np.ndarray, num_classes: int, fraction: float) -> Detection:
    from sanitize.medoids import isolated_medoids  # torch: loaded when the rule runs, not when its options are read

    isolated, cluster_size = isolated_medoids(gradient_proxy, labels, num_classes, fraction)
    flags = np.zeros(len(labels), dtype=bool)
    flags[isolated] = True
    return Detection(
        scores=1.0 / np.maximum(cluster_size, 1),
        flags=flags,
        summary={"rule": "epic", "fraction": fraction, "isolated": int(len(isolated))},
    )


@dataclass(frozen=True)
class EpicOptions:
    epic_fraction: float = 0.2  # medoids per class as this fraction of the class (EPIC's subset size)

    def validate(self) -> None:
        check([(0.0 < self.epic_fraction <= 1.0, "epic_fraction must be in (0, 1]")])


@register_detector(EpicOptions)
def epic(embeddings: Embeddings, options: EpicOptions, context: DetectorContext) -> Detection:
    return epic_flags(
        embeddings.logit_gradient(), embeddings.labels, embeddings.meta["num_classes"], options.epic_fraction
    )
