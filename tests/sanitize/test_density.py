import dataclasses

import numpy as np
import pytest

from sanitize.density import knn, robust_z, z_to_score
from sanitize.detectors import DetectorContext
from sanitize.detectors.knn_density import ISOLATION_ONLY, grouped_flags, knn_isolation

PLAIN = ISOLATION_ONLY  # the rule without its optional terms; each test switches on what it is about


def isolation(x, labels, num_classes, loss=None, predicted=None, predicted_confidence=None, **changes):
    options = dataclasses.replace(PLAIN, **changes)
    context = DetectorContext(progress=False)
    return knn_isolation(x, labels, num_classes, options, loss, predicted, predicted_confidence, context)


def _brute_force(x, k):
    d = np.sqrt(((x[:, None, :] - x[None, :, :]) ** 2).sum(-1))
    np.fill_diagonal(d, np.inf)
    order = np.argsort(d, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(d, order, 1), order


def test_flat_index_agrees_with_brute_force():
    x = np.random.default_rng(0).normal(size=(300, 16)).astype(np.float32)
    distances, neighbours = knn(x, 7, kind="flat")
    ref_d, ref_n = _brute_force(x.astype(np.float64), 7)
    np.testing.assert_allclose(distances, ref_d, rtol=1e-4)
    assert (neighbours == ref_n).mean() > 0.99  # ties at equal distance may order differently


@pytest.mark.parametrize("kind", ["ivf", "hnsw"])
def test_approximate_indexes_have_high_recall(kind):
    rng = np.random.default_rng(1)
    x = (rng.normal(size=(4000, 8)) + rng.integers(0, 5, size=(4000, 1)) * 3).astype(np.float32)
    _, neighbours = knn(x, 10, kind=kind)
    _, exact = knn(x, 10, kind="flat")
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(neighbours, exact)])
    assert recall > 0.9


def test_duplicates_do_not_count_as_their_own_neighbour():
    x = np.zeros((5, 3), np.float32)
    _, neighbours = knn(x, 4)
    assert all(i not in row for i, row in enumerate(neighbours))


def test_robust_z_and_score_mapping():
    z = robust_z(np.array([1.0, 2.0, 3.0, 4.0, 100.0]))
    assert z[2] == 0 and z[4] > 3.5 and z[0] < 0
    scores = z_to_score(np.array([-1.0, 0.0, 3.5, 50.0]))
    assert scores.tolist()[:3] == [0.0, 0.0, 0.5] and 0.9 < scores[3] < 1.0


def _two_classes(rng, n=400):
    x = rng.normal(size=(2 * n, 8)).astype(np.float32)
    x[n:] += 10.0
    return x, np.repeat([0, 1], n)


def test_lone_planted_points_are_ranked_most_isolated():
    rng = np.random.default_rng(2)
    x, labels = _two_classes(rng)
    planted = np.array([5, 77, 650])
    x[planted] += rng.normal(size=(3, 8)).astype(np.float32) * 12
    detection = isolation(x, labels, 2)
    assert set(np.argsort(-detection.scores)[:3]) == set(planted)
    assert detection.flags[planted].all()
    assert detection.flags.mean() < 0.05
    assert detection.scores.min() >= 0 and detection.scores.max() < 1


def test_a_tight_far_group_is_isolated_at_the_large_scale_only():
    rng = np.random.default_rng(3)
    x, labels = _two_classes(rng)
    group = np.arange(100, 140)  # 10% of class 0, packed tightly away from the bulk
    x[group] = 6.0 + 0.05 * rng.normal(size=(40, 8)).astype(np.float32)
    small_only = isolation(x, labels, 2, k_max=10)
    both = isolation(x, labels, 2)
    assert small_only.flags[group].mean() < 0.1
    assert both.flags[group].all()
    assert both.flags[np.setdiff1d(np.arange(800), group)].mean() < 0.05


