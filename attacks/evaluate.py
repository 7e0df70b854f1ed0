"""The evaluation harness: victims trained from scratch on clean, poisoned and control data; one JSON line each.

Follows ../shared/PROTOCOL.md: per poison key a surrogate (pretrained once on the clean data, cached), poisons crafted
against it (cached), and V victims per arm trained from scratch with fresh seeds the attacker never saw. Rows go to
`results.jsonl` as each victim finishes, so a killed run resumes where it stopped and runs accumulate; `aggregate`
writes summary.json and summary.md (mean +- standard error per attack, eps and arm).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import platform
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch

from attacks import choose_setup, craft, method_config
from attacks.base import PoisonSet, PoisonSetup, load_poisons, save_poisons
from attacks.gradient_matching import poison_pull, pull_carriers
from sanitize.config import RobustConfig, ScanConfig, TrainConfig
from sanitize.data import ImageDataset, open_dataset
from sanitize.data.arrays import ArrayDataset
from sanitize.detectors.epic import EpicOptions
from sanitize.detectors.knn_density import KnnDensityOptions
from sanitize.errors import SanitizeError
from sanitize.manifest import flag_metrics
from sanitize.models import Classifier, create_model
from sanitize.report import write_report
from sanitize.robust import EpicDropper
from sanitize.scan import scan
from sanitize.training import channel_stats, milestone_epochs, predict, resolve_device, resolve_precision, train_model

CONTROL_ARMS = ("clean", "undefended", "random-noise")
UNPOISONED_ARMS = ("clean", "random-noise")  # controls that train on no crafted poisons (no surrogate, no crafting)
KNN_DENSITY_OPTIONS = tuple(f.name for f in dataclasses.fields(KnnDensityOptions))
# options recorded only since they were added, with the value that reproduces the rows written before (session 9)
BEFORE_RECORDED = {"alarm_confidence": 0.0}
# what a detector arm's row records of the scan that made its flags, so rows stay readable when the defaults move
SCAN_OPTIONS_RECORDED = ("detector", *KNN_DENSITY_OPTIONS, "epic_fraction", "expected_poisons")
RECORDED_DEFAULTS = (
    dataclasses.asdict(KnnDensityOptions()) | dataclasses.asdict(EpicOptions()) | {"expected_poisons": None}
)
DETECTOR_ARMS = {
    "scan": "knn_density",
    "epic": "epic",
    "deep_knn": "deep_knn",
    "spectral_signatures": "spectral_signatures",
    "activation_clustering": "activation_clustering",
}  # arm -> `sanitize scan --detector`
TOLD_THE_COUNT = (
    "deep_knn",
    "spectral_signatures",
)  # baselines whose rule needs the number of poisons: given budget x N
ARMS = (*CONTROL_ARMS, *DETECTOR_ARMS, "robust")
SURROGATE_SEED = 10_000  # victims use seeds 0..V-1; the attacker's surrogate never shares one


@dataclass
class Scale:
    """One row of PROTOCOL.md's scales: data subset, model, victim recipe and attack effort."""

    model: str
    model_kwargs: dict[str, Any]
    per_class: int | None  # class-balanced training subset; None = all
    train: TrainConfig
    craft: dict[str, Any]


SCALES = {
    "smoke": Scale("tiny", {}, 60, TrainConfig(epochs=6, batch_size=64), {"iterations": 20, "restarts": 1}),
    # 40 epochs, not 20: 20-epoch victims stayed too underfit to be poisoned (reports/gradient-matching-cpu-ablations)
    "cpu": Scale("convnet", {}, 1000, TrainConfig(epochs=40), {"iterations": 250, "restarts": 4}),
    "paper": Scale(
        "resnet18_cifar",
        {},
        None,
        TrainConfig(epochs=40, milestones=(14 / 40, 24 / 40, 35 / 40)),
        {"iterations": 250, "restarts": 8},
    ),
}


