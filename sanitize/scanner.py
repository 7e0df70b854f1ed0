"""The scan pipeline: data -> proxy model -> embeddings -> detector -> files on disk -> ScanResult.

Outputs under `out` (never inside DATA, which is only read): summary.json, scores.csv, flagged.txt, report.html (the
audit report), proxy/ (the model) and embeddings/ (memory-mapped arrays). A killed scan rerun with the same options resumes: the proxy from
its last finished epoch, the embedding pass from its last written rows. Under torchrun the ranks share validation, proxy
training (DDP) and the embedding pass; rank 0 runs the detector and writes the files; every rank returns the result.
"""

from __future__ import annotations

import csv
import dataclasses
import datetime
import hashlib
import json
import os
import platform
import resource
import shlex
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import torch

import sanitize
from sanitize.config import ScanConfig, TrainConfig
from sanitize.data import (
    EncodedDataset,
    ImageDataset,
    claimed_output,
    drop_decoded,
    keep_decoded,
    open_dataset,
    prepare_output,
    removed_if_left_empty,
    write_atomic,
)
from sanitize.density import gpu_available
from sanitize.detectors import Detection, run_detector
from sanitize.detectors.knn_density import FLAG_REASONS
from sanitize.distributed import World, broadcast_from_main, current_world
from sanitize.embeddings import Embeddings, compute_embeddings
from sanitize.errors import SanitizeError
from sanitize.folds import fold_sizes, out_of_fold_logits
from sanitize.manifest import flag_metrics, manifest_file, poison_mask, read_manifest
from sanitize.models import Classifier, create_model, load_weights, require_finite_weights, resolve_model_name
from sanitize.report import remove_earlier_verdict, write_report
from sanitize.training import device_record, resolve_device, resolve_precision, train_from_scratch
from sanitize.work import ExampleFlops, example_flops, phase_work, reduced_size, trained_per_epoch

SCORES_HEADER = ("id", "path", "label", "class", "score", "flagged", "reason")


@dataclass
class ScanResult:
    """Per-example scores and flags (rows follow `ids`), the summary written to summary.json, and the files."""

    ids: list[str]
    paths: list[str]
    labels: np.ndarray
    scores: np.ndarray
    flags: np.ndarray
    summary: dict[str, Any]
    files: dict[str, Path]

    @property
    def passed(self) -> bool:
        return self.summary["gate"]["passed"]

    @property
    def flagged_ids(self) -> list[str]:
        return [self.ids[i] for i in np.flatnonzero(self.flags)]


class _Timer:
    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        started = time.perf_counter()
        yield
        self.seconds[name] = round(self.seconds.get(name, 0.0) + time.perf_counter() - started, 3)


def _embedding_signature(dataset: ImageDataset, model: Classifier, config: ScanConfig) -> str:
    """What the embedding pass depends on: the data, the exact weights, the gradient embedder and the precision."""
    digest = hashlib.sha256(
        f"{dataset.fingerprint}|{config.sketch_dim}|{config.exact_gradient_max}|{config.seed}|{config.precision}".encode()
    )
    for name, tensor in model.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:32]


def resolved_model(config: ScanConfig, dataset: ImageDataset) -> ScanConfig:
    """`config` with `model` auto replaced by the architecture it means for this data, so that the summary, and every
    row made from it, names the proxy."""
    return dataclasses.replace(config, model=resolve_model_name(config.model, dataset.image_size))


def build_proxy(
    dataset: ImageDataset,
    config: ScanConfig,
    out: Path,
    device: torch.device,
    amp_dtype,
    timer: _Timer,
    world: World = World(),
) -> tuple[Classifier, dict[str, Any]]:
    """Load the user's checkpoint, or train a proxy from scratch on the data (resuming an interrupted run)."""
    name = config.model
    if config.checkpoint:
        torch.manual_seed(config.seed)
        model = create_model(name, dataset.num_classes, (3, *dataset.image_size))
        load_weights(model, Path(config.checkpoint))
        return model, {
            "name": name,
            "parameters": sum(p.numel() for p in model.parameters()),
            "checkpoint": str(config.checkpoint),
        }
    with timer.phase("train_proxy"):
        return train_from_scratch(
            dataset,
            name,
            config.train,
            out / "proxy",
            device,
            amp_dtype,
            seed=config.seed,
            workers=config.workers,
            progress=not config.quiet and world.is_main,
            desc="proxy",
            world=world,
        )


