"""Each rule on constructed data where it must fire and where it must not; the scan runs every registered detector."""

import dataclasses
import inspect

import numpy as np
import pytest
import torch

from sanitize.config import ScanConfig
from sanitize.detectors import detector_options, list_detectors, option_names, options_class
from sanitize.detectors.activation_clustering import activation_cluster_flags
from sanitize.detectors.deep_knn import deep_knn_flags
from sanitize.detectors.epic import epic_flags
from sanitize.detectors.knn_density import knn_isolation
from sanitize.detectors.spectral_signatures import spectral_signature_flags
from sanitize.errors import SanitizeError
from sanitize.medoids import facility_location, isolated_medoids
from sanitize.scanner import scan


def _blobs(rng, n=300, d=16, gap=12.0):
    x = rng.normal(size=(2 * n, d))
    x[n:] += gap
    return x.astype(np.float32), np.repeat([0, 1], n)


def test_facility_location_is_greedy_optimal_step_by_step_and_deterministic():
    rng = np.random.default_rng(0)
    y = rng.normal(size=(40, 3))
    distance = torch.cdist(torch.tensor(y), torch.tensor(y)).numpy()
    similarity = distance.max() - distance
    chosen: list[int] = []
    for _ in range(5):  # plain (non-lazy) greedy on the same objective
        gains = [similarity[:, chosen + [j]].max(axis=1).sum() if j not in chosen else -np.inf for j in range(40)]
        chosen.append(int(np.argmax(gains)))
    assert facility_location(y, 5).tolist() == chosen
    assert facility_location(y, 5).tolist() == facility_location(y, 5).tolist()


