"""The default rule: per-class k-NN isolation at two scales, robustly normalised within each class.

The small scale (k_small neighbours) finds lone points. Poisons crafted for one target chase the same gradient and
can form a tight group of their own, which a small k sees as dense; the large scale (k = k_fraction of the class,
capped at k_max) must leave such a group to find its neighbours, so a small dense group far from the bulk of its
class is isolated there. Per scale and class: log of the mean distance to the k neighbours (or of the distance to the
k-th, which says more about a group's edge), modified z-score (median / MAD); the larger of the two scales is the
isolation z.

Options, measured in reports/detection-cpu: the isolation can be combined with how *easy* the proxy finds each
example (class-wise z of -log loss, weight w: z = max(z_isolation, (z_isolation + w z_ease) / sqrt(1 + w^2)), so a
mislabeled example, isolated but hard, stays flagged), since most gradient-matching poisons are fitted faster and
tighter than their class; and a second pass (`alarmed_class_flags`) looks
again inside classes that hold improbably many flags, for the few hard poisons that carry the attack (or, with
`alarm_rule`, for the examples the proxy confidently assigns to another class). Scores map z to
[0, 1) with 0.5 at z = 3.5 (Iglewicz & Hoaglin's outlier cut-off). Nothing here knows the poison budget or rate.
"""

from __future__ import annotations

import numpy as np
from scipy.stats import poisson
from tqdm import tqdm

from sanitize.config import ALARM_RULES, ScanConfig
from sanitize.density import choose_index, knn, robust_z, z_to_score
from sanitize.detectors import Detection, register_detector
from sanitize.embeddings import Embeddings


def scales(n: int, k_small: int, k_fraction: float, k_max: int) -> list[int]:
    """The neighbour counts used for a class of n examples (each < n)."""
    small = min(k_small, n - 1)
    large = min(max(small, round(k_fraction * n)), k_max, n - 1)
    return sorted({small, large})


def neighbour_statistic(distances: np.ndarray, k: int, distance: str) -> np.ndarray:
    """Per row of sorted neighbour distances: the mean of the first k (`mean`) or the k-th (`kth`)."""
    return distances[:, :k].mean(axis=1) if distance == "mean" else distances[:, k - 1]


@register_detector
def knn_density(embeddings: Embeddings, config: ScanConfig, progress: bool = True) -> Detection:
    """The default: two-scale per-class k-NN isolation in the space `config.embedding` names."""
    loss, predicted, confidence = embeddings.proxy_statistics()
    if not (config.low_loss_weight or config.class_alarm_p):
        loss = None
    return knn_isolation(
        embeddings.space(config.embedding),
        embeddings.labels,
        embeddings.meta["num_classes"],
        threshold=config.threshold,
        k_small=config.k_small,
        k_fraction=config.k_fraction,
        k_max=config.k_max,
        distance=config.distance,
        loss=loss,
        low_loss_weight=config.low_loss_weight,
        class_alarm_p=config.class_alarm_p,
        alarm_z=config.alarm_z,
        alarm_rule=config.alarm_rule,
        predicted=predicted,
        predicted_confidence=confidence,
        alarm_confidence=config.alarm_confidence,
        index=config.index,
        exact_max=config.exact_max,
        seed=config.seed,
        progress=progress,
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
    class_alarm_p: float = 0.0,
    alarm_z: float = 1.5,
    alarm_rule: str = "hard",
    predicted: np.ndarray | None = None,
    predicted_confidence: np.ndarray | None = None,
    alarm_confidence: float = 0.0,
    index: str = "auto",
    exact_max: int = 50_000,
    seed: int = 0,
    progress: bool = True,
) -> Detection:
    n = len(labels)
    scores = np.zeros(n, dtype=np.float64)
    isolation = np.zeros(n, dtype=np.float64)  # the isolation z alone, for the alarmed classes' second pass
    neighbours = np.full((n, k_small), -1, dtype=np.int64)
    per_class: dict[int, dict] = {}
    for c in tqdm(range(num_classes), desc="density", unit="class", disable=not progress):
        members = np.flatnonzero(labels == c)
        if len(members) < 3:
            per_class[c] = {"n": int(len(members)), "note": "fewer than 3 examples: not scored"}
            continue
        ks = scales(len(members), k_small, k_fraction, k_max)
        kind = choose_index(len(members), index, exact_max)
        distances, nearest = knn(np.asarray(space[members]), max(ks), kind=kind, seed=seed)
        z = np.stack([robust_z(np.log(neighbour_statistic(distances, k, distance) + 1e-12)) for k in ks]).max(axis=0)
        isolation[members] = z
        if loss is not None and low_loss_weight:  # isolated, or isolated and too easy: mislabeled examples stay flagged
            ease = robust_z(-np.log(loss[members] + 1e-12))
            z = np.maximum(z, (z + low_loss_weight * ease) / np.sqrt(1 + low_loss_weight**2))
        scores[members] = z_to_score(z)
        width = min(k_small, nearest.shape[1])
        neighbours[members, :width] = members[nearest[:, :width]]
        per_class[c] = {"n": int(len(members)), "k": ks, "index": kind}
    flags = scores >= threshold
    if class_alarm_p:
        misassigned = None
        if predicted is not None:
            misassigned = predicted != labels
            if alarm_confidence and predicted_confidence is not None:
                misassigned &= predicted_confidence >= alarm_confidence
        flags |= alarmed_class_flags(
            flags, isolation, labels, per_class, loss, class_alarm_p, alarm_z, alarm_rule, misassigned
        )
    return Detection(
        scores=scores,
        flags=flags,
        summary={
            "rule": "knn_density",
            "threshold": threshold,
            "distance": distance,
            "low_loss_weight": low_loss_weight if loss is not None else 0.0,
            "class_alarm_p": class_alarm_p,
            "alarm_z": alarm_z if class_alarm_p else None,
            "alarm_rule": alarm_rule if class_alarm_p else None,
            "alarm_confidence": alarm_confidence if class_alarm_p and alarm_rule != "hard" else None,
            "per_class": per_class,
        },
        arrays={"neighbours": neighbours},
    )