def write_scores(path: Path, dataset: ImageDataset, detection: Detection) -> None:
    """scores.csv: a row per example; a flagged row says why where the detector records it (the alarms' passes and the
    closed-group pass flag without raising scores, so a reader sorting by score alone would miss them)."""
    reasons = detection.arrays.get("flag_reason")
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(SCORES_HEADER)
        for i in range(len(dataset)):
            writer.writerow(
                (
                    dataset.ids[i],
                    dataset.paths[i],
                    int(dataset.labels[i]),
                    dataset.classes[int(dataset.labels[i])],
                    f"{detection.scores[i]:.6f}",
                    int(detection.flags[i]),
                    FLAG_REASONS.get(int(reasons[i]), "") if reasons is not None and detection.flags[i] else "",
                )
            )
    os.replace(tmp, path)


def _versions() -> dict[str, str]:
    return {
        "sanitize": sanitize.__version__,
        "torch": torch.__version__,
        "faiss": faiss.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
    }


def run_scan(data: str | os.PathLike | ImageDataset, out: str | os.PathLike, config: ScanConfig) -> ScanResult:
    """Run the whole scan on DATA (a path, or an already opened dataset such as `from_arrays(x, y)`); raises
    SanitizeError (or DataError) for problems with the input."""
    timer = _Timer()
    started = time.perf_counter()
    world = current_world()
    progress = not config.quiet and world.is_main
    if isinstance(data, ImageDataset):
        dataset, out = data, Path(out)
        out.mkdir(parents=True, exist_ok=True)
    else:
        data, out = prepare_output(data, out)
        with timer.phase("validate"):
            dataset = open_dataset(
                data,
                image_size=config.image_size,
                workers=config.workers,
                progress=progress,
                world=world,
                validation=config.validation,
            )
    if isinstance(dataset, EncodedDataset) and dataset.validation == "header":  # opened here or by the caller
        dataset = dataset.record_failures_in(out / "late-skips")
    config = resolved_model(config, dataset)
    dataset = keep_decoded(dataset, out, config.decoded_cache, passes=_passes(config))
    record = read_manifest(config.manifest) if config.manifest else None
    truth = poison_mask(record, dataset.ids) if record else None  # checked before the long part, not after
    device = resolve_device(config.device, world)
    amp_dtype = resolve_precision(config.precision, device)
    if world.is_main:
        remove_earlier_verdict(out)
    model, model_info = build_proxy(dataset, config, out, device, amp_dtype, timer, world)
    require_finite_weights(model, "the proxy (training diverged, or the checkpoint holds them)")
    signature = _embedding_signature(dataset, model, config)
    with timer.phase("embed"):
        embeddings = compute_embeddings(
            model,
            dataset,
            out / "embeddings",
            device,
            amp_dtype,
            sketch_dim=config.sketch_dim,
            exact_gradient_max=config.exact_gradient_max,
            batch_size=config.eval_batch_size,
            workers=config.workers,
            seed=config.seed,
            signature=signature,
            progress=progress,
            world=world,
        )
    if config.proxy_folds:
        with timer.phase("folds"):
            logits = out_of_fold_logits(
                dataset,
                model_info["name"],
                config.train,
                out / "folds",
                device,
                amp_dtype,
                config.proxy_folds,
                seed=config.seed,
                workers=config.workers,
                batch_size=config.eval_batch_size,
                progress=progress,
                world=world,
            )
        embeddings = dataclasses.replace(embeddings, out_of_fold_logits=logits)
    if config.held_out_checkpoint:
        embeddings = dataclasses.replace(embeddings, out_of_fold_logits=embeddings.logits)
    kept_decoded = dataset
    if isinstance(dataset, EncodedDataset):
        # files that passed the header check but did not decode: every pass so far saw them black; from here on they
        # are recorded skips, and the detector works on the rows of the others
        dataset, embeddings = without_late_failures(dataset, embeddings, world)
        truth = poison_mask(record, dataset.ids) if record else None
    files = {
        "summary": out / "summary.json",
        "scores": out / "scores.csv",
        "flagged": out / "flagged.txt",
        "report": out / "report.html",
        "embeddings": embeddings.directory,
    }
    outcome = None
    if world.is_main:
        model_info["train_accuracy_eval_mode"] = embeddings.accuracy()
        detection = _detect_and_write(dataset, config, embeddings, files, timer, progress)
        summary = _summary(dataset, config, model_info, embeddings, detection, device, amp_dtype, timer, started, world)
        summary["embeddings"]["directory"] = files["embeddings"].relative_to(out).as_posix()  # the report's rows
        if record:
            summary["poisons"] = poison_summary(record, Path(config.manifest), truth, detection)
        write_report(
            out, dataset, max_thumbnails=config.max_thumbnails, summary=json.loads(json.dumps(summary, default=str))
        )
        write_atomic(files["summary"], json.dumps(summary, indent=2, default=str))  # the verdict: the last file written
        outcome = detection.scores, detection.flags, summary
    scores, flags, summary = broadcast_from_main(outcome, world)
    if world.is_main:
        drop_decoded(kept_decoded)
    return ScanResult(list(dataset.ids), list(dataset.paths), dataset.labels, scores, flags, summary, files)


