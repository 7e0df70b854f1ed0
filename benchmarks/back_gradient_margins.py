"""How the scan's default proxy sees back-gradient poisons while it trains: each example's margin on its given label.

    python benchmarks/back_gradient_margins.py --goal specific --fraction 0.06 --seeds 5-9 \
        --out reports/back-gradient/margins

Per seed (tuning seeds only: the evaluation's split, poisons crafted as `sanitize evaluate-back-gradient` crafts
them, against logistic regression), the default scan's proxy recipe trains on the poisoned set and, after every epoch,
predicts every example in eval mode: the margin is the logit of the given label minus the largest other. Written per
seed: the share of clean examples and of poisons with a negative margin at the end (how far the proxy has fitted the
set), and the AUROC of the margin averaged over the first 2, 4, 8 and 16 epochs against the poisons (above 0.5: the
poisons are easier than the clean examples; below: harder). One JSON line per seed in OUT/margins.jsonl.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile
from pathlib import Path

import numpy as np
import torch
from sklearn.metrics import roc_auc_score

from attacks.back_gradient import BackGradientOptions
from attacks.evaluate_back_gradient import BackGradientConfig, as_dataset, cached_poisons, load_points, seed_split
from sanitize.cli import parse_keys
from sanitize.config import ScanConfig
from sanitize.models import resolve_model_name
from sanitize.training import predict, train_from_scratch

CPU = torch.device("cpu")


def label_margins(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """The logit of each row's label minus the largest other logit."""
    rows = np.arange(len(labels))
    others = logits.copy()
    others[rows, labels] = -np.inf
    return logits[rows, labels] - others.max(axis=1)


def seed_margins(seed: int, goal: str, fraction: float, cache: Path) -> dict:
    """Craft (or load) one seed's poisons, train the default proxy on the poisoned set, and summarise its margins."""
    config = BackGradientConfig()
    images, labels = load_points(None)
    train_at, val_at, _ = seed_split(len(labels), seed, config)
    x, y = images[train_at], labels[train_at]
    options = dataclasses.replace(BackGradientOptions(learner="logistic", goal=goal), seed=seed)
    count = max(1, round(fraction * len(y)))
    points = cached_poisons(cache, x, y, images[val_at], labels[val_at], count, options)
    dataset = as_dataset(torch.cat([x, points.images.float() / 255]), torch.cat([y, points.labels]), 10)
    truth = np.arange(len(dataset)) >= len(y)
    scan_config = ScanConfig()
    per_epoch: list[np.ndarray] = []

    def record(epoch: int, model, indices: np.ndarray) -> np.ndarray:
        was_training = model.training
        per_epoch.append(label_margins(predict(model, dataset, np.arange(len(dataset)), CPU, None), dataset.labels))
        model.train(was_training)
        return indices

    with tempfile.TemporaryDirectory() as directory:
        train_from_scratch(
            dataset,
            resolve_model_name(scan_config.model, dataset.image_size),
            scan_config.train,
            Path(directory),
            CPU,
            None,
            seed=scan_config.seed,
            progress=False,
            after_epoch=record,
        )
    margins = np.stack(per_epoch)
    row = {
        "seed": seed,
        "goal": goal,
        "fraction": fraction,
        "poisons": int(truth.sum()),
        "epochs": len(margins),
        "clean_negative_at_end": round(float((margins[-1][~truth] < 0).mean()), 3),
        "poisons_negative_at_end": round(float((margins[-1][truth] < 0).mean()), 3),
    }
    for epochs in (2, 4, 8, 16):
        row[f"auroc_mean_margin_{epochs}"] = round(float(roc_auc_score(truth, margins[:epochs].mean(axis=0))), 3)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--goal", choices=("generic", "specific"), required=True)
    parser.add_argument("--fraction", type=float, default=0.06)
    parser.add_argument("--seeds", default="5-9", help="tuning seeds (the evaluation's are 0-4)")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    (args.out / "cache").mkdir(parents=True, exist_ok=True)
    for seed in parse_keys(args.seeds, "--seeds"):
        row = seed_margins(seed, args.goal, args.fraction, args.out / "cache")
        with (args.out / "margins.jsonl").open("a") as handle:
            handle.write(json.dumps(row) + "\n")
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