def alarmed_class_flags(
    flags: np.ndarray,
    isolation: np.ndarray,
    labels: np.ndarray,
    per_class: dict[int, dict],
    loss: np.ndarray | None,
    alarm_p: float,
    alarm_z: float,
    rule: str = "hard",
    misassigned: np.ndarray | None = None,
) -> np.ndarray:
    """The second pass: classes holding far more flags than the typical class are alarmed, and in them every example
    that is both isolated and hard is flagged too.

    A targeted attack puts all its poisons in one class. The tampered bulk is what the first pass finds; the few
    poisons that carry the attack are hard examples (high loss, pulled towards another class) that sit only moderately
    far out. A class is alarmed when P(Poisson(rate x n_c) >= its flag count) < alarm_p / classes, the rate being the
    flag rate of all the other classes together (the class under test cannot raise its own baseline; with a median
    instead, a clean set whose classes flag 0-6 examples each raised false alarms). In an alarmed class the example's
    z = (isolation z + z of log loss) / sqrt 2 >= alarm_z flags it (isolation alone without a loss): rule `hard`.
    Rule `misassigned` flags instead the examples of the class marked in `misassigned` (those the proxy assigns to
    another class, with at least `alarm_confidence` of probability: at eps 8 the carriers sit past the boundary, called
    the target's class, yet not isolated within their own); `either` both. Recorded per class.
    """
    if rule not in ALARM_RULES or (rule != "hard" and misassigned is None):
        raise ValueError(
            f"alarm rule {rule!r}: choose from {', '.join(ALARM_RULES)}; all but hard need the proxy's predictions"
        )
    scored = [c for c, info in per_class.items() if "k" in info]
    counts = {c: int(flags[labels == c].sum()) for c in scored}
    total, size = sum(counts.values()), sum(per_class[c]["n"] for c in scored)
    extra = np.zeros(len(labels), dtype=bool)
    for c in scored:
        others = max(size - per_class[c]["n"], 1)
        rate = max((total - counts[c]) / others, 0.5 / others)
        p_value = float(poisson.sf(counts[c] - 1, rate * per_class[c]["n"]))
        alarmed = p_value < alarm_p / len(scored)
        per_class[c].update({"first_pass_flags": counts[c], "alarm_p_value": p_value, "alarmed": alarmed})
        if alarmed:
            members = np.flatnonzero(labels == c)
            z = isolation[members]
            if loss is not None:
                z = (z + robust_z(np.log(loss[members] + 1e-12))) / np.sqrt(2)
            hard = z >= alarm_z
            elsewhere = misassigned[members] if misassigned is not None else np.zeros(len(members), dtype=bool)
            second = {"hard": hard, "misassigned": elsewhere, "either": hard | elsewhere}[rule]
            extra[members[second]] = True
            per_class[c]["second_pass_flags"] = int(second.sum())
    return extra