def test_tiny_classes_are_left_unscored():
    x = np.random.default_rng(4).normal(size=(12, 4)).astype(np.float32)
    labels = np.array([0] * 10 + [1] * 2)
    detection = isolation(x, labels, 3)
    assert detection.scores[10:].tolist() == [0, 0]
    assert "not scored" in detection.summary["per_class"][1]["note"]
    assert detection.summary["per_class"][2]["n"] == 0


def test_kth_distance_sees_the_edge_of_a_group_the_mean_blurs():
    rng = np.random.default_rng(5)
    x, labels = _two_classes(rng)
    group = np.arange(100, 180)  # 20% of class 0, tight, at a moderate distance from the bulk
    x[group] = 3.0 + 0.05 * rng.normal(size=(80, 8)).astype(np.float32)
    mean = isolation(x, labels, 2, k_fraction=0.25, distance="mean")
    kth = isolation(x, labels, 2, k_fraction=0.25, distance="kth")
    assert np.median(kth.scores[group]) > np.median(mean.scores[group])
    assert kth.flags[group].all()


def test_low_loss_term_lifts_examples_that_are_too_easy():
    rng = np.random.default_rng(6)
    x, labels = _two_classes(rng)
    loss = np.exp(rng.normal(-1.0, 0.5, size=len(labels)))
    easy = np.arange(10, 30)
    loss[easy] = 1e-5  # far below anything else in the class
    plain = isolation(x, labels, 2)
    combined = isolation(x, labels, 2, loss=loss, low_loss_weight=1.0)
    assert plain.flags[easy].mean() < 0.2
    assert combined.flags[easy].all()
    assert combined.flags.mean() < 0.05


def _five_classes(rng, n=300):
    centres = rng.normal(size=(5, 8)) * 20
    labels = np.repeat(np.arange(5), n)
    return (centres[labels] + rng.normal(size=(5 * n, 8))).astype(np.float32), labels


def test_class_alarm_looks_again_only_inside_a_class_with_improbably_many_flags():
    rng = np.random.default_rng(7)
    x, labels = _five_classes(rng)
    loss = np.exp(rng.normal(-1.0, 1.0, size=len(labels)))
    bulk = np.arange(300, 330)  # class 1: a tampered group that the first pass must find
    x[bulk] = x[bulk] * 0.0 + x[300:600].mean(0) + 9.0 + 0.05 * rng.normal(size=(30, 8)).astype(np.float32)
    carriers = np.arange(330, 340)  # class 1: moderately out and hard, below the first pass's cut
    x[carriers] += (0.9 * rng.normal(size=(10, 8))).astype(np.float32)
    loss[carriers] = 5.0
    lookalikes = np.arange(600, 610)  # class 2: the same moderate outliers, but their class raises no alarm
    x[lookalikes] += (0.9 * rng.normal(size=(10, 8))).astype(np.float32)
    loss[lookalikes] = 5.0
    plain = isolation(x, labels, 5, distance="kth", loss=loss)
    alarmed = isolation(x, labels, 5, distance="kth", loss=loss, class_alarm_p=1e-3)
    assert plain.flags[bulk].mean() > 0.9 and plain.flags[carriers].mean() < 0.5
    assert alarmed.flags[carriers].mean() > 0.8
    reasons = alarmed.arrays["flag_reason"]
    assert set(np.unique(reasons[alarmed.flags])) <= {1, 2, 3, 4} and (reasons[~alarmed.flags] == 0).all()
    assert (reasons[carriers][alarmed.flags[carriers]] >= 3).mean() > 0.5  # the second pass caught the carriers
    assert alarmed.flags[lookalikes].sum() == plain.flags[lookalikes].sum()
    per_class = alarmed.summary["per_class"]
    assert per_class[1]["alarmed"] and not any(per_class[c]["alarmed"] for c in (0, 2, 3, 4))
    assert alarmed.flags[np.flatnonzero(labels != 1)].mean() < 0.05

    # carriers past the class boundary but neither isolated nor hard: only the misassigned rule reaches them
    loss[carriers] = np.median(loss)
    x[carriers] = x[300:600].mean(0)
    predicted = labels.copy()
    predicted[carriers] = 3
    predicted[lookalikes] = 3  # misassigned too, in a class that raises no alarm
    by_rule = {
        rule: isolation(
            x,
            labels,
            5,
            distance="kth",
            loss=loss,
            class_alarm_p=1e-3,
            alarm_rule=rule,
            predicted=predicted,
        )
        for rule in ("hard", "misassigned", "either")
    }
    assert (
        by_rule["hard"].flags[carriers].mean() < 0.5
        and by_rule["misassigned"].flags[carriers].all()
        and by_rule["either"].flags[carriers].all()
    )
    assert (
        by_rule["misassigned"].flags[lookalikes] == by_rule["hard"].flags[lookalikes]
    ).all()  # no alarm in their class: nothing added
    assert by_rule["either"].flags.sum() >= max(by_rule["hard"].flags.sum(), by_rule["misassigned"].flags.sum())
    with pytest.raises(ValueError, match="predictions"):
        isolation(x, labels, 5, loss=loss, class_alarm_p=1e-3, alarm_rule="misassigned")

    # alarm_confidence: the alarmed class's clean boundary examples, called another class without conviction, are spared
    boundary = np.arange(340, 370)
    predicted[boundary] = 4
    confidence = np.full(len(labels), 0.9)
    confidence[boundary] = 0.4
    alarm = dict(distance="kth", loss=loss, class_alarm_p=1e-3, alarm_rule="either", predicted=predicted)
    confident = isolation(x, labels, 5, predicted_confidence=confidence, alarm_confidence=0.5, **alarm)
    anyhow = isolation(x, labels, 5, predicted_confidence=confidence, alarm_confidence=0.0, **alarm)
    assert confident.flags[carriers].all() and anyhow.flags[boundary].all()
    assert confident.flags[boundary].sum() == by_rule["hard"].flags[boundary].sum() < len(boundary)
    assert confident.summary["alarm_confidence"] == 0.5


