"""The evaluation of back-gradient poisoning (attacks.back_gradient) in its own threat model: added points with wrong
labels against a known learner, measured by the victims' test error.

Per seed, the data (scikit-learn's 8x8 digits by default, bundled with it: no download) is split into the training
set, the attacker's validation set and the test set; per poison fraction the attacker crafts `fraction x train` points
against the learner trained on the training set plus them. Arms: clean (the training set), label-flip (the poisons'
start: clones with flipped labels, not optimised), undefended (the crafted poisons), and what `sanitize scan` keeps of
the poisoned set with its default detector (scan) or a baseline's (its name), its flags scored against the poisons.
The victim is the same learner from another initialisation, or another learner (`victim_learner`: the paper's
transfer across learning algorithms). One JSON line per (seed, fraction, arm) in
OUT/results.jsonl; a killed run resumes (rows written are skipped, poisons load from OUT/cache).
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from attacks.arms import DETECTOR_ARMS, TOLD_THE_COUNT
from attacks.back_gradient import BackGradientOptions, PoisonPoints, craft_back_gradient, get_learner, predict, train
from attacks.rows import recorded_scan_options
from attacks.summary import git_commit
from sanitize.config import ScanConfig
from sanitize.data import write_atomic
from sanitize.data.arrays import from_arrays, open_npz
from sanitize.data.base import ImageDataset
from sanitize.data.digits import digits_arrays
from sanitize.errors import SanitizeError
from sanitize.manifest import flag_metrics
from sanitize.scanner import scan
from sanitize.trainer import train as train_proxy

CONTROLS = ("clean", "label-flip", "undefended")
ARMS = (*CONTROLS, *DETECTOR_ARMS)


@dataclass
class BackGradientConfig:
    attack: BackGradientOptions = dataclasses.field(default_factory=BackGradientOptions)
    fractions: tuple[float, ...] = (0.01, 0.03, 0.06)  # poisons per clean training point
    seeds: tuple[int, ...] = (0, 1, 2, 3, 4)  # the split, the attacker's start and the victim's initialisation
    arms: tuple[str, ...] = (*CONTROLS, "scan")
    train_size: int = 600
    validation_size: int = 600  # the rest is the test set
    scan_threshold: float | None = None  # the scan arm's knn_density threshold (None: the default's)
    scan_epochs: int | None = None  # the scan arm's proxy epochs (None: the default's)
    scan_folds: int | None = None  # the scan arm's out-of-fold proxies for the label check (None: the default's, off)
    # the scan arm scans with weights trained (the scan's proxy recipe) on the seed's validation split, clean data the
    # defender trusts, held out: `sanitize scan --checkpoint W --held-out-checkpoint` (off: a proxy trained on the data)
    scan_trusted: bool = False
    scan_label_rule: str | None = None  # the scan arm's label check rule (None: the default's)
    victim_learner: str | None = None  # the victims' learner when it is not the attacker's (transfer)


def load_points(path: str | Path | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(images (N, C, H, W) in [0, 1], labels): an .npz dataset, or scikit-learn's 8x8 digits."""
    if path is None:
        images, labels = digits_arrays(size=8)
        images = images[..., :1]  # the native 8x8 grey digits
    else:
        dataset = open_npz(Path(path))
        images, labels = dataset.images, dataset.labels
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255, torch.from_numpy(labels)


