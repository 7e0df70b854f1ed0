import dataclasses

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sanitize.closed_groups import (
    class_graph,
    closed_group,
    local_neighbours,
    prefix_conductance,
    set_conductance,
    size_range,
)
from sanitize.config import ScanConfig
from sanitize.density import knn
from sanitize.detectors import DetectorContext
from sanitize.detectors.knn_density import WHY_ALARM_HARD, WHY_CLOSED_GROUP, KnnDensityOptions, knn_isolation
from sanitize.errors import SanitizeError


def _class_with_a_closed_group(seed: int, n: int = 600, group: int = 60, offset: float = 4.0):
    """Two Gaussian classes in 8-D; class 0's first `group` examples packed tightly just outside its bulk: not lone
    points at either of the default's scales, but named by almost no one outside the group (a clump of poisons)."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(2 * n, 8)).astype(np.float32)
    x[n:] += 10.0
    x[:group] = (offset * np.eye(8)[0] + 0.3 * rng.normal(size=(group, 8))).astype(np.float32)
    return x, np.repeat([0, 1], n), np.arange(group)


def _knn_graph(x: np.ndarray, k: int = 10):
    _, nearest = knn(x, k, kind="flat")
    return class_graph(nearest)


@settings(max_examples=40, deadline=None)
@given(st.integers(3, 40), st.integers(1, 6), st.integers(0, 2**31 - 1))
def test_every_prefix_conductance_is_the_conductance_of_that_set(n, k, seed):
    rng = np.random.default_rng(seed)
    neighbours = rng.integers(-1, n, size=(n, k))
    graph = class_graph(neighbours)
    degrees = np.asarray(graph.sum(axis=1)).ravel()
    order = rng.permutation(n)
    prefix = prefix_conductance(order, graph, degrees)
    for t in range(n):
        inside = np.zeros(n, dtype=bool)
        inside[order[: t + 1]] = True
        expected = set_conductance(graph, inside)
        assert prefix[t] == pytest.approx(expected) if np.isfinite(expected) else not np.isfinite(prefix[t])


def test_union_and_mutual_graphs_are_symmetric_unweighted_and_without_self_loops():
    neighbours = np.array([[0, 1, 1], [0, 2, -1], [1, 0, -1]])  # 0 names itself and 1 twice; 2 names 1 and 0
    union, mutual = class_graph(neighbours).toarray(), class_graph(neighbours, "mutual").toarray()
    assert union.tolist() == [[0, 1, 1], [1, 0, 1], [1, 1, 0]]
    assert mutual.tolist() == [[0, 1, 0], [1, 0, 1], [0, 1, 0]]


def test_the_sweep_finds_a_planted_closed_group_and_clean_classes_are_open():
    x, labels, group = _class_with_a_closed_group(seed=1)
    poisoned, clean = _knn_graph(x[labels == 0]), _knn_graph(x[labels == 1])
    found = closed_group(poisoned, size_range(600, 0.01, 0.2))
    assert len(np.intersect1d(found.members, group)) >= 0.95 * len(group)
    assert len(found.members) <= 1.1 * len(group)
    assert found.conductance < 0.05 < 0.25 < closed_group(clean, size_range(600, 0.01, 0.2)).conductance
    assert found.conductance == pytest.approx(set_conductance(poisoned, np.isin(np.arange(600), found.members)))
    assert found.profile.shape == (600,) and found.profile.min() <= found.conductance


def test_classes_too_small_or_size_ranges_that_are_empty_are_refused():
    graph = class_graph(np.random.default_rng(0).integers(0, 10, size=(10, 3)))
    with pytest.raises(ValueError, match="no sets"):
        closed_group(graph, (2, 3))
    big = class_graph(np.random.default_rng(0).integers(0, 100, size=(100, 3)))
    with pytest.raises(ValueError, match="no sets"):
        closed_group(big, size_range(100, 0.5, 0.2))


def test_local_neighbours_maps_dataset_indices_into_the_class_and_drops_the_rest():
    neighbours = np.array([[2, 1], [0, -1], [0, 3], [1, 2]])
    assert local_neighbours(neighbours, np.array([0, 2]), 4).tolist() == [[1, -1], [0, -1]]


def test_the_pass_flags_a_closed_group_that_isolation_misses_and_alarms_only_its_class():
    x, labels, group = _class_with_a_closed_group(seed=2)
    context = DetectorContext(progress=False)
    off = knn_isolation(
        x, labels, 2, KnnDensityOptions(class_alarm_p=0.0, closed_group_conductance=0.0), context=context
    )
    assert off.flags[group].mean() < 0.1  # not lone points: the isolation rule ranks them as clean
    on = knn_isolation(
        x,
        labels,
        2,
        KnnDensityOptions(class_alarm_p=0.0, closed_group_conductance=0.05, closed_group_min_class=100),
        context=context,
    )
    per_class = on.summary["per_class"]
    assert per_class[0]["alarmed"] and per_class[0]["closed_group"]["alarmed"]
    assert not per_class[1].get("alarmed") and per_class[1]["closed_group"]["conductance"] > 0.25
    assert on.flags[group].all() and (on.arrays["flag_reason"][group] == WHY_CLOSED_GROUP).all()
    assert on.flags[len(group) :].mean() < 0.02
    assert on.summary["closed_group"] == {
        "conductance_below": 0.05,
        "fractions": [0.01, 0.2],
        "min_class": 100,
        "second_pass": False,
    }
    assert off.summary["closed_group"] is None and "closed_group" not in off.summary["per_class"][0]


def test_the_pass_leaves_a_note_for_a_class_too_small_to_search_or_under_its_minimum():
    x, labels, _ = _class_with_a_closed_group(seed=3)
    few = np.concatenate([np.flatnonzero(labels == 0), np.flatnonzero(labels == 1)[:12]])
    options = KnnDensityOptions(class_alarm_p=0.0, closed_group_conductance=0.05, closed_group_min_class=10)
    detection = knn_isolation(x[few], labels[few], 2, options, context=DetectorContext(progress=False))
    assert "no sets" in detection.summary["per_class"][1]["closed_group"]["note"]
    assert detection.summary["per_class"][0]["closed_group"]["alarmed"]
    default_size = dataclasses.replace(options, closed_group_min_class=KnnDensityOptions().closed_group_min_class)
    skipped = knn_isolation(x[few], labels[few], 2, default_size, context=DetectorContext(progress=False))
    assert "fewer than 1000 examples: not searched" in skipped.summary["per_class"][0]["closed_group"]["note"]
    assert not skipped.flags[:60].any()


@pytest.mark.parametrize(
    "bad",
    [
        {"closed_group_conductance": 1.0},
        {"closed_group_conductance": -0.1},
        {"closed_group_min_fraction": 0.0},
        {"closed_group_min_fraction": 0.3, "closed_group_max_fraction": 0.2},
        {"closed_group_max_fraction": 1.0},
        {"closed_group_min_class": 0},
    ],
)
def test_closed_group_options_are_checked(bad):
    with pytest.raises(SanitizeError, match="closed_group"):
        ScanConfig.from_options(**bad)


def test_the_second_pass_follows_a_closed_group_alarm_only_when_asked_and_only_in_that_class():
    x, labels, group = _class_with_a_closed_group(seed=4)
    rng = np.random.default_rng(4)
    loss = np.exp(rng.normal(np.log(0.05), 0.5, size=len(labels)))
    carriers = np.array(
        [100, 101, 102, 103]
    )  # inside class 0's bulk, not clumped, but hard: what the closed set misses
    hard_clean = carriers + 600  # the same in class 1, which nothing alarms
    loss[carriers] = loss[hard_clean] = 5.0
    # a count test that never fires: only the closed-group pass can alarm a class
    options = KnnDensityOptions(
        class_alarm_p=1e-12, alarm_rule="hard", closed_group_conductance=0.05, closed_group_min_class=100
    )
    context = DetectorContext(progress=False)
    without = knn_isolation(x, labels, 2, options, loss=loss, context=context)
    assert not without.flags[carriers].any() and "second_pass_flags" not in without.summary["per_class"][0]
    on = dataclasses.replace(options, closed_group_second_pass=True)
    detection = knn_isolation(x, labels, 2, on, loss=loss, context=context)
    assert detection.flags[group].all() and detection.flags[carriers].all()
    assert (detection.arrays["flag_reason"][carriers] == WHY_ALARM_HARD).all()
    assert not detection.flags[hard_clean].any() and "second_pass_flags" not in detection.summary["per_class"][1]
    assert detection.summary["per_class"][0]["second_pass_flags"] >= len(carriers)
    assert detection.summary["closed_group"]["second_pass"] and detection.summary["alarm_rule"] == "hard"
    assert not detection.summary["per_class"][0]["alarm_p_value"] < 1e-12  # not the count test's doing
    alarm_off = knn_isolation(x, labels, 2, dataclasses.replace(on, class_alarm_p=0.0), loss=loss, context=context)
    assert not alarm_off.flags[carriers].any() and not alarm_off.summary["closed_group"]["second_pass"]