@dataclass
class EvaluationConfig:
    attack: str = "gradient-matching"
    scale: str = "cpu"
    keys: tuple[int, ...] = tuple(range(8))
    victims: int = 4
    seeds: tuple[int, ...] | None = (
        None  # the victims' seeds; None: 0..victims-1 (a subset splits one run across processes)
    )
    eps: float = 16.0
    budget: float = 0.01
    arms: tuple[str, ...] = CONTROL_ARMS  # defended arms are asked for by name
    model: str | None = None  # override the scale's model (a registry name), for ablations
    epochs: int | None = None  # override the scale's victim epochs
    restarts: int | None = None
    iterations: int | None = None
    augment: bool | None = (
        None  # override the scale's crop + flip for surrogate and victims (the no-augmentation check)
    )
    craft_options: dict[str, Any] = dataclasses.field(default_factory=dict)  # override the attack's own options by name
    device: str = "auto"
    precision: str = "auto"
    subset_seed: int = 0
    cache: str | None = None  # where surrogates, clean victims and poisons are kept; default OUT/cache

    def __post_init__(self) -> None:
        # cache names hash these: eps=16 and eps=16.0 must name the same poisons (an int once re-crafted a cached key)
        self.eps, self.budget = float(self.eps), float(self.budget)

    def resolved(self) -> tuple[Scale, TrainConfig, Any]:
        if self.scale not in SCALES:
            raise SanitizeError(f"unknown scale {self.scale!r}; choose from {', '.join(SCALES)}")
        unknown = set(self.arms) - set(ARMS)
        if unknown:
            raise SanitizeError(f"unknown arm(s) {', '.join(sorted(unknown))}; choose from {', '.join(ARMS)}")
        scale = SCALES[self.scale]
        if self.model:
            scale = dataclasses.replace(scale, model=self.model, model_kwargs={})
        train = dataclasses.replace(scale.train, epochs=self.epochs or scale.train.epochs)
        if self.augment is not None:
            train = dataclasses.replace(train, augment=self.augment)
        options = dict(scale.craft)
        options.update({k: v for k, v in (("restarts", self.restarts), ("iterations", self.iterations)) if v})
        options.update(self.craft_options)
        return scale, train, method_config(self.attack, **options)


def class_balanced_subset(dataset: ImageDataset, per_class: int | None, seed: int) -> ArrayDataset:
    """A fixed subset with `per_class` random examples of every class (all of them for None)."""
    if not isinstance(dataset, ArrayDataset):
        raise SanitizeError("evaluate needs .npz training data (write an ImageFolder to npz first)")
    if per_class is None:
        return dataset
    rng = np.random.default_rng(seed)
    chosen = []
    for c in range(dataset.num_classes):
        members = np.flatnonzero(dataset.labels == c)
        if len(members) < per_class:
            raise SanitizeError(f"class {dataset.classes[c]} has {len(members)} examples, the scale needs {per_class}")
        chosen.append(rng.choice(members, per_class, replace=False))
    return dataset.subset(np.sort(np.concatenate(chosen)))