def seed_split(size: int, seed: int, config: BackGradientConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A seed's positions of the training, the attacker's validation and the test images among `size` points."""
    order = torch.randperm(size, generator=torch.Generator().manual_seed(seed))
    validation_end = config.train_size + config.validation_size
    return order[: config.train_size], order[config.train_size : validation_end], order[validation_end:]


def as_dataset(x: torch.Tensor, y: torch.Tensor, classes: int) -> ImageDataset:
    """Points (N, C, H, W) in [0, 1] and their labels as the dataset `sanitize scan` reads (uint8 pixels)."""
    images = (x * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    return from_arrays(images, y.numpy(), [str(c) for c in range(classes)], source="back-gradient")


def run_back_gradient_evaluation(
    data: str | Path | None, out: str | Path, config: BackGradientConfig, command: str | None = None
) -> Path:
    unknown = set(config.arms) - set(ARMS)
    if unknown:
        raise SanitizeError(f"unknown arm(s) {', '.join(sorted(unknown))}; choose from {', '.join(ARMS)}")
    if not all(0 < f < 1 for f in config.fractions):
        raise SanitizeError("poison fractions must lie in (0, 1)")
    out = Path(out)
    (out / "cache").mkdir(parents=True, exist_ok=True)
    images, labels = load_points(data)
    classes = int(labels.max()) + 1
    if config.train_size + config.validation_size >= len(labels):
        raise SanitizeError(f"train and validation sizes leave no test set of the {len(labels)} images")
    victim_name = config.victim_learner or config.attack.learner
    learner = get_learner(victim_name)
    get_learner(config.attack.learner)  # an unknown attacker's learner fails here, before any row
    done = _done(out)
    for seed in config.seeds:
        train_at, val_at, test_at = seed_split(len(labels), seed, config)
        x, y = images[train_at], labels[train_at]
        victim_init = learner.init(tuple(x.shape[1:]), classes, torch.Generator().manual_seed(10_000 + seed))
        options = dataclasses.replace(config.attack, seed=seed)
        test = (images[test_at], labels[test_at])

        for fraction in config.fractions:
            count = max(1, round(fraction * len(y)))
            points = None
            for arm in config.arms:
                threshold = config.scan_threshold if arm == "scan" else None
                epochs = config.scan_epochs if arm == "scan" else None
                folds = config.scan_folds if arm == "scan" else None
                trusted = config.scan_trusted if arm == "scan" else False
                label_rule = config.scan_label_rule if arm == "scan" else None
                variant = (threshold, epochs, folds, trusted, label_rule)
                if (options.learner, victim_name, options.goal, seed, fraction, arm, *variant) in done:
                    continue
                row = {
                    "learner": options.learner,
                    "victim_learner": victim_name,
                    "goal": options.goal,
                    "source": options.source,
                    "destination": options.destination,
                    "seed": seed,
                    "fraction": fraction,
                    "poisons": count,
                    "arm": arm,
                    "scan_threshold": threshold,
                    "scan_epochs": epochs,
                    "scan_folds": folds,
                    **({"scan_trusted": True} if trusted else {}),
                    **({"scan_label_rule": label_rule} if label_rule else {}),
                    "train_size": len(y),
                }
                if arm == "clean":
                    row |= _victim(learner, victim_init, x, y, test, options)
                else:
                    points = points or cached_poisons(
                        out / "cache", x, y, images[val_at], labels[val_at], count, options
                    )
                    added = points.start_images if arm == "label-flip" else points.images
                    poisoned_x = torch.cat([x, added.float() / 255])
                    poisoned_y = torch.cat([y, points.labels])
                    if arm in DETECTOR_ARMS:
                        detector = DETECTOR_ARMS[arm]
                        changed = {
                            "threshold": threshold,
                            "epochs": epochs,
                            "proxy_folds": folds,
                            "label_rule": label_rule,
                        }
                        if trusted:
                            weights = _trusted_weights(images[val_at], labels[val_at], classes, out)
                            changed |= {"checkpoint": weights, "held_out_checkpoint": True}
                        kept, defense = _scanned(poisoned_x, poisoned_y, len(y), classes, detector, changed, out)
                        row |= defense
                        poisoned_x, poisoned_y = poisoned_x[kept], poisoned_y[kept]
                    row |= _victim(learner, victim_init, poisoned_x, poisoned_y, test, options) | {
                        "attacker_objective": min(points.history)
                    }
                with (out / "results.jsonl").open("a") as handle:
                    handle.write(json.dumps(row) + "\n")
    write_summary(out, config, command)
    return out


def _victim(learner, init, x, y, test, options: BackGradientOptions) -> dict[str, Any]:
    """The learner trained from `init` on (x, y): its error on the test set, and how many of its `source` images it
    classifies as `destination`."""
    started = time.perf_counter()
    predicted = predict(learner, train(learner, x, y, init), test[0])
    truth = test[1].numpy()
    source = truth == options.source
    return {
        "test_error": float((predicted != truth).mean()),
        "source_as_destination": float((predicted[source] == options.destination).mean()),
        "victim_seconds": round(time.perf_counter() - started, 2),
    }


def _rows(out: Path) -> list[dict[str, Any]]:
    """The rows of OUT/results.jsonl (none before the first)."""
    path = out / "results.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def _done(out: Path) -> set[tuple]:
    return {
        (r["learner"], r.get("victim_learner", r["learner"]), r["goal"], r["seed"], r["fraction"], r["arm"])
        + (r.get("scan_threshold"), r.get("scan_epochs"), r.get("scan_folds"))
        + (r.get("scan_trusted", False), r.get("scan_label_rule"))
        for r in _rows(out)
    }


def _trusted_weights(x: torch.Tensor, y: torch.Tensor, classes: int, out: Path) -> str:
    """Weights of the scan's proxy recipe trained on (x, y), clean data the defender trusts: trained once per set
    (OUT/cache/trusted/<fingerprint>), their model.pt's path."""
    dataset = as_dataset(x, y, classes)
    folder = out / "cache" / "trusted" / dataset.fingerprint[7:23]
    weights = folder / "model.pt"
    if not weights.exists():
        folder.mkdir(parents=True, exist_ok=True)
        np.savez(folder / "data.npz", x=dataset.images, y=dataset.labels)  # lossless; the run reads it back
        scan_defaults = ScanConfig()
        train_proxy(folder / "data.npz", folder / "run", train=scan_defaults.train, seed=scan_defaults.seed, quiet=True)
        os.replace(folder / "run" / "model.pt", weights)
    return str(weights)


def cached_poisons(cache: Path, x, y, x_val, y_val, count: int, options: BackGradientOptions) -> PoisonPoints:
    """Crafted once per options, data and count, kept losslessly (npz) in `cache`."""
    name = json.dumps(dataclasses.asdict(options), sort_keys=True) + f"{count}-{len(y)}-{float(x.sum()):.6f}"
    path = cache / f"poisons-{options.learner}-{options.goal}-{hashlib.sha256(name.encode()).hexdigest()[:16]}.npz"
    if path.exists():
        with np.load(path, allow_pickle=False) as stored:
            return PoisonPoints(
                torch.from_numpy(stored["images"]),
                torch.from_numpy(stored["labels"]),
                torch.from_numpy(stored["start_images"]),
                stored["history"].tolist(),
            )
    points = craft_back_gradient(x, y, x_val, y_val, count, int(y.max()) + 1, options)
    buffer = io.BytesIO()
    np.savez_compressed(
        buffer,
        images=points.images.numpy(),
        labels=points.labels.numpy(),
        start_images=points.start_images.numpy(),
        history=np.asarray(points.history),
    )
    write_atomic(path, buffer.getvalue())
    return points


def _scanned(
    x, y, clean_count: int, classes: int, detector: str, variant: dict[str, Any], out: Path
) -> tuple[np.ndarray, dict[str, Any]]:
    """The positions `sanitize scan` (default options, `detector`, the `variant`'s threshold, proxy epochs and proxy
    folds where given) keeps of the poisoned set, and its flags scored against the poisons (the points after the first
    `clean_count`). Scans are kept in OUT/cache/scans (a rerun with another threshold or folds reuses the proxy and
    the embeddings)."""
    dataset = as_dataset(x, y, classes)
    truth = np.arange(len(y)) >= clean_count
    options: dict[str, Any] = {"quiet": True, "detector": detector}
    if detector in TOLD_THE_COUNT:  # their rules need the poisons in a class: told the most any class holds
        options["expected_poisons"] = int(np.bincount(y.numpy()[truth]).max())
    options |= {k: v for k, v in variant.items() if v is not None}
    started = time.perf_counter()
    proxy = "" if variant.get("epochs") is None else f"e{variant['epochs']}-"  # another proxy: another folder
    proxy += "trusted-" if variant.get("checkpoint") else ""
    result = scan(dataset, out / "cache" / "scans" / f"{detector}-{proxy}{dataset.fingerprint[7:23]}", **options)
    metrics = flag_metrics(result.flags, result.scores, truth)
    metrics |= {"scan_seconds": round(time.perf_counter() - started, 2)}
    metrics["scan_options"] = recorded_scan_options(result.summary["config"])
    return np.flatnonzero(~result.flags), metrics


def write_summary(out: Path, config: BackGradientConfig, command: str | None) -> None:
    """summary.md: per learner, goal, fraction and arm the mean over seeds of the test error (and, for the specific
    goal, the rate of `source` test images classified as `destination`) and of the defense's detection."""
    rows = _rows(out)
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        arm = _arm_label(row)
        victim = row.get("victim_learner", row["learner"])
        learner = row["learner"] if victim == row["learner"] else f"{row['learner']} -> {victim}"
        groups.setdefault((learner, row["goal"], row["fraction"], arm), []).append(row)
    lines = [
        "# Back-gradient poisoning: victims' test error",
        "",
        f"Command: `{command or 'run_back_gradient_evaluation'}`  ",
        f"Commit: {git_commit()}",
        "",
        "| learner | goal | poisons | arm | seeds | test error | source as destination | dropped | recall | precision"
        " | AUROC |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    order = {arm: i for i, arm in enumerate(ARMS)}
    ordered = sorted(groups.items(), key=lambda g: (*g[0][:3], order[g[0][3].split(" ")[0]], g[0][3]))
    for (learner, goal, fraction, arm), group in ordered:
        cells = [_mean(group, k) for k in ("test_error", "source_as_destination", "dropped_fraction")]
        cells += [_mean(group, k) for k in ("poison_recall", "poison_precision", "auroc")]
        shown = [_percent(c) for c in cells[:3]] + ["-" if c is None else f"{c:.2f}" for c in cells[3:]]
        poisons = f"{fraction:.0%} ({group[0]['poisons']})"
        lines.append(f"| {learner} | {goal} | {poisons} | {arm} | {len(group)} | " + " | ".join(shown) + " |")
    write_atomic(out / "summary.md", ("\n".join(lines) + "\n").encode())


def _arm_label(row: dict) -> str:
    """The arm, with the scan variant's options where they differ from the default."""
    parts = [f"threshold {row['scan_threshold']:g}"] if row.get("scan_threshold") is not None else []
    parts += [f"proxy {row['scan_epochs']} epochs"] if row.get("scan_epochs") is not None else []
    parts += [f"{row['scan_folds']} proxy folds"] if row.get("scan_folds") is not None else []
    parts += ["trusted proxy, held out"] if row.get("scan_trusted") else []
    parts += [f"label rule {row['scan_label_rule']}"] if row.get("scan_label_rule") else []
    return f"{row['arm']} ({', '.join(parts)})" if parts else row["arm"]


def _mean(rows: list[dict], key: str) -> float | None:
    values = [r[key] for r in rows if r.get(key) is not None]
    return float(np.mean(values)) if values else None


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"