def _passes(config: ScanConfig) -> int:
    """How often the scan reads every image: the proxy's epochs (none with a checkpoint), the folds' and the embedding
    pass."""
    trained = 0 if config.checkpoint else config.train.epochs
    return trained + config.proxy_folds * config.train.epochs + 1


def without_late_failures(
    dataset: EncodedDataset, embeddings: Embeddings, world: World
) -> tuple[EncodedDataset, Embeddings]:
    """The dataset less the files found undecodable after a header-only validation, and the embeddings of the rest
    (copied to embeddings/decoded/ by rank 0: the detector, the outputs and the report read those rows)."""
    decoded, keep = dataset.without_late_failures()
    if len(keep) == len(dataset) or not world.is_main:
        return decoded, embeddings
    return decoded, embeddings.rows(keep, embeddings.directory / "decoded")


def _detect_and_write(
    dataset: ImageDataset,
    config: ScanConfig,
    embeddings: Embeddings,
    files: dict[str, Path],
    timer: _Timer,
    progress: bool,
) -> Detection:
    """The detector's scores and flags, written as scores.csv, flagged.txt and the detector's own arrays."""
    with timer.phase("density"):
        detection = run_detector(config.detector, embeddings, config.options, config.context(progress))
    if not np.isfinite(detection.scores).all():
        raise SanitizeError("the detector produced non-finite scores (non-finite embeddings?): no verdict")
    with timer.phase("write"):
        for name, array in detection.arrays.items():  # e.g. knn_density's nearest same-class neighbours
            np.save(files["embeddings"] / f"{name}.npy", array)
        write_scores(files["scores"], dataset, detection)
        write_atomic(files["flagged"], "".join(dataset.ids[i] + "\n" for i in np.flatnonzero(detection.flags)))
    return detection


def by_class_name(detector_summary: dict[str, Any], classes: list[str]) -> dict[str, Any]:
    """The detector's summary with its per-class records keyed by class name, as every per-class record of
    summary.json is (detectors key them by label index)."""
    if "per_class" not in detector_summary:
        return detector_summary
    return detector_summary | {
        "per_class": {classes[int(c)]: info for c, info in detector_summary["per_class"].items()}
    }


def poison_summary(record: dict[str, Any], manifest: Path, truth: np.ndarray, detection: Detection) -> dict[str, Any]:
    """The flags scored against a poison manifest: what it says, how many poisons were caught, precision / recall / AUROC."""
    return {
        "manifest": str(manifest_file(manifest).resolve()),
        **{k: record.get(k) for k in ("method", "eps", "key", "target_id", "target_class", "intended_class")},
        "ids": [str(i) for i in record["poison_ids"]],
        "caught": int((detection.flags & truth).sum()),
        **flag_metrics(detection.flags, detection.scores, truth),
    }


def caution(class_counts: dict[str, int], proxy_accuracy: float) -> str | None:
    """Why the scan cannot judge the data, or None: one class (nothing to set an example against), or a proxy too
    weak for its isolation to mean anything (accuracy on its own data within a quarter of the way from chance)."""
    populated = [n for n in class_counts.values() if n > 0]
    if len(populated) < 2:
        return "the data has one class: an example cannot be set against the rest of its class and the others"
    chance = 1 / len(populated)
    if proxy_accuracy < chance + 0.25 * (1 - chance):
        return (
            f"the proxy is too weak to judge: {proxy_accuracy:.1%} accuracy on the data, chance {chance:.1%} "
            "(train it longer with --epochs, or give a trained model with --checkpoint)"
        )
    return None


def gate(
    flagged_fraction: float, alarmed_classes: list[str], config: ScanConfig, cautioned: str | None = None
) -> dict[str, Any]:
    """The verdict: inconclusive (not passed) when the scan cannot judge the data; else fail when more than
    `max_flagged_fraction` is flagged or, with `fail_on_class_alarm`, when any class raised the class alarm
    (knn_density's improbably-many-flags test; other detectors raise none)."""
    failed = flagged_fraction > config.max_flagged_fraction or (config.fail_on_class_alarm and bool(alarmed_classes))
    verdict = "inconclusive" if cautioned else "failed" if failed else "passed"
    return {
        "verdict": verdict,
        "caution": cautioned,
        "max_flagged_fraction": config.max_flagged_fraction,
        "flagged_fraction": flagged_fraction,
        "alarmed_classes": alarmed_classes,
        "fail_on_class_alarm": config.fail_on_class_alarm,
        "passed": verdict == "passed",
    }


