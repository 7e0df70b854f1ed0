"""Out-of-fold proxies (scan --proxy-folds) and knn_density's label check on their predictions."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sanitize import scan
from sanitize.config import ScanConfig
from sanitize.detectors.knn_density import WHY_LABEL, disagreeing_labels, label_issues
from sanitize.errors import SanitizeError
from sanitize.folds import fold_assignment
from sanitize.trainer import train


def test_folds_deal_every_class_evenly_and_depend_only_on_the_seed():
    labels = np.repeat(np.arange(3), [10, 7, 5])
    folds = fold_assignment(labels, 4, seed=0)
    for c in range(3):
        sizes = np.bincount(folds[labels == c], minlength=4)
        assert sizes.max() - sizes.min() <= 1
    assert np.array_equal(folds, fold_assignment(labels, 4, seed=0))
    assert not np.array_equal(folds, fold_assignment(labels, 4, seed=1))


def test_label_issues_are_confident_learnings_off_diagonal():
    labels = np.array([0, 0, 0, 1, 1, 1])
    probabilities = np.array(
        [
            [0.9, 0.1],
            [0.8, 0.2],
            [0.2, 0.8],  # labelled 0, confidently 1: an issue
            [0.1, 0.9],
            [0.2, 0.8],
            [0.45, 0.55],  # labelled 1, leaning 1: no issue
        ]
    )
    # thresholds: class 0's mean p0 over its examples 0.63, class 1's mean p1 0.75
    issues, margin = label_issues(
        np.log(probabilities), labels, budget=4 * 2 * 8
    )  # logits; 4-row chunks cross the classes
    assert issues.tolist() == [False, False, True, False, False, False]
    assert margin[2] == pytest.approx(0.6)
    # below the rival's threshold, even a rival more probable than the label is no issue
    issues, _ = label_issues(np.log(np.array([[0.3, 0.7], [0.2, 0.8], [0.6, 0.4]])), np.array([1, 1, 0]))
    assert not issues.any()


def test_the_disagree_rule_flags_every_label_the_likeliest_held_out_class_contradicts():
    labels = np.array([0, 0, 1, 1])
    probabilities = np.array([[0.95, 0.05], [0.9, 0.1], [0.6, 0.4], [0.1, 0.9]])
    # labelled 1 and leaning 0 below class 0's threshold (0.925): confident learning lets it pass, disagree does not
    assert not label_issues(np.log(probabilities), labels)[0].any()
    issues, margin = disagreeing_labels(np.log(probabilities), labels, budget=2 * 2 * 8)  # 2-row chunks
    assert issues.tolist() == [False, False, True, False]
    assert margin[2] == pytest.approx(0.2) and (margin[~issues] == 0).all()


@pytest.fixture(scope="module")
def eights_called_three(tmp_path_factory, digits16):
    """1,000 digits, 15 of the 8s labelled 3: a group of wrong labels (back-gradient's error-specific start), which
    isolation alone misses, since in their new class they are each other's neighbours."""
    x, y = digits16
    x, y = x[:1000], y[:1000].copy()
    planted = np.flatnonzero(y == 8)[:15]
    y[planted] = 3
    path = tmp_path_factory.mktemp("folds") / "eights.npz"
    np.savez(path, x=x, y=y)
    return path, planted


def test_proxy_folds_find_a_group_of_wrong_labels_the_scan_alone_misses_and_resume(tmp_path, eights_called_three):
    data, planted = eights_called_three
    options = {"quiet": True}  # the default 16 epochs: shorter proxies on half of 1,000 digits are too weak to judge
    alone = scan(data, tmp_path / "alone", **options)
    checked = scan(data, tmp_path / "checked", proxy_folds=2, **options)
    reasons = np.load(tmp_path / "checked" / "embeddings" / "flag_reason.npy")
    # the scan alone misses most: 0-1 of 15 measured on one machine, 4 on another (training differs by machine)
    assert alone.flags[planted].sum() <= 5
    added = checked.flags[planted] & ~alone.flags[planted]  # what the label check adds: 7-9, and 3 beside those 4
    assert checked.flags[planted].sum() >= 6 and added.sum() >= 2 and (reasons[planted][added] == WHY_LABEL).all()
    assert (checked.flags | ~alone.flags).all()  # the check adds flags, it takes none away
    assert checked.flags.sum() - checked.flags[planted].sum() <= alone.flags.sum() + 8  # few clean ones besides
    folds = tmp_path / "checked" / "folds"
    assert len(list(folds.glob("logits-2folds-*.npy"))) == 1 and len(list(folds.glob("*.fold*.done"))) == 2
    fold_histories = [torch.load(p, weights_only=True)["history"] for p in folds.glob("*/checkpoint.pt")]
    proxy_trained = sum(epoch["examples"] for epoch in checked.summary["model"]["history"])
    assert checked.summary["work"]["trained_examples"] == proxy_trained + sum(
        epoch["examples"] for history in fold_histories for epoch in history
    )  # the folds' count from their sizes is what they trained on
    assert checked.summary["work"]["scored_examples"] == 2 * alone.summary["work"]["scored_examples"] == 2 * 1000
    stamps = [p.stat().st_mtime_ns for p in sorted(folds.glob("*/model.pt"))]
    again = scan(data, tmp_path / "checked", proxy_folds=2, **options)  # a rerun reuses the folds' predictions
    assert [p.stat().st_mtime_ns for p in sorted(folds.glob("*/model.pt"))] == stamps
    assert np.array_equal(again.flags, checked.flags)
    unchecked = scan(data, tmp_path / "checked", proxy_folds=2, label_check=False, **options)
    assert np.array_equal(unchecked.flags, alone.flags)


@pytest.mark.parametrize(
    ("options", "message"),
    [({"proxy_folds": 1}, "proxy_folds"), ({"proxy_folds": 3, "checkpoint": "model.pt"}, "checkpoint")],
)
def test_proxy_folds_refuse_what_cannot_work(options, message):
    with pytest.raises(SanitizeError, match=message):
        ScanConfig.from_options(**options)


def test_a_held_out_checkpoint_checks_labels_with_its_own_predictions(tmp_path, eights_called_three, digits16):
    """The transfer setting's defender holds a network trained on other data: its predictions are out of sample, so
    the label check finds the 8s labelled 3 with no fold trained."""
    data, planted = eights_called_three
    x, y = digits16
    np.savez(tmp_path / "other.npz", x=x[1000:], y=y[1000:])  # digits the scanned set does not hold
    pretrained = train(tmp_path / "other.npz", tmp_path / "pretrained", model="convnet", epochs=8, quiet=True)
    options = {"checkpoint": str(pretrained.files["model"]), "model": "convnet", "quiet": True}
    given = scan(data, tmp_path / "given", **options)
    held_out = scan(data, tmp_path / "held-out", held_out_checkpoint=True, **options)
    reasons = np.load(tmp_path / "held-out" / "embeddings" / "flag_reason.npy")
    # measured: 11 of the 15 against none, and 14 other flags besides the 29 the scan raises without the check
    assert held_out.flags[planted].sum() >= 8 and given.flags[planted].sum() <= 3
    assert (reasons[planted][held_out.flags[planted] & ~given.flags[planted]] == WHY_LABEL).all()
    assert (held_out.flags | ~given.flags).all()  # the check adds flags, it takes none away
    assert held_out.flags.sum() - held_out.flags[planted].sum() <= given.flags.sum() + 25
    with pytest.raises(SanitizeError, match="held_out_checkpoint needs --checkpoint"):
        ScanConfig.from_options(held_out_checkpoint=True)