def _hash(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


class Cost(NamedTuple):
    """Wall seconds, and process CPU seconds on a CPU device (None elsewhere, or for runs cached before they were
    kept): with several single-thread evaluations sharing a machine, CPU seconds still measure the work."""

    wall: float
    cpu: float | None


class Harness:
    """Shared state of one evaluation: data, device, caches and the results file."""

    def __init__(self, train_path: Path, test_path: Path, out: Path, config: EvaluationConfig, progress: bool = True):
        self.config, self.progress, self.out = config, progress, out
        self.scale, self.recipe, self.craft_config = config.resolved()
        self.train = class_balanced_subset(
            open_dataset(train_path, progress=progress), self.scale.per_class, config.subset_seed
        )
        self.test = open_dataset(test_path, progress=progress)
        if self.test.num_classes > self.train.num_classes or self.test.image_size != self.train.image_size:
            raise SanitizeError("the test set's classes or image size do not match the training set's")
        self.device = resolve_device(config.device)
        self.amp = resolve_precision(config.precision, self.device)
        self.cache = Path(config.cache) if config.cache else out / "cache"
        self.cache.mkdir(parents=True, exist_ok=True)
        self.results = out / "results.jsonl"
        self.mean, self.std = channel_stats(self.train)

    def new_model(self, seed: int) -> Classifier:
        torch.manual_seed(seed)
        model = create_model(
            self.scale.model, self.train.num_classes, (3, *self.train.image_size), **self.scale.model_kwargs
        )
        model.set_normalization(self.mean, self.std)
        return model

    def model_path(self, data: ArrayDataset, seed: int, tag: str, robust: bool = False) -> Path:
        """Where the model trained on `data` with `seed` is cached: named by data, model, recipe, seed (and the robust
        training's settings); a robust model's drop log lies beside it (.drop_log.json)."""
        parts = [data.fingerprint, self.scale.model, self.scale.model_kwargs, dataclasses.asdict(self.recipe), seed]
        if robust:
            parts.append(dataclasses.asdict(RobustConfig()))
        return self.cache / f"{tag}-{_hash(*parts)}.pt"

    def trained(self, data: ArrayDataset, seed: int, tag: str, robust: bool = False) -> tuple[Classifier, Cost]:
        """A model trained from scratch on `data` with `seed` (or loaded from the cache), and what its training cost
        (summed over epochs, so a resumed run counts every epoch once). With `robust`, EPIC's dropping
        (sanitize.robust) runs during training."""
        final = self.model_path(data, seed, tag, robust)
        name = final.stem
        partial = final.with_suffix(".partial.pt")
        model = self.new_model(seed)
        if final.exists():
            state = torch.load(final, map_location="cpu", weights_only=True)
            model.load_state_dict(state["model"])
            return model, Cost(float(state["seconds"]), state.get("cpu_seconds"))
        recipe = dataclasses.replace(self.recipe, seed=seed)
        dropper = None
        if robust:
            dropper = EpicDropper(
                data,
                RobustConfig(),
                recipe.epochs,
                max(milestone_epochs(recipe)),
                final.with_suffix(".drop_log.json"),
                self.device,
                self.amp,
            )
        history = train_model(
            model,
            data,
            np.arange(len(data)),
            recipe,
            self.device,
            self.amp,
            checkpoint=partial,
            meta={"name": name},
            progress=self.progress,
            desc=tag,
            after_epoch=dropper,
        )
        cpu = [epoch.get("cpu_seconds") for epoch in history]  # a run resumed from an older checkpoint lacks some
        cost = Cost(
            sum(epoch["seconds"] for epoch in history),
            sum(cpu) if self.device.type == "cpu" and None not in cpu else None,
        )
        torch.save({"model": model.state_dict(), "seconds": cost.wall, "cpu_seconds": cost.cpu}, final)
        partial.unlink(missing_ok=True)
        return model, cost

    def surrogate(self) -> tuple[Classifier, Cost]:
        """The attacker's surrogate, trained once and published beside the results (OUT/surrogates/) like the poisons:
        a run on another machine loads it instead of training another, so carriers (and any crafting) are measured on
        the same model in every session."""
        cached = self.model_path(self.train, SURROGATE_SEED, "surrogate")
        published = self.out / "surrogates" / cached.name
        if published.exists() and not cached.exists():
            shutil.copyfile(published, cached)
        model, cost = self.trained(self.train, SURROGATE_SEED, "surrogate")
        if not published.exists():
            published.parent.mkdir(exist_ok=True)
            shutil.copyfile(cached, published)
        return model, cost

    def poisons_path(self, setup: PoisonSetup) -> Path:
        """Where the poisons for `setup` are cached: named by data, key, eps, budget, attack config and the surrogate's recipe."""
        surrogate_recipe = (self.scale.model, self.scale.model_kwargs, dataclasses.asdict(self.recipe))
        digest = _hash(
            self.train.fingerprint,
            setup.key,
            self.config.eps,
            self.config.budget,
            dataclasses.asdict(self.craft_config),
            surrogate_recipe,
        )
        return self.cache / f"poisons-{self.config.attack}-key{setup.key}-eps{self.config.eps:g}-{digest}.npz"

    def published_poisons_path(self, setup: PoisonSetup) -> Path:
        """The copy of the poisons beside results.jsonl (OUT/poisons/): the victims' poisons are part of the result, and
        an evaluation resumed on a machine without the cache uses them instead of crafting again."""
        return self.out / "poisons" / self.poisons_path(setup).name

    def stored_poisons(self, setup: PoisonSetup) -> PoisonSet | None:
        """The cached or published poisons for this key, or None when they would have to be crafted."""
        path, published = self.poisons_path(setup), self.published_poisons_path(setup)
        for stored in (path, published):
            if stored.exists():
                poisons = load_poisons(stored, setup)
                for copy in (
                    path,
                    published,
                ):  # keep both: benchmarks read the cache, a fresh machine the published copy
                    if not copy.exists():
                        save_poisons(poisons, copy)
                return poisons
        return None

    def poisons(self, setup: PoisonSetup, surrogate: Classifier) -> PoisonSet:
        """Craft (or load the cached or published) poisons for this key."""
        stored = self.stored_poisons(setup)
        if stored is not None:
            return stored
        path, published = self.poisons_path(setup), self.published_poisons_path(setup)
        partial = path.with_name(path.stem + ".partial.pt")
        poisons = craft(
            self.config.attack,
            [surrogate],
            self.train,
            self.test.load_image(setup.target_index),
            setup,
            self.config.eps,
            self.craft_config,
            device=self.device,
            amp_dtype=self.amp,
            progress=self.progress,
            checkpoint=partial,
        )
        save_poisons(poisons, path)
        save_poisons(poisons, published)
        partial.unlink(missing_ok=True)
        return poisons

    def data_for(self, arm: str, poisons: PoisonSet | None, setup: PoisonSetup | None = None) -> ArrayDataset:
        """The training set an arm starts from: clean, the random-noise control, or the poisoned set (undefended, and
        every defended arm, which filters it). The control needs only the key's `setup` (its poison positions), so it
        runs without a surrogate or crafted poisons; `setup` defaults to the poisons'."""
        if arm == "clean":
            return self.train
        setup = setup or poisons.setup
        positions = np.asarray(setup.poison_indices)
        clean = torch.from_numpy(self.train.images[positions]).permute(0, 3, 1, 2)
        if arm != "random-noise":
            changed = poisons.apply(clean)
        else:  # random signs at full eps on the same images, the control
            generator = torch.Generator().manual_seed(setup.key)
            signs = torch.randint(0, 2, clean.shape, generator=generator).to(torch.int16) * 2 - 1
            changed = (clean.to(torch.int16) + signs * int(math.floor(self.config.eps))).clamp(0, 255).to(torch.uint8)
        images = np.array(self.train.images, copy=True)
        images[positions] = changed.permute(0, 2, 3, 1).numpy()
        return self.train.with_images(images)

    def filtered(
        self, poisoned: ArrayDataset, arm: str, setup: PoisonSetup
    ) -> tuple[ArrayDataset, np.ndarray, dict[str, Any], Cost]:
        """What `sanitize scan` (the default, or a baseline's --detector) keeps of the poisoned data, its flags, the
        flags scored against the true poisons, and what the scan cost. Scans are cached per poisoned set; the baselines reuse
        the default scan's proxy (--checkpoint), so their cost is that proxy's training plus their own pass."""
        root = self.scan_dir(poisoned)
        options = {"quiet": True, "device": self.config.device, "precision": self.config.precision}
        result, seconds = self._scan_once(poisoned, root / "knn_density", options)
        told = None
        if arm != "scan":
            detector = DETECTOR_ARMS[arm]
            told = told_count(detector, setup)
            result, own = self._scan_once(
                poisoned,
                root / detector,
                options
                | {
                    "detector": detector,
                    "expected_poisons": told,
                    "checkpoint": str(root / "knn_density" / "proxy" / "model.pt"),
                },
            )
            seconds = Cost(seconds.wall + own.wall, None if None in (seconds.cpu, own.cpu) else seconds.cpu + own.cpu)
        metrics = flag_metrics(result.flags, result.scores, poison_truth(setup, len(result.flags))) | {
            "told_expected_poisons": told,
            "scan_options": recorded_scan_options(result.summary["config"]),
        }
        return poisoned.subset(np.flatnonzero(~result.flags)), result.flags, metrics, seconds

    def defense(self, arm: str, setup: PoisonSetup) -> str | None:
        """What makes a detector arm's rows this arm's under today's defaults (None for the other arms): a row scanned with
        other options (an older default) is another variant of the arm, trained again rather than counted as done."""
        if arm not in DETECTOR_ARMS:
            return None
        detector = DETECTOR_ARMS[arm]
        return defense_key(default_scan_options(detector, told_count(detector, setup)))

    def carriers(self, setup: PoisonSetup, poisoned: ArrayDataset, surrogate: Classifier) -> np.ndarray:
        """Mask over the poisons (in setup order): the carriers, the fewest poisons holding half of the pull on the
        target measured on the surrogate (attacks.gradient_matching.poison_pull). They are what makes the attack work
        (reports/detection-cpu), so defended rows say how many of them each defense caught."""
        images, labels, _ = poisoned.load_batch(np.asarray(setup.poison_indices))
        return pull_carriers(
            poison_pull(surrogate, images, labels, self.test.load_image(setup.target_index), setup.intended_class)
        )

    def scan_dir(self, poisoned: ArrayDataset) -> Path:
        """Where the scans of one poisoned set live (one folder per detector)."""
        return self.cache / f"scan-{_hash(poisoned.fingerprint)}"

    def _scan_once(self, data: ArrayDataset, out: Path, options: dict[str, Any]) -> tuple[Any, Cost]:
        """(ScanResult, the first run's cost): a rerun reuses the finished proxy and embeddings."""
        started, cpu_started = time.perf_counter(), time.process_time()
        result = scan(data, out, **options)
        cost = out / "cost.json"
        if not cost.exists():
            cpu = time.process_time() - cpu_started if self.device.type == "cpu" else None
            cost.write_text(json.dumps({"seconds": time.perf_counter() - started, "cpu_seconds": cpu}))
        recorded = json.loads(cost.read_text())
        return result, Cost(recorded["seconds"], recorded.get("cpu_seconds"))

    def measure(self, model: Classifier, setup: PoisonSetup) -> dict[str, Any]:
        """The victim's prediction on the target, its probability of the intended class (a finer signal than success,
        which is all-or-nothing) and its accuracy on the test set without the target."""
        logits = predict(model, self.test, np.arange(len(self.test)), self.device, self.amp)
        predictions = logits.argmax(axis=1)
        keep = np.ones(len(self.test), bool)
        keep[setup.target_index] = False
        probabilities = torch.softmax(torch.as_tensor(logits[setup.target_index], dtype=torch.float32), dim=0)
        return {
            "target_pred": int(predictions[setup.target_index]),
            "p_intended": round(float(probabilities[setup.intended_class]), 4),
            "clean_acc": float((predictions[keep] == self.test.labels[keep]).mean()),
        }

    def done(self) -> dict[tuple, set[tuple[str | None, str | None]]]:
        """Per (attack, eps, budget, key, arm, seed, scale, model, epochs): (the digest of the poisons, the defense) of
        its rows: the digest None for the controls and for rows written before rows named their poisons, the defense
        None but for detector arms (`defense_key`)."""
        finished: dict[tuple, set[tuple[str | None, str | None]]] = {}
        for r in read_rows(self.out) if self.results.exists() else []:
            identity = (
                r["attack"],
                r["eps"],
                r["budget"],
                r["poison_key"],
                r["arm"],
                r["victim_seed"],
                r["scale"],
                r["model"],
                r["epochs"],
            )
            defense = defense_key(r.get("scan_options")) if r["arm"] in DETECTOR_ARMS else None
            finished.setdefault(identity, set()).add((r.get("poisons_sha256"), defense))
        return finished

    def plan(
        self, key: int, done: dict[tuple, set[tuple[str | None, str | None]]], digest: str | None, setup: PoisonSetup
    ) -> list[tuple[str, int]]:
        """The (arm, seed) victims still to train for `key` on the poisons named `digest` (None: not crafted yet).

        A row counts when it was trained on these poisons, or on unnamed ones (rows from before rows named their
        poisons), and, for a detector arm, scanned with today's options. A defended arm is measured against the
        undefended victim of the same seed *on the same poisons*, so that twin is planned too when the undefended rows
        of that seed were trained on other poisons."""
        config = self.config

        def trained(arm: str, seed: int, exact: bool = False) -> bool:
            rows = done.get(
                (
                    config.attack,
                    config.eps,
                    config.budget,
                    key,
                    arm,
                    seed,
                    config.scale,
                    self.scale.model,
                    self.recipe.epochs,
                ),
                set(),
            )
            if arm in UNPOISONED_ARMS:
                return bool(rows)
            wanted = self.defense(arm, setup)
            return any(
                defense == wanted and (digest is not None and made == digest or (not exact and made is None))
                for made, defense in rows
            )

        seeds = config.seeds if config.seeds is not None else range(config.victims)
        todo = [(arm, seed) for arm in config.arms for seed in seeds if not trained(arm, seed)]
        defended_seeds = sorted({seed for arm, seed in todo if arm not in CONTROL_ARMS})
        twins = [
            ("undefended", seed)
            for seed in defended_seeds
            if not trained("undefended", seed, exact=True) and ("undefended", seed) not in todo
        ]
        return twins + todo

    def append(self, row: dict[str, Any]) -> None:
        with self.results.open("a") as handle:
            handle.write(json.dumps(row) + "\n")
            handle.flush()
            os.fsync(handle.fileno())


def run_evaluation(
    train_path: str | Path,
    test_path: str | Path,
    out: str | Path,
    config: EvaluationConfig,
    progress: bool = True,
    command: str | None = None,
) -> Path:
    """Train and measure every (key, arm, victim) not yet in OUT/results.jsonl; then aggregate."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    harness = Harness(Path(train_path), Path(test_path), out, config, progress)
    done = harness.done()
    surrogate = None
    for key in config.keys:
        setup = choose_setup(key, harness.train, harness.test, config.budget)
        stored = harness.stored_poisons(setup)
        todo = harness.plan(key, done, stored.digest() if stored else None, setup)
        if not todo:
            continue
        poisons = None  # the unpoisoned controls need neither surrogate nor poisons
        if any(arm not in UNPOISONED_ARMS for arm, _ in todo):
            if surrogate is None:
                surrogate, surrogate_cost = harness.surrogate()
            poisons = stored or harness.poisons(setup, surrogate)
        carriers = None
        poisoned_fingerprint = harness.data_for("undefended", poisons).fingerprint if poisons is not None else None
        for arm, victim_seed in todo:
            data = harness.data_for(arm, poisons, setup)
            defense = {"dropped_fraction": 0.0, "poison_precision": None, "poison_recall": None, "auroc": None}
            seconds = {"surrogate": None, "crafting": None}
            if poisons is not None:
                seconds = {"surrogate": round(surrogate_cost.wall, 1), "crafting": poisons.metadata.get("seconds")}
            robust = arm == "robust"
            if arm in DETECTOR_ARMS or robust:
                carriers = harness.carriers(setup, data, surrogate) if carriers is None else carriers
            if arm in DETECTOR_ARMS:
                data, caught, defense, scan_cost = harness.filtered(data, arm, setup)
                defense |= split_by_carriers(caught, setup, carriers)
                seconds |= {"scan": round(scan_cost.wall, 1), "scan_cpu": _rounded(scan_cost.cpu)}
            # a detector that flagged nothing leaves the undefended victim's data: that victim (cached) is this arm's
            tag = (
                "victim-undefended"
                if arm in DETECTOR_ARMS and data.fingerprint == poisoned_fingerprint
                else f"victim-{arm}"
            )
            model, victim_cost = harness.trained(data, victim_seed, tag, robust)
            if robust:
                defense = robust_metrics(
                    harness.model_path(data, victim_seed, f"victim-{arm}", robust).with_suffix(".drop_log.json"),
                    setup,
                    len(data),
                    carriers,
                )
            started = time.perf_counter()
            measured = harness.measure(model, setup)
            harness.append(
                {
                    "attack": config.attack,
                    "scale": config.scale,
                    "eps": config.eps,
                    "budget": len(setup.poison_indices) / len(harness.train),
                    "poison_key": key,
                    "target_id": setup.target_id,
                    "target_class": setup.target_class,
                    "intended_class": setup.intended_class,
                    "arm": arm,
                    "victim_seed": victim_seed,
                    "success": measured["target_pred"] == setup.intended_class,
                    **measured,
                    **defense,
                    "poisons_sha256": poisons.digest() if poisons is not None and arm not in UNPOISONED_ARMS else None,
                    "model": harness.scale.model,
                    "train_size": len(harness.train),
                    "epochs": harness.recipe.epochs,
                    "augment": harness.recipe.augment,
                    "craft_config": dataclasses.asdict(harness.craft_config) if arm not in UNPOISONED_ARMS else None,
                    "seconds": seconds
                    | {
                        "victim_training": round(victim_cost.wall, 1),
                        "victim_training_cpu": _rounded(victim_cost.cpu),
                        "measure": round(time.perf_counter() - started, 1),
                    },
                    "craft_final_loss": min(poisons.metadata.get("final_loss_per_restart", [float("nan")]))
                    if poisons
                    else None,
                }
            )
    aggregate(out, command)
    return out


def recorded_scan_options(settings: dict[str, Any]) -> dict[str, Any]:
    """What a detector arm's row records of the scan (a ScanConfig as a dict) that made its flags: flat, the detector's
    own options and, for the names it does not have, the other detectors' defaults (the rows' format since before
    detectors owned their options, so every row compares with every other)."""
    detector_options = settings["options"] or {}
    flat = {"detector": settings["detector"]} | {
        name: detector_options.get(name, RECORDED_DEFAULTS[name]) for name in SCAN_OPTIONS_RECORDED[1:]
    }
    return flat | {"proxy_epochs": settings["train"]["epochs"]}


def told_count(detector: str, setup: PoisonSetup) -> int | None:
    """The poison count a detector is told: the true one for the baselines whose rule needs it, else None."""
    return len(setup.poison_indices) if detector in TOLD_THE_COUNT else None


def default_scan_options(detector: str, told: int | None) -> dict[str, Any]:
    """What a row of `detector`'s arm records when scanned with today's defaults (told `told` poisons)."""
    return recorded_scan_options(ScanConfig.from_options(detector=detector, expected_poisons=told).to_dict())


def defense_options(scan_options: dict[str, Any]) -> dict[str, Any]:
    """The recorded options that decide a detector's flags: every one for the default scan; for a baseline, all but
    knn_density's own (a baseline row stays current when only the default detector's settings move)."""
    if scan_options["detector"] == "knn_density":
        return scan_options | {name: value for name, value in BEFORE_RECORDED.items() if name not in scan_options}
    return {name: value for name, value in scan_options.items() if name not in KNN_DENSITY_OPTIONS}


def defense_key(scan_options: dict[str, Any] | None) -> str:
    """A detector arm's defense as one comparable string ("unrecorded" for a row that kept no scan options)."""
    return "unrecorded" if scan_options is None else json.dumps(defense_options(scan_options), sort_keys=True)


