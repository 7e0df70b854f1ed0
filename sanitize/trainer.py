"""`sanitize train`: the standard from-scratch recipe, or with `robust` EPIC's periodic dropping of isolated examples.

With `exclude`, the examples a list of ids names (a scan's flagged.txt) are left out before training: `sanitize scan`
then `sanitize train --robust --exclude SCAN/flagged.txt` is the defence chosen at the full CIFAR-10 scale.

Outputs under `out` (never inside DATA): model.pt (a state dict, loadable with weights_only=True), checkpoint.pt (a
killed run rerun with the same options resumes from its last finished epoch), summary.json (recipe, per-epoch
history, accuracy, seconds, dropped counts per class) and, when robust, drop_log.json (id, position, class and round of
every dropped example) and kept.txt; with a pooled first round (`pool_runs`), each scout's round beside the log
(drop_log.scout<j>.npz). Under torchrun the ranks train data-parallel (DDP) and split the robust rounds (rows to
predict, classes to pick medoids in); rank 0 writes the files; every rank returns the result.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from sanitize.config import FitConfig
from sanitize.data import (
    ImageDataset,
    claimed_output,
    drop_decoded,
    excluding,
    keep_decoded,
    open_dataset,
    prepare_output,
    removed_if_left_empty,
)
from sanitize.distributed import World, all_reduce_sum, current_world
from sanitize.models import Classifier, resolve_model_name
from sanitize.report import write_report
from sanitize.robust import EpicDropper, ScoutDone, scout_seed
from sanitize.training import (
    EpochHook,
    device_record,
    milestone_epochs,
    predict,
    resolve_device,
    resolve_precision,
    train_from_scratch,
)
from sanitize.work import example_flops, phase_work


@dataclass
class TrainResult:
    model: Classifier
    summary: dict[str, Any]
    dropped_ids: list[str]
    files: dict[str, Path]


def run_train(data: str | os.PathLike, out: str | os.PathLike, config: FitConfig) -> TrainResult:
    data, out = prepare_output(data, out)
    started = time.perf_counter()
    world = current_world()
    progress = not config.quiet and world.is_main
    whole = open_dataset(data, image_size=config.image_size, workers=config.workers, progress=progress, world=world)
    dataset, excluded = excluding(whole, Path(config.exclude)) if config.exclude else (whole, None)
    # every epoch reads the images, then the accuracy pass (and a robust round's predictions)
    dataset = keep_decoded(dataset, out, config.decoded_cache, passes=config.train.epochs + 1)
    device = resolve_device(config.device, world)
    amp_dtype = resolve_precision(config.precision, device)
    name = resolve_model_name(config.model, dataset.image_size)
    recipe = dataclasses.replace(config.train, seed=config.seed)
    files = {"model": out / "model.pt", "summary": out / "summary.json", "report": out / "report.html"}
    dropper = None
    if config.robust:
        files |= {"drop_log": out / "drop_log.json", "kept": out / "kept.txt"}

        def train_scout(j: int, hook: EpochHook) -> None:
            """Robust training's scout j: a fresh model trained in out/scout-seed<S> until the first round stops it."""
            seed = scout_seed(config.seed, j)
            directory = out / f"scout-seed{seed}"
            try:
                train_from_scratch(
                    dataset,
                    name,
                    dataclasses.replace(recipe, seed=seed),
                    directory,
                    device,
                    amp_dtype,
                    seed=seed,
                    workers=config.workers,
                    progress=progress,
                    desc=f"scout {j}",
                    after_epoch=hook,
                    world=world,
                )
            except ScoutDone:
                if world.is_main:
                    shutil.rmtree(directory, ignore_errors=True)
                raise

        dropper = EpicDropper(
            dataset,
            config.epic,
            recipe.epochs,
            max(milestone_epochs(recipe)),
            files["drop_log"],
            device,
            amp_dtype,
            world,
            train_scout,
        )
    model, info = train_from_scratch(
        dataset,
        name,
        recipe,
        out,
        device,
        amp_dtype,
        seed=config.seed,
        workers=config.workers,
        progress=progress,
        desc="robust" if config.robust else "train",
        after_epoch=dropper,
        extra_meta={"robust": json.dumps(config.epic.identity()) if config.robust else "no"},
        world=world,
    )
    dropped = dropper.dropped() if dropper else np.zeros(0, np.int64)
    scout_trained, scout_scored = dropper.scout_work(recipe.batch_size) if dropper else (0, 0)
    if dropper and world.is_main:
        kept = np.setdiff1d(np.arange(len(dataset)), dropped)
        files["kept"].write_text("".join(dataset.ids[i] + "\n" for i in kept))
    summary = {
        "kind": "robust-train" if config.robust else "train",
        "data": data_record(whole, dataset),
        "excluded": excluded | {"trained_fingerprint": dataset.fingerprint} if excluded else None,
        "config": dataclasses.asdict(config),
        "model": info,
        "train_accuracy": eval_accuracy(model, dataset, device, amp_dtype, world),
        "robust": {
            "rounds": dropper.rounds,
            "dropped": int(len(dropped)),
            "dropped_fraction": len(dropped) / len(dataset),
            "dropped_per_class": {
                dataset.classes[c]: int(n)
                for c, n in enumerate(np.bincount(dataset.labels[dropped], minlength=dataset.num_classes))
            },
            # a pooled first round's scouts: each one's seed and how many examples its round isolated
            "scouts": dropper.scout_summary(config.seed),
        }
        if dropper
        else None,
        # the training's model FLOPs (sanitize.work): every epoch's examples and robust rounds' scoring passes, the
        # scouts' too when the first round is pooled
        "work": phase_work(
            example_flops(name, dataset.num_classes, (3, *dataset.image_size)),
            sum(epoch["examples"] + epoch.get("friendly_passes", 0) for epoch in info["history"]) + scout_trained,
            (len(dropper.scored_rounds()) * len(dataset) if dropper else 0) + scout_scored,
        ),
        "seconds": round(time.perf_counter() - started, 2),
        # what --precision auto resolved to (robust rounds score under it), and the processes, as a scan records them
        "device": device_record(device, amp_dtype) | {"processes": world.world_size},
    }
    if config.test:
        test = open_dataset(Path(config.test), image_size=dataset.image_size[0], progress=progress, world=world)
        summary["test_accuracy"] = eval_accuracy(model, test, device, amp_dtype, world)
    if world.is_main:
        files["summary"].write_text(json.dumps(summary, indent=1, default=str))
        write_report(out, dataset, max_thumbnails=config.max_thumbnails)
        drop_decoded(dataset)
    return TrainResult(model, summary, [dataset.ids[i] for i in dropped], files)


