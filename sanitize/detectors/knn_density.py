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
again inside classes that hold a flagged group of their own (a targeted attack's signature: its poisons chase one
gradient, where natural outliers are lone), for the few hard poisons that carry the attack (or, with `alarm_rule`, for
the examples the proxy confidently assigns to another class). With out-of-fold predictions (`scan --proxy-folds`), the
label check flags the examples whose label proxies that never saw them contradict (confident learning), for poisons
that carry the attacker's labels. The closed-group pass (`closed_group_conductance`, sanitize.closed_groups) alarms a class
whose k-NN graph holds a set of a few percent of it closed to the rest (its members one another's neighbours and almost
nobody else's) and flags the set: poisons a scan-aware attacker pulls into one tight group are no lone points, and
the isolation rule ranks them below clean examples (reports/adaptive-attack). Scores map z to
[0, 1) with 0.5 at z = 3.5 (Iglewicz & Hoaglin's outlier cut-off). Nothing here knows the poison budget or rate.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from tqdm import tqdm

from sanitize.density import CHUNK_BYTES, choose_index, knn, robust_z, row_chunks, softmax, z_to_score
from sanitize.detectors import EMBEDDINGS, Detection, DetectorContext, check, register_detector

if TYPE_CHECKING:  # the detectors' modules stay light: the CLI reads their options without torch
    from sanitize.embeddings import Embeddings

ALARM_RULES = ("hard", "misassigned", "either")  # the second pass in an alarmed class
ALARM_TESTS = ("negative-binomial", "poisson")  # the class alarm's count test (poisson: dispersion fixed at 1)
# the label check: confident learning's off-diagonal (a rival class above its own threshold), or any out-of-sample
# prediction other than the label (for weights that never saw the data and cannot have learned a group of wrong labels)
LABEL_RULES = ("confident", "disagree")
# why an example is flagged (the array flag_reason, read by the report)
WHY_ISOLATED, WHY_TOO_EASY, WHY_ALARM_HARD, WHY_ALARM_MISASSIGNED, WHY_LABEL, WHY_CLOSED_GROUP = 1, 2, 3, 4, 5, 6
FLAG_REASONS = {
    WHY_ISOLATED: "isolated in its class",
    WHY_TOO_EASY: "isolated and too easy for the proxy",
    WHY_ALARM_HARD: "isolated and hard, in an alarmed class",
    WHY_ALARM_MISASSIGNED: "given another class by the proxy, in an alarmed class",
    WHY_LABEL: "its label contradicted by a model that never saw it",
    WHY_CLOSED_GROUP: "a member of a group closed to the rest of its class",
}


def scales(n: int, k_small: int, k_fraction: float, k_max: int) -> list[int]:
    """The neighbour counts used for a class of n examples (each < n)."""
    small = min(k_small, n - 1)
    large = min(max(small, round(k_fraction * n)), k_max, n - 1)
    return sorted({small, large})


def neighbour_statistic(distances: np.ndarray, k: int, distance: str) -> np.ndarray:
    """Per row of sorted neighbour distances: the mean of the first k (`mean`) or the k-th (`kth`)."""
    return distances[:, :k].mean(axis=1) if distance == "mean" else distances[:, k - 1]


@dataclass(frozen=True)
class KnnDensityOptions:
    """The default rule's options; every default measured in reports/detection-cpu."""

    embedding: str = "features"  # features | gradient | logit_gradient (measured: reports/scan-benchmark)
    k_small: int = 10  # neighbours for lone points
    k_fraction: float = 0.5  # the large scale: this fraction of the class (finds dense groups up to half of it) ...
    k_max: int = 1000  # ... capped here
    distance: str = "kth"  # kth | mean: the statistic of the k neighbour distances (kth: AUROC +0.03-0.06)
    low_loss_weight: float = 1.0  # weight of the "too easy" term (class-wise z of -log loss) beside the isolation
    # a second pass in classes with more flags than the classes' own spread explains (negative-binomial p < this /
    # classes, its dispersion estimated from the other classes; 0 turns the alarm off) ...
    class_alarm_p: float = 0.03
    alarm_test: str = "negative-binomial"  # poisson: the dispersion fixed at 1 (the alarm before 2026-12-01)
    # ... of which at least this fraction of the class are grouped: flagged, and so are most of their k_small nearest
    # neighbours. Both chosen on tuning sets (reports/class-alarm): clean classes p >= 7e-3 per class, or grouped 0%
    # where p < 1e-2; poisoned classes whose victims flip p <= 1.3e-3 with >= 0.9% grouped
    alarm_group_fraction: float = 0.005
    alarm_z: float = 1.5  # ... flags their isolated, hard examples: (isolation z + log-loss z) / sqrt 2 >= this (hard:
    # the carriers at eps 16), and every example there the proxy assigns to another class (misassigned: the eps-8
    # carriers, called the target's class); either: both, the default, since the attack's eps is unknown
    alarm_rule: str = "either"
    # misassigned counts only when the proxy gives the other class at least this probability (0: any): 0.5 keeps the
    # carriers (called the other class with 0.42-0.82) and spares a third of the class's clean boundary examples
    alarm_confidence: float = 0.5
    threshold: float = 0.5  # flag score >= threshold; 0.5 = modified z-score 3.5 (Iglewicz & Hoaglin)
    # with out-of-fold predictions (scan --proxy-folds): also flag the examples whose label they contradict
    label_check: bool = True
    label_rule: str = "confident"  # confident | disagree (LABEL_RULES)
    # the closed-group pass (sanitize.closed_groups): a class whose most closed set of closed_group_min_fraction to
    # closed_group_max_fraction of it, in the union graph of the k_small lists, has a conductance below this is
    # alarmed and that set flagged; poisons pulled into one tight group (a scan-aware attacker) form such a set, no
    # lone point among them (0: off). Chosen 2026-12-05 on tuning keys 100-101 (adaptive MetaPoison sets) and a clean
    # scan: the geometric mean of the poisoned classes' highest (0.089) and the 28 clean classes' lowest (0.124)
    # conductance, rounded down (reports/adaptive-attack)
    closed_group_conductance: float = 0.105
    closed_group_min_fraction: float = 0.01
    closed_group_max_fraction: float = 0.2
    # ... in classes of at least this many examples: small classes of simple data hold naturally closed styles (the
    # demo's digits: 27 of 181 ones at conductance 0.019), where CIFAR-10's classes, subsampled to 200-5,000, hold none
    # below 0.12 (reports/adaptive-attack)
    closed_group_min_class: int = 1000
    # a class the closed-group pass alarms and the count test does not also gets the class alarm's second pass
    # (alarm_z, alarm_rule, alarm_confidence; off with the alarm): a clumped set's carriers may be the poisons that did
    # not clump, hard examples the closed set misses. Off: on gradient matching's tuning keys it caught 73 of 95
    # carriers where the default caught 27, but flagged up to 3.3%, above the 3% its rule allowed
    # (reports/adaptive-attack)
    closed_group_second_pass: bool = False

    def validate(self) -> None:
        check(
            [
                (self.embedding in EMBEDDINGS, f"embedding must be one of {', '.join(EMBEDDINGS)}"),
                (0.0 < self.threshold <= 1.0, "threshold must be in (0, 1]"),
                (self.k_small >= 1 and self.k_max >= self.k_small, "need 1 <= k_small <= k_max"),
                (0.0 < self.k_fraction < 1.0, "k_fraction must be in (0, 1)"),
                (self.distance in ("mean", "kth"), "distance must be mean or kth"),
                (self.low_loss_weight >= 0.0, "low_loss_weight must be >= 0"),
                (0.0 <= self.class_alarm_p < 1.0, "class_alarm_p must be in [0, 1)"),
                (0.0 <= self.alarm_group_fraction <= 1.0, "alarm_group_fraction must be in [0, 1]"),
                (self.alarm_test in ALARM_TESTS, f"alarm_test must be one of {', '.join(ALARM_TESTS)}"),
                (self.alarm_rule in ALARM_RULES, f"alarm_rule must be one of {', '.join(ALARM_RULES)}"),
                (0.0 <= self.alarm_confidence < 1.0, "alarm_confidence must be in [0, 1)"),
                (self.label_rule in LABEL_RULES, f"label_rule must be one of {', '.join(LABEL_RULES)}"),
                (0.0 <= self.closed_group_conductance < 1.0, "closed_group_conductance must be in [0, 1)"),
                (
                    0.0 < self.closed_group_min_fraction <= self.closed_group_max_fraction < 1.0,
                    "need 0 < closed_group_min_fraction <= closed_group_max_fraction < 1",
                ),
                (self.closed_group_min_class >= 1, "closed_group_min_class must be >= 1"),
            ]
        )


# the isolation rule alone, as first measured (reports/scan-benchmark): one scale pair up to 20% of the class, mean
# distance, no low-loss term, no class alarm; for benchmarks and tests of the core
ISOLATION_ONLY = KnnDensityOptions(
    k_fraction=0.2,
    k_max=256,
    distance="mean",
    low_loss_weight=0.0,
    class_alarm_p=0.0,
    alarm_rule="hard",
    alarm_confidence=0.0,
    closed_group_conductance=0.0,
)


@register_detector(KnnDensityOptions)
def knn_density(embeddings: Embeddings, options: KnnDensityOptions, context: DetectorContext) -> Detection:
    """The default: two-scale per-class k-NN isolation in the space `options.embedding` names."""
    loss, predicted, confidence = embeddings.proxy_statistics()
    if not (options.low_loss_weight or options.class_alarm_p):
        loss = None
    detection = knn_isolation(
        embeddings.space(options.embedding),
        embeddings.labels,
        embeddings.meta["num_classes"],
        options,
        loss=loss,
        predicted=predicted,
        predicted_confidence=confidence,
        context=context,
    )
    if options.label_check and embeddings.out_of_fold_logits is not None:
        detection = with_label_issues(
            detection, embeddings.out_of_fold_logits, embeddings.labels, options.threshold, options.label_rule
        )
    return detection


def label_issues(logits: np.ndarray, labels: np.ndarray, budget: int = CHUNK_BYTES) -> tuple[np.ndarray, np.ndarray]:
    """Confident learning's off-diagonal (Northcutt et al. 2021): with out-of-sample probabilities, class j's threshold
    is the mean probability of j over the examples labelled j; an example is a label issue when, of the classes it
    reaches the threshold of, the likeliest is not its label. Returns the issues and each example's margin (that
    class's probability minus the label's; <= 0 where there is no issue). Reads the (N, C) logits a chunk of rows at a
    time, twice (no N x C array in memory)."""
    n, num_classes = logits.shape
    chunks = row_chunks(n, num_classes * 8, budget)
    totals = np.zeros(num_classes)
    for rows in chunks:
        p = softmax(np.asarray(logits[rows], dtype=np.float64))
        np.add.at(totals, labels[rows], p[np.arange(len(p)), labels[rows]])
    counts = np.bincount(labels, minlength=num_classes)
    thresholds = np.where(counts > 0, totals / np.maximum(counts, 1), 1.0)
    margin = np.zeros(n)
    for rows in chunks:
        p, own = softmax(np.asarray(logits[rows], dtype=np.float64)), labels[rows]
        reached = p >= thresholds
        reached[np.arange(len(p)), own] = False
        rival = np.where(reached, p, -1.0).argmax(axis=1)
        gap = p[np.arange(len(p)), rival] - p[np.arange(len(p)), own]
        margin[rows] = np.where(reached.any(axis=1), gap, 0.0)
    return margin > 0, margin


def disagreeing_labels(
    logits: np.ndarray, labels: np.ndarray, budget: int = CHUNK_BYTES
) -> tuple[np.ndarray, np.ndarray]:
    """The `disagree` rule: an example is a label issue when its likeliest out-of-sample class is not its label.
    Returns the issues and each example's margin (that class's probability minus the label's; <= 0 where there is no
    issue), a chunk of rows at a time."""
    margin = np.zeros(len(labels))
    for rows in row_chunks(len(labels), logits.shape[1] * 8, budget):
        p = softmax(np.asarray(logits[rows], dtype=np.float64))
        margin[rows] = p.max(axis=1) - p[np.arange(len(p)), labels[rows]]
    return margin > 0, margin


def with_label_issues(
    detection: Detection, logits: np.ndarray, labels: np.ndarray, threshold: float, rule: str = "confident"
) -> Detection:
    """The detection with the label check added: issues flagged (reason WHY_LABEL where nothing else flagged them) and
    scored at least threshold + (1 - threshold) x margin, so they rank above the unflagged."""
    issues, margin = (disagreeing_labels if rule == "disagree" else label_issues)(logits, labels)
    scores = np.where(issues, np.maximum(detection.scores, threshold + (1 - threshold) * margin), detection.scores)
    why = detection.arrays["flag_reason"]
    arrays = detection.arrays | {"flag_reason": np.where(issues & (why == 0), WHY_LABEL, why).astype(np.int8)}
    summary = detection.summary | {
        "label_check": {
            "issues": int(issues.sum()),
            "rule": rule,
            "thresholds": "per class, out of sample" if rule == "confident" else "the likeliest class",
        }
    }
    return Detection(scores=scores, flags=detection.flags | issues, summary=summary, arrays=arrays)


def knn_isolation(
    space: np.ndarray,
    labels: np.ndarray,
    num_classes: int,
    options: KnnDensityOptions = KnnDensityOptions(),
    loss: np.ndarray | None = None,
    predicted: np.ndarray | None = None,
    predicted_confidence: np.ndarray | None = None,
    context: DetectorContext = DetectorContext(),
) -> Detection:
    """The rule on plain arrays: `loss` feeds the low-loss term and the alarm's hard rule, `predicted` (and its
    confidence) the alarm's misassigned rule; without them those parts are off."""
    o = options
    n = len(labels)
    scores = np.zeros(n, dtype=np.float64)
    isolation = np.zeros(n, dtype=np.float64)  # the isolation z alone, for the alarmed classes' second pass
    neighbours = np.full((n, o.k_small), -1, dtype=np.int64)
    per_class: dict[int, dict] = {}
    for c in tqdm(range(num_classes), desc="density", unit="class", disable=not context.progress):
        members = np.flatnonzero(labels == c)
        if len(members) < 3:
            per_class[c] = {"n": int(len(members)), "note": "fewer than 3 examples: not scored"}
            continue
        ks = scales(len(members), o.k_small, o.k_fraction, o.k_max)
        kind = choose_index(len(members), context.index, context.exact_max)
        distances, nearest = knn(np.asarray(space[members]), max(ks), kind=kind, seed=context.seed)
        z = np.stack([robust_z(np.log(neighbour_statistic(distances, k, o.distance) + 1e-12)) for k in ks]).max(axis=0)
        isolation[members] = z
        if (
            loss is not None and o.low_loss_weight
        ):  # isolated, or isolated and too easy: mislabeled examples stay flagged
            ease = robust_z(-np.log(loss[members] + 1e-12))
            z = np.maximum(z, (z + o.low_loss_weight * ease) / np.sqrt(1 + o.low_loss_weight**2))
        scores[members] = z_to_score(z)
        width = min(o.k_small, nearest.shape[1])
        neighbours[members, :width] = members[nearest[:, :width]]
        per_class[c] = {"n": int(len(members)), "k": ks, "index": kind}
    flags = scores >= o.threshold
    # why each example is flagged (the report says it): isolated, isolated and too easy, or the alarm's second pass
    why = np.where(flags, np.where(z_to_score(isolation) >= o.threshold, WHY_ISOLATED, WHY_TOO_EASY), 0).astype(np.int8)
    misassigned = None  # the examples the proxy assigns to another class, for the second pass (with the alarm)
    if o.class_alarm_p:
        if predicted is not None:
            misassigned = predicted != labels
            if o.alarm_confidence and predicted_confidence is not None:
                misassigned &= predicted_confidence >= o.alarm_confidence
        second = alarmed_class_flags(
            flags,
            isolation,
            labels,
            per_class,
            loss,
            o.class_alarm_p,
            o.alarm_z,
            o.alarm_rule,
            misassigned,
            grouped=grouped_flags(flags, neighbours),
            group_fraction=o.alarm_group_fraction,
            overdispersed=o.alarm_test == "negative-binomial",
        )
        why = np.where(flags, why, second)
        flags |= second > 0
    if o.closed_group_conductance:
        closed = closed_group_flags(neighbours, labels, per_class, o, context.seed)
        why = np.where(flags, why, np.where(closed, WHY_CLOSED_GROUP, 0)).astype(np.int8)
        flags |= closed
        if o.class_alarm_p and o.closed_group_second_pass:  # its rule checked by the alarm's own pass above
            for c, info in per_class.items():
                # no second pass yet: the count test did not alarm it (`alarmed` is set by either alarm)
                if (info.get("closed_group") or {}).get("alarmed") and "second_pass_flags" not in info:
                    members = np.flatnonzero(labels == c)
                    extra = second_pass(members, isolation, loss, o.alarm_z, o.alarm_rule, misassigned)
                    why[members] = np.where(flags[members], why[members], extra)
                    flags[members] |= extra > 0
                    info["second_pass_flags"] = int((extra > 0).sum())
    return Detection(
        scores=scores,
        flags=flags,
        summary={
            "rule": "knn_density",
            "threshold": o.threshold,
            "distance": o.distance,
            "low_loss_weight": o.low_loss_weight if loss is not None else 0.0,
            "class_alarm_p": o.class_alarm_p,
            "alarm_test": o.alarm_test if o.class_alarm_p else None,
            "alarm_group_fraction": o.alarm_group_fraction if o.class_alarm_p else None,
            "alarm_z": o.alarm_z if o.class_alarm_p else None,
            "alarm_rule": o.alarm_rule if o.class_alarm_p else None,
            "alarm_confidence": o.alarm_confidence if o.class_alarm_p and o.alarm_rule != "hard" else None,
            "closed_group": {
                "conductance_below": o.closed_group_conductance,
                "fractions": [o.closed_group_min_fraction, o.closed_group_max_fraction],
                "min_class": o.closed_group_min_class,
                "second_pass": bool(o.class_alarm_p and o.closed_group_second_pass),
            }
            if o.closed_group_conductance
            else None,
            "per_class": per_class,
        },
        arrays={"neighbours": neighbours, "flag_reason": why, "isolation_z": isolation.astype(np.float32)},
    )


def closed_group_flags(
    neighbours: np.ndarray, labels: np.ndarray, per_class: dict[int, dict], options: KnnDensityOptions, seed: int = 0
) -> np.ndarray:
    """The closed-group pass: per scored class, the most closed set of the options' fractions of it in the union graph
    of the k_small lists (sanitize.closed_groups); a class whose set's conductance is below
    `closed_group_conductance` is alarmed and the set's members are returned flagged. Recorded per class (a class under
    `closed_group_min_class` or too small to search gets a note)."""
    from sanitize.closed_groups import class_graph, closed_group, local_neighbours, size_range

    flagged = np.zeros(len(labels), dtype=bool)
    for c, info in per_class.items():
        if "k" not in info:
            continue
        members = np.flatnonzero(labels == c)
        if len(members) < options.closed_group_min_class:
            info["closed_group"] = {"note": f"fewer than {options.closed_group_min_class} examples: not searched"}
            continue
        graph = class_graph(local_neighbours(neighbours, members, len(labels)))
        sizes = size_range(len(members), options.closed_group_min_fraction, options.closed_group_max_fraction)
        try:
            group = closed_group(graph, sizes, seed)
        except ValueError as too_small:
            info["closed_group"] = {"note": str(too_small)}
            continue
        alarmed = group.conductance < options.closed_group_conductance
        info["closed_group"] = {"size": int(len(group.members)), "conductance": group.conductance, "alarmed": alarmed}
        if alarmed:
            flagged[members[group.members]] = True
            info["alarmed"] = True
    return flagged


def grouped_flags(flags: np.ndarray, neighbours: np.ndarray) -> np.ndarray:
    """Flagged examples at least half of whose nearest same-class neighbours (`neighbours`, -1 padded) are flagged
    too: members of a flagged group of their own. A targeted attack's poisons chase one gradient and crowd together;
    a class's natural outliers are lone, their neighbours the unflagged bulk."""
    present = neighbours >= 0
    flagged_neighbours = (flags[np.where(present, neighbours, 0)] & present).sum(axis=1)
    return flags & present.any(axis=1) & (2 * flagged_neighbours >= present.sum(axis=1))


def hard_examples(isolation: np.ndarray, loss: np.ndarray | None, alarm_z: float) -> np.ndarray:
    """The second pass's `hard` rule on one class's examples: (isolation z + z of log loss within the class) / sqrt 2
    >= alarm_z (the isolation z alone without a loss)."""
    z = isolation if loss is None else (isolation + robust_z(np.log(loss + 1e-12))) / np.sqrt(2)
    return z >= alarm_z


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
    grouped: np.ndarray | None = None,
    group_fraction: float = 0.0,
    overdispersed: bool = True,
) -> np.ndarray:
    """The second pass: classes holding more flags than the other classes' spread explains, some of them grouped
    together, are alarmed, and in them every example that is both isolated and hard is flagged too.

    A targeted attack puts all its poisons in one class. The tampered bulk is what the first pass finds; the few
    poisons that carry the attack are hard examples (high loss, pulled towards another class) that sit only moderately
    far out. A class's flag count is tested against the other classes' rate (the class under test cannot raise its own
    baseline) with a negative binomial whose dispersion is the other classes' (Pearson chi-square per degree of freedom,
    at least 1: Poisson; `overdispersed` False fixes it at 1): classes differ in their natural outlier rate (a tight class turns small distances into large
    z; a class confused with another, CIFAR-10's cat and dog on all 50,000 images, holds more boundary outliers), and a
    plain Poisson test called those differences significant as classes grew (reports/class-alarm). A class is alarmed
    when that p < alarm_p / classes and at least `group_fraction` of it is `grouped` (grouped_flags): a targeted
    attack's poisons crowd together where natural outliers are lone. In an alarmed class the example's
    z = (isolation z + z of log loss) / sqrt 2 >= alarm_z flags it (isolation alone without a loss): rule `hard`.
    Rule `misassigned` flags instead the examples of the class marked in `misassigned` (those the proxy assigns to
    another class, with at least `alarm_confidence` of probability: at eps 8 the carriers sit past the boundary, called
    the target's class, yet not isolated within their own); `either` both. Recorded per class.
    """
    from scipy.stats import nbinom, poisson

    if rule not in ALARM_RULES or (rule != "hard" and misassigned is None):
        raise ValueError(
            f"alarm rule {rule!r}: choose from {', '.join(ALARM_RULES)}; all but hard need the proxy's predictions"
        )
    scored = [c for c, info in per_class.items() if "k" in info]
    flag_counts = np.bincount(labels[flags], minlength=len(per_class))  # one pass over the data, not one per class
    group_counts = flag_counts if grouped is None else np.bincount(labels[grouped], minlength=len(per_class))
    counts = {c: int(flag_counts[c]) for c in scored}
    total, size = sum(counts.values()), sum(per_class[c]["n"] for c in scored)
    extra = np.zeros(len(labels), dtype=np.int8)  # 0, or why the second pass flagged the example
    for c in scored:
        others = [o for o in scored if o != c]
        others_size = max(size - per_class[c]["n"], 1)
        rate = max((total - counts[c]) / others_size, 0.5 / others_size)
        expected = np.array([rate * per_class[o]["n"] for o in others])
        observed = np.array([counts[o] for o in others])
        chi_square = float(((observed - expected) ** 2 / expected).sum())
        dispersion = max(1.0, chi_square / max(len(others) - 1, 1)) if overdispersed else 1.0
        mean = rate * per_class[c]["n"]
        p_value = float(
            poisson.sf(counts[c] - 1, mean)
            if dispersion == 1.0
            else nbinom.sf(counts[c] - 1, mean / (dispersion - 1), 1 / dispersion)
        )
        group = int(group_counts[c])
        alarmed = p_value < alarm_p / len(scored) and group >= group_fraction * per_class[c]["n"]
        per_class[c].update(
            {
                "first_pass_flags": counts[c],
                "grouped_flags": group,
                "dispersion": round(dispersion, 3),
                "alarm_p_value": p_value,
                "alarmed": alarmed,
            }
        )
        if alarmed:
            members = np.flatnonzero(labels == c)
            extra[members] = second_pass(members, isolation, loss, alarm_z, rule, misassigned)
            per_class[c]["second_pass_flags"] = int((extra[members] > 0).sum())
    return extra


def second_pass(
    members: np.ndarray,
    isolation: np.ndarray,
    loss: np.ndarray | None,
    alarm_z: float,
    rule: str,
    misassigned: np.ndarray | None,
) -> np.ndarray:
    """The second pass in one alarmed class (its dataset indices `members`): per member 0, or why `rule` flags it
    (WHY_ALARM_HARD: isolated and hard; WHY_ALARM_MISASSIGNED: given another class by the proxy)."""
    hard = hard_examples(isolation[members], None if loss is None else loss[members], alarm_z)
    elsewhere = misassigned[members] if misassigned is not None else np.zeros(len(members), dtype=bool)
    second = {"hard": hard, "misassigned": elsewhere, "either": hard | elsewhere}[rule]
    why = np.where(hard & (rule != "misassigned"), WHY_ALARM_HARD, WHY_ALARM_MISASSIGNED)
    return np.where(second, why, 0).astype(np.int8)