def _summary(
    dataset: ImageDataset,
    config: ScanConfig,
    model_info: dict,
    embeddings: Embeddings,
    detection: Detection,
    device,
    amp_dtype,
    timer: _Timer,
    started: float,
    world: World,
) -> dict[str, Any]:
    n = len(dataset)
    flagged = int(detection.flags.sum())
    fraction = flagged / n
    counts = dataset.class_counts()
    flagged_per_class = np.bincount(dataset.labels[detection.flags], minlength=dataset.num_classes)
    notes = list(dataset.notes) + [f"class {name!r} has no images" for name, c in counts.items() if c == 0]
    return {
        "kind": "scan",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": shlex.join(sys.argv),  # the process's command line (the CLI's, or the script that called the API)
        "versions": _versions(),
        "device": device_record(device, amp_dtype) | {"faiss_gpu": gpu_available(), "processes": world.world_size},
        "data": {
            "source": dataset.source,
            "kind": dataset.kind,
            "fingerprint": dataset.fingerprint,
            "examples": n,
            "image_size": list(dataset.image_size),
            "classes": dataset.classes,
            "counts_per_class": counts,
            "skipped": [dataclasses.asdict(s) for s in dataset.skipped],
            "notes": notes,
        },
        "config": config.to_dict(),
        "model": model_info,
        "embeddings": {k: embeddings.meta[k] for k in ("feature_dim", "num_classes", "gradient", "gradient_dim")}
        | {"space": getattr(config.options, "embedding", "features")},
        "detector": by_class_name(detection.summary, dataset.classes),
        "flagged": {
            "count": flagged,
            "fraction": fraction,
            "per_class": {name: int(f) for name, f in zip(dataset.classes, flagged_per_class)},
        },
        "gate": gate(
            fraction,
            [
                dataset.classes[int(c)]
                for c, info in detection.summary.get("per_class", {}).items()
                if info.get("alarmed")
            ],
            config,
            caution(counts, model_info["train_accuracy_eval_mode"]),
        ),
        "work": scan_work(
            model_info,
            dataset.num_classes,
            dataset.image_size,
            n,
            fold_sizes(dataset.labels, config.proxy_folds, config.seed),
            config.train,
        ),
        # this process's phases, and the proxy's training over every epoch (a resumed run trained some before)
        "seconds": timer.seconds
        | {"total": round(time.perf_counter() - started, 3)}
        | (
            {"proxy_all_epochs": round(sum(h["seconds"] for h in model_info["history"]), 3)}
            if "history" in model_info
            else {}
        ),
        "peak_memory_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }


def scan_work(
    model_info: dict[str, Any],
    num_classes: int,
    image_size: tuple[int, int],
    examples: int,
    folds: list[int],
    recipe: TrainConfig,
) -> dict[str, Any]:
    """The scan's model FLOPs (sanitize.work): the proxy's training over every epoch (none with a checkpoint), each
    out-of-fold proxy's training on the other folds (`folds`: their sizes), and the scoring passes (the embeddings',
    the folds' predictions). Arguments a summary holds, so an older summary's work can be counted too."""

    def flops_at(side: int | None) -> ExampleFlops:
        return example_flops(model_info["name"], num_classes, (3, *reduced_size(image_size, side)))

    # (side, examples) per epoch: the proxy's, then each fold proxy's; a reduced epoch costs its own size's FLOPs
    epochs = [(epoch.get("side"), epoch["examples"]) for epoch in model_info.get("history", [])]
    epochs += [
        (recipe.side_at(epoch), trained_per_epoch(examples - size, recipe.batch_size))
        for size in folds
        for epoch in range(recipe.epochs)
    ]
    full = flops_at(None)
    work = phase_work(full, sum(count for _, count in epochs), examples * (2 if folds else 1))
    work["flops"] += sum(count * (flops_at(side).train - full.train) for side, count in epochs if side is not None)
    return work


def scan(
    data: str | os.PathLike | ImageDataset, out: str | os.PathLike = "sanitize-scan", **options: Any
) -> ScanResult:
    """Scan DATA (ImageFolder directory, .npz, or an opened dataset) and write the outputs to `out`; options are ScanConfig's fields."""
    config = ScanConfig.from_options(**options)
    with removed_if_left_empty(out), claimed_output(data, out, current_world()):
        return run_scan(data, out, config)