def test_sparse_similarity_finds_the_same_blobs():
    rng = np.random.default_rng(1)
    centres = np.array([[0.0] * 4, [20.0] * 4, [-20.0] * 4])
    x = np.concatenate([c + rng.normal(size=(200, 4)) for c in centres])
    for medoids in (facility_location(x, 3), facility_location(x, 3, dense_max=100, k=50)):
        assert sorted(int(m) // 200 for m in medoids) == [0, 1, 2]


def test_singleton_medoids_are_the_isolated_points():
    rng = np.random.default_rng(2)
    x = np.concatenate([rng.normal(size=(150, 4)), rng.normal(size=(150, 4)) + 8, [[40.0, 0, 0, 0], [0, -40.0, 0, 0]]])
    labels = np.zeros(len(x), dtype=np.int64)
    isolated, cluster_size = isolated_medoids(x, labels, 1, fraction=0.03)
    assert isolated.tolist() == [300, 301] and cluster_size[300] == 1
    clean, _ = isolated_medoids(x[:300], labels[:300], 1, fraction=0.03)
    assert len(clean) == 0


def test_medoids_split_by_class_across_ranks_add_up_to_the_whole_from_a_memory_mapped_file(tmp_path):
    rng = np.random.default_rng(4)
    x = rng.normal(size=(400, 5)).astype(np.float32)
    x[::37] *= 6  # a few isolated points in every class
    labels = rng.integers(0, 5, len(x))
    np.save(tmp_path / "space.npy", x)
    whole, sizes = isolated_medoids(x, labels, 5, fraction=0.1)
    assert len(whole) > 0
    shares = [
        isolated_medoids(
            np.load(tmp_path / "space.npy", mmap_mode="r"), labels, 5, fraction=0.1, classes=range(rank, 5, 2)
        )
        for rank in range(2)
    ]
    np.testing.assert_array_equal(np.sort(np.concatenate([isolated for isolated, _ in shares])), whole)
    np.testing.assert_array_equal(shares[0][1] + shares[1][1], sizes)


def test_epic_flags_isolated_gradients_only():
    rng = np.random.default_rng(3)
    g = np.concatenate([0.02 * rng.normal(size=(200, 10)), [[0.9] + [0.0] * 9]]).astype(np.float32)
    detection = epic_flags(g, np.zeros(201, dtype=np.int64), 1, fraction=0.05)
    assert np.flatnonzero(detection.flags).tolist() == [200] and detection.scores[200] == 1.0


def test_deep_knn_flags_points_whose_neighbours_disagree():
    rng = np.random.default_rng(4)
    x, labels = _blobs(rng)
    assert not deep_knn_flags(x, labels, 2, k=10).flags.any()
    planted = np.array([400, 401, 402, 403])  # class-1 points moved into class 0's blob, labels kept
    x[planted] = rng.normal(size=(4, 16))
    detection = deep_knn_flags(x, labels, 2, k=10)
    assert np.flatnonzero(detection.flags).tolist() == planted.tolist()
    # a group larger than k votes for itself: the paper's reason for k >= the number of poisons
    many = np.arange(400, 420)
    x[many] = rng.normal(size=(20, 16)) * 0.1
    assert deep_knn_flags(x, labels, 2, k=10).flags[many].mean() < 0.5
    assert deep_knn_flags(x, labels, 2, k=40).flags[many].all()


def test_spectral_signatures_removes_the_planted_direction_first():
    rng = np.random.default_rng(5)
    x, labels = _blobs(rng)
    poisons = np.arange(20)
    x[poisons, 0] += 6.0  # a shared shift: the top singular direction of class 0
    detection = spectral_signature_flags(x, labels, 2, expected_poisons=20)
    assert detection.flags[poisons].all()
    assert detection.flags[labels == 0].sum() == 30 and detection.flags[labels == 1].sum() == 30  # 1.5 x 20 per class
    assert detection.scores[poisons].min() > np.median(detection.scores[labels == 0])


def test_activation_clustering_fires_on_a_separate_small_cluster_only():
    rng = np.random.default_rng(6)
    x, labels = _blobs(rng)
    poisons = np.arange(60)  # 20% of class 0, far away
    x[poisons] += 10.0 * np.eye(16)[3]
    detection = activation_cluster_flags(x, labels, 2)
    assert detection.flags[poisons].all() and detection.flags[labels == 0].sum() == 60
    assert not detection.flags[labels == 1].any()
    assert detection.summary["per_class"][1]["flagged"] is False


def test_scan_runs_every_detector_and_refuses_a_missing_count(tmp_path, digits_npz):
    for name in list_detectors():
        options = {"expected_poisons": 5} if name == "spectral_signatures" else {}
        result = scan(digits_npz, tmp_path / name, detector=name, epochs=1, quiet=True, **options)
        assert result.summary["detector"]["rule"] == name
        assert (tmp_path / name / "scores.csv").exists() and len(result.scores) == len(result.flags)
    with pytest.raises(SanitizeError, match="expected-poisons"):
        scan(digits_npz, tmp_path / "no-count", detector="spectral_signatures", epochs=1, quiet=True)


@pytest.mark.parametrize("name", list_detectors())
def test_every_detector_owns_checked_options_that_the_scan_config_carries(name):
    """Each detector's options dataclass has all its defaults; flat names reach it through ScanConfig.from_options;
    an option it does not have is an error, and another detector's option only passes at its default."""
    defaults = options_class(name)()
    assert ScanConfig.from_options(detector=name).options == defaults == detector_options(name)
    with pytest.raises(SanitizeError, match="has no option"):
        detector_options(name, no_such_option=1)
    for other in list_detectors():
        for field_name, value in dataclasses.asdict(options_class(other)()).items():
            if field_name in option_names(name):
                continue
            assert ScanConfig.from_options(detector=name, **{field_name: value}).options == defaults
            with pytest.raises(SanitizeError, match="option of the .* detector, not of"):
                ScanConfig.from_options(detector=name, **{field_name: "changed"})


def test_the_rule_as_a_function_is_the_scans_default_and_options_are_checked():
    assert inspect.signature(knn_isolation).parameters["options"].default == ScanConfig().options
    assert ScanConfig.from_options(k_small=4, epochs=3).options.k_small == 4
    for bad, message in (
        ({"k_fraction": 1.5}, "k_fraction"),
        ({"alarm_rule": "any"}, "alarm_rule"),
        ({"epic_fraction": 0}, "epic"),
    ):
        with pytest.raises(SanitizeError, match=message):
            ScanConfig.from_options(detector="epic" if "epic_fraction" in bad else "knn_density", **bad)