def test_grouped_flags_are_flagged_examples_whose_neighbours_are_mostly_flagged():
    flags = np.array([True, True, True, False, True, False])
    neighbours = np.array([[1, 2], [0, 3], [3, 5], [0, 1], [-1, -1], [4, -1]])
    # 0: both neighbours flagged; 1: half; 2: none; 3: not flagged; 4: no neighbours; 5: not flagged
    assert grouped_flags(flags, neighbours).tolist() == [True, True, False, False, False, False]


def test_class_alarm_needs_a_group_not_just_many_lone_outliers():
    rng = np.random.default_rng(8)
    x, labels = _five_classes(rng)
    loss = np.ones(len(labels))
    spread = x.copy()  # class 2: many outliers, each far out in a direction of its own (a spread-out class)
    spread[600:615] += (rng.normal(size=(15, 8)) * 6.0).astype(np.float32)
    lone = isolation(spread, labels, 5, distance="kth", loss=loss, class_alarm_p=1e-3)
    per_class = lone.summary["per_class"]
    assert per_class[2]["first_pass_flags"] >= 12 and per_class[2]["alarm_p_value"] < 1e-3 / 5
    assert per_class[2]["grouped_flags"] < 0.005 * 300 and not any(info["alarmed"] for info in per_class.values())
    count_only = isolation(spread, labels, 5, distance="kth", loss=loss, class_alarm_p=1e-3, alarm_group_fraction=0.0)
    assert count_only.summary["per_class"][2]["alarmed"]  # the count alone: the false alarm the group test removes

    crowded = x.copy()  # class 1: as many flags, crowded together (poisons chasing one gradient)
    crowded[300:330] = x[300:600].mean(0) + 9.0 + 0.05 * rng.normal(size=(30, 8)).astype(np.float32)
    group = isolation(crowded, labels, 5, distance="kth", loss=loss, class_alarm_p=1e-3).summary["per_class"]
    assert group[1]["grouped_flags"] >= 25 and group[1]["alarmed"]
    assert [c for c, info in group.items() if info["alarmed"]] == [1]