def defense_variant(row: dict[str, Any]) -> str:
    """How a detector arm's row was scanned, as the options that differ from today's defaults ("" when none do, and
    for the other arms), so that aggregate keeps rows scanned under an older default apart from the current arm."""
    if row["arm"] not in DETECTOR_ARMS:
        return ""
    recorded = row.get("scan_options")
    if recorded is None:
        return "scan options not recorded"
    current = defense_options(default_scan_options(recorded["detector"], recorded["expected_poisons"]))
    return ", ".join(
        f"{name}={value}" for name, value in defense_options(recorded).items() if current.get(name) != value
    )


def poison_truth(setup: PoisonSetup, size: int) -> np.ndarray:
    """Mask over the training positions: True at the poisons."""
    truth = np.zeros(size, dtype=bool)
    truth[list(setup.poison_indices)] = True
    return truth


def robust_metrics(drop_log: Path, setup: PoisonSetup, size: int, carriers: np.ndarray) -> dict[str, Any]:
    """What robust training dropped, scored against the true poisons (no per-example score: no AUROC)."""
    dropped = np.zeros(size, dtype=bool)
    dropped[[row["position"] for row in json.loads(drop_log.read_text())["dropped"]]] = True
    return flag_metrics(dropped, None, poison_truth(setup, size)) | split_by_carriers(dropped, setup, carriers)


