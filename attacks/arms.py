"""The evaluation's arms: the controls, the defended arms (a detector of `sanitize scan`, robust training, the default
scan followed by robust training on what it keeps, or training with random noise), and how a defense's drops are scored against the true poisons and
the carriers."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from attacks.base import PoisonSetup
from sanitize.manifest import flag_metrics

CONTROL_ARMS = ("clean", "undefended", "random-noise")
UNPOISONED_ARMS = ("clean", "random-noise")  # controls that train on no crafted poisons (no surrogate, no crafting)
DETECTOR_ARMS = {
    "scan": "knn_density",
    "epic": "epic",
    "deep_knn": "deep_knn",
    "spectral_signatures": "spectral_signatures",
    "activation_clustering": "activation_clustering",
}  # arm -> `sanitize scan --detector`
TOLD_THE_COUNT = ("deep_knn", "spectral_signatures")  # baselines whose rule needs the number of poisons: budget x N
SCAN_THEN_ROBUST = "scan-robust"  # the default scan, then `sanitize train --robust` on the examples it did not flag
# the default scan and the scan under the run's --scan-option (another proxy), read as one gate (`sanitize combine`):
# the victim trains on what neither flagged
SCAN_COMBINED = "scan-combined"
# arms whose victims train on what a scan keeps
SCANNED_ARMS = {**DETECTOR_ARMS, SCAN_THEN_ROBUST: "knn_density", SCAN_COMBINED: "knn_density"}
ROBUST_ARMS = ("robust", SCAN_THEN_ROBUST)  # arms whose victims drop examples as they train
# arms whose victims train on the poisoned set with noise -> the recipe's noises set to the run's eps: random sign
# noise on every batch (`sanitize train --noise-eps`), and with it friendly noise (`--friendly-eps`, the paper's pair)
NOISE_ARMS = {"noise-training": ("noise_eps",), "friendly-noise": ("noise_eps", "friendly_eps")}
# calibration of a filter: one that removes exactly the poisons, and one that removes as many random examples as the
# default scan flags (what the scan's drops are worth when they carry no knowledge of the poisons)
CALIBRATION_ARMS = ("perfect-filter", "random-filter")
# the scan's metrics a scan-then-robust row keeps apart from the whole defence's (carriers: from scratch only)
SCAN_PART = ("dropped_fraction", "poison_recall", "carrier_recall", "auroc")
ARMS = (*CONTROL_ARMS, *DETECTOR_ARMS, SCAN_COMBINED, *ROBUST_ARMS, *NOISE_ARMS, *CALIBRATION_ARMS)
COMBINED_WITH_DEFAULT = "combined_with_default"  # what a scan-combined row adds to its second scan's options


def told_count(detector: str, setup: PoisonSetup) -> int | None:
    """The poison count a detector is told: the true one for the baselines whose rule needs it, else None."""
    return len(setup.poison_indices) if detector in TOLD_THE_COUNT else None


def poison_truth(setup: PoisonSetup, size: int) -> np.ndarray:
    """Mask over the training positions: True at the poisons."""
    truth = np.zeros(size, dtype=bool)
    truth[list(setup.poison_indices)] = True
    return truth


def robust_dropped(drop_log: Path, size: int) -> np.ndarray:
    """Mask over the examples robust training saw (its drop log's positions): True where it dropped one."""
    dropped = np.zeros(size, dtype=bool)
    dropped[[row["position"] for row in json.loads(drop_log.read_text())["dropped"]]] = True
    return dropped


def scan_then_robust_removed(caught: np.ndarray, drop_log: Path) -> np.ndarray:
    """What a victim trained on what a scan kept, robustly, never trained on: the scan's flags (`caught`, none for
    robust training alone) and robust training's drops, whose log names positions among the examples kept."""
    removed = caught.copy()
    removed[np.flatnonzero(~caught)[robust_dropped(drop_log, int((~caught).sum()))]] = True
    return removed


def scan_share(defense: dict[str, Any]) -> dict[str, Any]:
    """The scan's own share of a scan-then-robust row: its metrics of SCAN_PART, prefixed `scan_`."""
    return {f"scan_{name}": defense[name] for name in SCAN_PART if name in defense}


def removed_metrics(removed: np.ndarray, setup: PoisonSetup, carriers: np.ndarray) -> dict[str, Any]:
    """What a defense without per-example scores removed (robust training's drops, or the scan's flags together with
    them), scored against the true poisons and the carriers: no AUROC."""
    return flag_metrics(removed, None, poison_truth(setup, len(removed))) | split_by_carriers(removed, setup, carriers)


def split_by_carriers(caught: np.ndarray, setup: PoisonSetup, carriers: np.ndarray) -> dict[str, Any]:
    """How many carriers a defense caught, and its recall among them and among the other poisons."""
    hit = caught[np.asarray(setup.poison_indices)]
    return {
        "carriers": int(carriers.sum()),
        "carrier_recall": float(hit[carriers].mean()),
        "rest_recall": float(hit[~carriers].mean()) if (~carriers).any() else None,
    }