def data_record(whole: ImageDataset, dataset: ImageDataset) -> dict[str, Any]:
    """A training summary's record of DATA (`whole`) and of what trained (`dataset`: less an --exclude list)."""
    return {
        "source": dataset.source,
        "fingerprint": whole.fingerprint,  # DATA's, as a scan of it records it
        "image_size": list(dataset.image_size),
        "examples": len(whole),
        "classes": dataset.classes,
        "skipped": [dataclasses.asdict(s) for s in dataset.skipped],  # as a scan records them
        "notes": dataset.notes,
    }


def train(data: str | os.PathLike, out: str | os.PathLike = "sanitize-train", **options: Any) -> TrainResult:
    """Train from scratch on DATA (ImageFolder directory or .npz); `robust=True` for EPIC; options are FitConfig's."""
    config = FitConfig.from_options(**options)
    with removed_if_left_empty(out), claimed_output(data, out, current_world()):
        return run_train(data, out, config)


def eval_accuracy(model: Classifier, dataset, device, amp_dtype, world: World = World()) -> float:
    """Eval-mode accuracy on `dataset`; under torchrun each rank predicts its share of the rows."""
    lo, hi = world.row_range(len(dataset))
    logits = predict(model, dataset, np.arange(lo, hi), device, amp_dtype)
    correct, total = all_reduce_sum(
        [float((logits.argmax(axis=1) == dataset.labels[lo:hi]).sum()), float(hi - lo)], world
    )
    return correct / total