def split_by_carriers(caught: np.ndarray, setup: PoisonSetup, carriers: np.ndarray) -> dict[str, Any]:
    """How many carriers a defense caught, and its recall among them and among the other poisons."""
    hit = caught[np.asarray(setup.poison_indices)]
    return {
        "carriers": int(carriers.sum()),
        "carrier_recall": float(hit[carriers].mean()),
        "rest_recall": float(hit[~carriers].mean()) if (~carriers).any() else None,
    }


def read_rows(out: Path) -> list[dict[str, Any]]:
    """Every row of results.jsonl, with a clear error for a damaged line or a row missing the protocol's keys."""
    path = out / "results.jsonl"
    rows = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            raise SanitizeError(f"{path}:{number} is not a JSON line (truncated by a kill? delete that line)") from None
        missing = {
            "attack",
            "scale",
            "eps",
            "budget",
            "arm",
            "poison_key",
            "victim_seed",
            "success",
            "clean_acc",
            "seconds",
            "model",
            "epochs",
        } - set(row)
        if missing:
            raise SanitizeError(f"{path}:{number} lacks {', '.join(sorted(missing))}")
        rows.append(row)
    return rows


def aggregate(out: Path, command: str | None = None) -> dict[str, Any]:
    """summary.json and summary.md: mean +- standard error per (attack, scale, model, epochs, eps, arm, variant): a
    detector arm's rows scanned under an older default are their own variant (`defense_variant`)."""
    groups: dict[tuple, list[dict]] = {}
    for row in read_rows(out):
        groups.setdefault(
            (row["attack"], row["scale"], row["model"], row["epochs"], row["eps"], row["arm"], defense_variant(row)), []
        ).append(row)
    table = []
    for (attack, scale, model, epochs, eps, arm, variant), rows in sorted(groups.items()):
        success = np.array([r["success"] for r in rows], float)
        accuracy = np.array([r["clean_acc"] for r in rows], float)
        p_intended = [r["p_intended"] for r in rows if r.get("p_intended") is not None]
        cost, basis = _cost_vs_plain(rows, groups.get((attack, scale, model, epochs, eps, "undefended", ""), []))
        table.append(
            {
                "attack": attack,
                "scale": scale,
                "model": model,
                "epochs": epochs,
                "eps": eps,
                "arm": arm,
                "variant": variant,
                "victims": len(rows),
                "keys": len({r["poison_key"] for r in rows}),
                "success_mean": float(success.mean()),
                "success_se": float(success.std(ddof=1) / math.sqrt(len(rows))) if len(rows) > 1 else None,
                "p_intended_median": float(np.median(p_intended)) if p_intended else None,
                "clean_acc_mean": float(accuracy.mean()),
                "clean_acc_se": float(accuracy.std(ddof=1) / math.sqrt(len(rows))) if len(rows) > 1 else None,
                "victim_seconds_mean": float(np.mean([r["seconds"]["victim_training"] for r in rows])),
                "dropped_fraction_mean": float(np.mean([r["dropped_fraction"] for r in rows])),
                "poison_precision_mean": _mean_of(rows, "poison_precision"),
                "poison_recall_mean": _mean_of(rows, "poison_recall"),
                "auroc_mean": _mean_of(rows, "auroc"),
                "cost_vs_plain_training": cost,
                "cost_basis": basis,
            }
        )
    paired = paired_with_undefended(groups)
    summary = {
        "command": command,
        "git_commit": _git_commit(),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__},
        "table": table,
        "paired": paired,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    lines = [
        "| attack | scale | model | epochs | eps | arm | victims (keys) | success | median p(intended) | clean accuracy | dropped "
        "| poison precision | poison recall | AUROC | victim s | cost vs plain |",
        "|" + " --- |" * 16,
    ]
    for t in table:
        lines.append(
            f"| {t['attack']} | {t['scale']} | {t['model']} | {t['epochs']} | {t['eps']:g} | {_arm_label(t)} | {t['victims']} ({t['keys']}) "
            f"| {t['success_mean']:.1%}{_se(t['success_se'], '.1%')} | {_cell(t['p_intended_median'], '.3f')} | {t['clean_acc_mean']:.2%} | {t['dropped_fraction_mean']:.2%} "
            f"| {_cell(t['poison_precision_mean'], '.2f')} | {_cell(t['poison_recall_mean'], '.2f')} | {_cell(t['auroc_mean'], '.3f')} "
            f"| {t['victim_seconds_mean']:.0f} | {_cell(t['cost_vs_plain_training'], '.2f')}{' (' + t['cost_basis'] + ')' if t['cost_basis'] else ''} |"
        )
    if paired:
        lines += [
            "",
            "Paired with the undefended victims of the same key and seed (defended arms may cover fewer keys than the table's undefended row):",
            "",
            "| eps | epochs | arm | pairs (keys) | undefended success | arm success | clean accuracy change | recall of carriers / other poisons |",
            "|" + " --- |" * 8,
        ]
        for t in paired:
            lines.append(
                f"| {t['eps']:g} | {t['epochs']} | {_arm_label(t)} | {t['pairs']} ({t['keys']}) | {t['undefended_success']:.1%} | {t['arm_success']:.1%} "
                f"| {t['clean_acc_change']:+.2%}{_se(t['clean_acc_change_se'], '.2%')} | {_cell(t.get('carrier_recall'), '.2f')} / {_cell(t.get('rest_recall'), '.2f')} |"
            )
    (out / "summary.md").write_text(
        f"Command: `{command}`\n\nCommit: {summary['git_commit']}\n\n" + "\n".join(lines) + "\n"
    )
    write_report(out)
    return summary


def paired_with_undefended(groups: dict[tuple, list[dict]]) -> list[dict[str, Any]]:
    """Every arm but the controls against the undefended victims of the same (key, seed, poisons): success on the same
    pairs and the change in clean accuracy, so that an arm run on a few keys is not read against every key's rate.
    Rows from before rows named their poisons pair among themselves (they shared one cache of poisons)."""
    paired = []
    for (attack, scale, model, epochs, eps, arm, variant), rows in sorted(groups.items()):
        if arm in CONTROL_ARMS:
            continue
        plain = {_pair_key(r): r for r in groups.get((attack, scale, model, epochs, eps, "undefended", ""), [])}
        pairs = [(plain[_pair_key(r)], r) for r in rows if _pair_key(r) in plain]
        if not pairs:
            continue
        change = np.array([d["clean_acc"] - u["clean_acc"] for u, d in pairs])
        paired.append(
            {
                "attack": attack,
                "scale": scale,
                "model": model,
                "epochs": epochs,
                "eps": eps,
                "arm": arm,
                "variant": variant,
                "pairs": len(pairs),
                "keys": len({u["poison_key"] for u, _ in pairs}),
                "undefended_success": float(np.mean([u["success"] for u, _ in pairs])),
                "arm_success": float(np.mean([d["success"] for _, d in pairs])),
                "clean_acc_change": float(change.mean()),
                "clean_acc_change_se": float(change.std(ddof=1) / math.sqrt(len(change))) if len(change) > 1 else None,
                "carrier_recall": _mean_of([d for _, d in pairs], "carrier_recall"),
                "rest_recall": _mean_of([d for _, d in pairs], "rest_recall"),
            }
        )
    return paired


def _arm_label(entry: dict[str, Any]) -> str:
    return f"{entry['arm']} ({entry['variant']})" if entry["variant"] else entry["arm"]


def _pair_key(row: dict[str, Any]) -> tuple:
    return row["poison_key"], row["victim_seed"], row.get("poisons_sha256")


def _cost_vs_plain(rows: list[dict[str, Any]], plain: list[dict[str, Any]]) -> tuple[float | None, str | None]:
    """An arm's mean scan + training time over the undefended victims' mean training time, in process CPU seconds
    when every row has them (single-thread runs sharing a machine: wall time would measure the sharing), else wall."""
    if not plain:
        return None, None
    both = rows + plain
    cpu = all(
        r["seconds"].get("victim_training_cpu") is not None
        and ("scan" not in r["seconds"] or r["seconds"].get("scan_cpu") is not None)
        for r in both
    )
    training, scan = ("victim_training_cpu", "scan_cpu") if cpu else ("victim_training", "scan")
    spent = np.mean([r["seconds"].get(scan) or 0 for r in rows]) + np.mean([r["seconds"][training] for r in rows])
    return float(spent / np.mean([r["seconds"][training] for r in plain])), "cpu" if cpu else "wall"


def _rounded(value: float | None) -> float | None:
    return None if value is None else round(value, 1)


def _se(value: float | None, spec: str) -> str:
    return "" if value is None else f" +- {format(value, spec)}"


def _mean_of(rows: list[dict[str, Any]], key: str) -> float | None:
    values = [r[key] for r in rows if r.get(key) is not None]
    return float(np.mean(values)) if values else None


def _cell(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _git_commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
