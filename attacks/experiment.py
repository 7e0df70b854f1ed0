"""One evaluation's shared state: data, device, the caches of surrogates, poisons, victims and scans, the arms' data,
and which victims are still to train."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from attacks.arms import (
    COMBINED_WITH_DEFAULT,
    CONTROL_ARMS,
    NOISE_ARMS,
    SCAN_COMBINED,
    SCANNED_ARMS,
    UNPOISONED_ARMS,
    poison_truth,
    told_count,
)
from attacks.base import PoisonSet, PoisonSetup, keep_poisons, stored_poisons
from attacks.carriers import poison_pull, pull_carriers
from attacks.crafting import craft, options_identity
from attacks.locks import exclusive
from attacks.rows import (
    default_scan_options,
    defense_key,
    read_rows,
    recorded_scan_options,
    robust_changes,
    row_defense,
    training_key,
)
from attacks.scales import EvaluationConfig, class_balanced_subset
from attacks.surrogates import SURROGATE_SEED, surrogates
from attacks.trained import Cost, ModelCache, stable_hash
from sanitize.config import ScanConfig
from sanitize.data import ImageDataset, open_dataset
from sanitize.data.arrays import ArrayDataset
from sanitize.detectors import option_names, options_class
from sanitize.errors import SanitizeError
from sanitize.manifest import flag_metrics
from sanitize.models import Classifier, resolve_model_name
from sanitize.scanner import ScanResult, scan
from sanitize.training import channel_stats, predict, resolve_device, resolve_precision

EVADE_PROXY_SEED = 20_000  # the adaptive attacker's proxies (evade_space=proxy): neither a victim's nor the scan's seed


def scanning(out: Path):
    """The lock held while a scan writes `out` (beside it): one process at a time scans a set, evaluation or sweep."""
    return exclusive(out.with_name(out.name + ".lock"), waiting=f"{out} is being scanned")


def proxy_variant_folder(root: Path, variant: dict[str, Any]) -> Path:
    """The folder, in a poisoned set's scan directory `root`, of the default scan under options that change its proxy
    (the evaluation's --scan-option, e.g. another seed): the evaluation and the detection sweep share it."""
    return root / f"knn_density-{stable_hash(variant)}"


class Harness:
    """Shared state of one evaluation: data, device, caches and the results file."""

    def __init__(self, train_path: Path, test_path: Path, out: Path, config: EvaluationConfig, progress: bool = True):
        self.config, self.progress, self.out = config, progress, out
        self.scale, self.recipe, self.craft_config = config.resolved()
        robust_config = config.robust_config()  # a bad option fails here, before the data is read
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
        mean, std = channel_stats(self.train)
        scale = self.scale
        self.models = ModelCache(
            self.cache,
            scale.model,
            scale.model_kwargs,
            self.recipe,
            self.train.num_classes,
            self.train.image_size,
            mean,
            std,
            self.device,
            self.amp,
            progress,
            robust_config,
        )

    def models_for(self, arm: str) -> ModelCache:
        """Where an arm's victims are trained: the scale's recipe, with the run's noise for the noise arms."""
        if arm not in NOISE_ARMS:
            return self.models
        noises = {noise: self.config.noise_eps for noise in NOISE_ARMS[arm]}
        return dataclasses.replace(self.models, recipe=dataclasses.replace(self.recipe, **noises))

    def surrogates(self) -> tuple[list[Classifier], Cost]:
        """The attacker's surrogate(s), trained once and published beside the results (attacks.surrogates)."""
        return surrogates(self.models, self.train, self.out / "surrogates", self.config.surrogates)

    def poisons_path(self, setup: PoisonSetup) -> Path:
        """Where the poisons for `setup` are cached: named by data, key, eps, budget, attack config and the surrogates'
        recipe (and their number when more than one, so single-surrogate poisons keep their names)."""
        surrogate_recipe = (self.scale.model, self.scale.model_kwargs, self.recipe.identity())
        if self.config.surrogates > 1:
            surrogate_recipe += (self.config.surrogates,)
        digest = stable_hash(
            self.train.fingerprint,
            setup.key,
            self.config.eps,
            self.config.budget,
            options_identity(self.craft_config),
            surrogate_recipe,
        )
        return self.cache / f"poisons-{self.config.attack}-key{setup.key}-eps{self.config.eps:g}-{digest}.npz"

    def published_poisons_path(self, setup: PoisonSetup) -> Path:
        """The copy of the poisons beside results.jsonl (OUT/poisons/): the victims' poisons are part of the result, and
        an evaluation resumed on a machine without the cache uses them instead of crafting again."""
        return self.out / "poisons" / self.poisons_path(setup).name

    def stored_poisons(self, setup: PoisonSetup) -> PoisonSet | None:
        """The cached or published poisons for this key, or None when they would have to be crafted."""
        # keep both: benchmarks read the cache, a fresh machine the published copy
        return stored_poisons([self.poisons_path(setup), self.published_poisons_path(setup)], setup)

    def poisons(self, setup: PoisonSetup, surrogate_models: list[Classifier]) -> PoisonSet:
        """Craft (or load the cached or published) poisons for this key; one process at a time crafts them."""
        path, published = self.poisons_path(setup), self.published_poisons_path(setup)
        with exclusive(path.with_suffix(".lock"), waiting=f"{path.name} is being crafted"):
            return self._stored_or_crafted(setup, surrogate_models, path, published)

    def _stored_or_crafted(
        self, setup: PoisonSetup, surrogate_models: list[Classifier], path: Path, published: Path
    ) -> PoisonSet:
        stored = self.stored_poisons(setup)
        if stored is not None:
            return stored
        partial = path.with_name(path.stem + ".partial.pt")
        poisons = craft(
            self.config.attack,
            surrogate_models,
            self.train,
            self.test.load_image(setup.target_index),
            setup,
            self.config.eps,
            self.craft_config,
            device=self.device,
            amp_dtype=self.amp,
            progress=self.progress,
            checkpoint=partial,
            retrain=self.retrainer(setup),
            proxies=self.proxy_trainer(setup),
        )
        keep_poisons(poisons, [path, published])
        partial.unlink(missing_ok=True)
        return poisons

    def retrainer(self, setup: PoisonSetup):
        """The attacker's re-training during crafting (`retrain_every`)."""
        return surrogate_retrainer(
            self.models, self.train, setup, self.config.eps, self.config.attack, self.config.surrogates
        )

    def proxy_trainer(self, setup: PoisonSetup):
        """The adaptive attacker's imitation of the scan's proxy (`evade_space=proxy`)."""
        options = self.craft_config
        return scan_proxy_trainer(
            self.models, self.train, setup, self.config.eps, self.config.attack, options.evade_seed, options.evade_model
        )

    def data_for(self, arm: str, poisons: PoisonSet | None, setup: PoisonSetup | None = None) -> ArrayDataset:
        return arm_data(self.train, arm, poisons, setup, self.config.eps)

    def filtered(
        self, poisoned: ArrayDataset, arm: str, setup: PoisonSetup, variant: dict[str, Any] | None = None
    ) -> tuple[ArrayDataset, np.ndarray, dict[str, Any], Cost]:
        """What `sanitize scan` (the default, or a baseline's --detector) keeps of the poisoned data, its flags, the
        flags scored against the true poisons, and what the scan cost. Scans are cached per poisoned set; the baselines reuse
        the default scan's proxy (--checkpoint), so their cost is that proxy's training plus their own pass. The
        default detector runs under `variant` (the run's --scan-option unless given)."""
        if arm == SCAN_COMBINED:
            return self._combined(poisoned, setup)
        root = self.scan_dir(poisoned)
        options = {"quiet": True, "device": self.config.device, "precision": self.config.precision}
        detector = SCANNED_ARMS[arm]
        folder = root / "knn_density"
        if variant is None:
            variant = self.config.scan_options if detector == "knn_density" else {}
        rule = rule_changes(variant)
        proxy = {name: value for name, value in variant.items() if name not in option_names("knn_density")}
        if proxy:  # another proxy: its own folder, which a rule change on that proxy reuses
            folder = proxy_variant_folder(root, proxy)
        # a baseline scanned anew needs the default scan's proxy itself, not only its published outcome
        needs_proxy = detector != "knn_density" and not self._scanned(root / detector)
        result, seconds = self._scan_once(poisoned, folder, options | variant, not needs_proxy, rule)
        told = None
        if detector != "knn_density":
            told = told_count(detector, setup)
            result, own = self._scan_once(
                poisoned,
                root / detector,
                options
                | {
                    "detector": detector,
                    "expected_poisons": told,
                    "checkpoint": str(root / "knn_density" / "proxy" / "model.pt"),
                    "model": result.summary["config"]["model"],  # the architecture auto resolved to
                },
            )
            seconds = summed(seconds, own)
        metrics = flag_metrics(result.flags, result.scores, poison_truth(setup, len(result.flags))) | {
            "told_expected_poisons": told,
            "scan_options": recorded_scan_options(result.summary["config"]),
        }
        return poisoned.subset(np.flatnonzero(~result.flags)), result.flags, metrics, seconds

    def _combined(
        self, poisoned: ArrayDataset, setup: PoisonSetup
    ) -> tuple[ArrayDataset, np.ndarray, dict[str, Any], Cost]:
        """The scan-combined arm: the default scan and the run's --scan-option scan as one gate (sanitize combine),
        the union of their flags removed; its cost is both scans'. Rows record the second scan's options."""
        _, first, _, first_cost = self.filtered(poisoned, "scan", setup, variant={})
        _, second, metrics, second_cost = self.filtered(poisoned, "scan", setup)
        union = first | second
        cost = summed(first_cost, second_cost)
        scored = flag_metrics(union, None, poison_truth(setup, len(union))) | {
            "told_expected_poisons": None,
            "scan_options": metrics["scan_options"] | {COMBINED_WITH_DEFAULT: True},
        }
        return poisoned.subset(np.flatnonzero(~union)), union, scored, cost

    def calibration(
        self, poisoned: ArrayDataset, arm: str, setup: PoisonSetup
    ) -> tuple[ArrayDataset, np.ndarray, dict]:
        """A calibration arm's data, its drops and their scores: the perfect filter drops exactly the poisons; the
        random one as many examples as the default scan flags (its scan cached as the scan arm's), drawn by the key."""
        truth = poison_truth(setup, len(poisoned))
        if arm == "perfect-filter":
            dropped = truth
        else:
            count = int(self.filtered(poisoned, "scan", setup)[1].sum())
            dropped = np.zeros(len(poisoned), dtype=bool)
            dropped[np.random.default_rng([setup.key, 31]).choice(len(poisoned), count, replace=False)] = True
        return poisoned.subset(np.flatnonzero(~dropped)), dropped, flag_metrics(dropped, None, truth)

    def defense(self, arm: str, setup: PoisonSetup) -> tuple[str | None, str | None]:
        """What makes a defended arm's rows this arm's under today's defaults and this run's options: (the scan's
        `defense_key`, None but for detector arms; how the victim trains, `training_key`, None but for robust and noise
        arms). A row scanned or trained with other options (an older default, a variant) is another variant of the arm, trained
        again rather than counted as done."""
        scanned = None
        if arm in SCANNED_ARMS:
            detector = SCANNED_ARMS[arm]
            variant = self.config.scan_options if detector == "knn_density" else {}
            told = told_count(detector, setup)
            recorded = default_scan_options(detector, told, self.train.image_size, **variant)
            scanned = defense_key(recorded | ({COMBINED_WITH_DEFAULT: True} if arm == SCAN_COMBINED else {}))
        return scanned, training_key(
            {
                "arm": arm,
                "robust_options": robust_changes(self.models.robust_config),
                "noise_eps": self.config.noise_eps,
            }
        )

    def carriers(self, setup: PoisonSetup, poisoned: ArrayDataset, surrogate: Classifier) -> np.ndarray:
        """Mask over the poisons (in setup order): the carriers, the fewest poisons holding half of the pull on the
        target measured on the surrogate (attacks.carriers). They are what makes the attack work
        (reports/detection-cpu), so defended rows say how many of them each defense caught."""
        images, labels, _ = poisoned.load_batch(np.asarray(setup.poison_indices))
        return pull_carriers(
            poison_pull(surrogate, images, labels, self.test.load_image(setup.target_index), setup.intended_class)
        )

    def scan_dir(self, poisoned: ArrayDataset) -> Path:
        """Where the scans of one poisoned set live (one folder per detector)."""
        return self.cache / f"scan-{stable_hash(poisoned.fingerprint)}"

    def published_scan_path(self, folder: Path, rule: dict[str, Any] | None = None) -> Path:
        """The copy of a scan's outcome beside results.jsonl (OUT/scans/): the defended victims of a scanned set are
        trained on what it kept, and a machine without the cache trains more of them without scanning again. A rule
        variant (`rule`: the rule's options that differ from the default's; it shares the default's proxy folder)
        publishes under its own name, so neither outcome ever stands under the other's."""
        suffix = f"-rule-{stable_hash(rule)}" if rule else ""
        return self.out / "scans" / f"{folder.parent.name}-{folder.name}{suffix}.npz"

    def _scanned(self, folder: Path) -> bool:
        """Whether the scan in `folder` is finished in the cache or published."""
        return (folder / "summary.json").exists() or self.published_scan_path(folder).exists()

    def _scan_once(
        self,
        data: ArrayDataset,
        out: Path,
        options: dict[str, Any],
        use_published: bool = True,
        rule: dict[str, Any] | None = None,
    ) -> tuple[Any, Cost]:
        """(ScanResult, the first run's cost): the published outcome of the same scan of the same data where it is
        current, else the scan (a rerun reuses the finished proxy and embeddings). One process at a time scans a set."""
        with scanning(out):
            return self._stored_or_scanned(data, out, options, use_published, self.published_scan_path(out, rule))

    def _stored_or_scanned(
        self, data: ArrayDataset, out: Path, options: dict[str, Any], use_published: bool, published: Path
    ) -> tuple[Any, Cost]:
        """A current published outcome is the reference: the rows already written trained on its flags, and a proxy
        trained again elsewhere is not bit-identical, so it is used before the cache and never overwritten; a scan
        runs where none is current (or where its proxy itself is needed) and is published where none is."""
        current = current_outcome(published, data, options)
        if use_published and current is not None:
            return current
        started, cpu_started = time.perf_counter(), time.process_time()
        result = scan(data, out, **options)
        cost = out / "cost.json"
        if not cost.exists():
            cpu = time.process_time() - cpu_started if self.device.type == "cpu" else None
            cost.write_text(json.dumps({"seconds": time.perf_counter() - started, "cpu_seconds": cpu}))
        recorded = json.loads(cost.read_text())
        spent = Cost(recorded["seconds"], recorded.get("cpu_seconds"), result.summary["work"]["flops"])
        if current is None and not same_scan_outcome(published, data, result):
            save_scan_outcome(published, data, result, spent)
        return result, spent

    def measure(self, model: Classifier, setup: PoisonSetup) -> dict[str, Any]:
        return measure_victim(model, self.test, setup, self.device, self.amp)

    def done(self) -> dict[tuple, set[tuple[str | None, tuple]]]:
        """Per (attack, eps, budget, key, arm, seed, scale, model, epochs): (the digest of the poisons, the defense) of
        its rows: the digest None for the controls and for rows written before rows named their poisons, the defense
        as `defense` gives it (`attacks.rows.row_defense`)."""
        finished: dict[tuple, set[tuple[str | None, tuple]]] = {}
        for r in read_rows(self.out) if self.results.exists() else []:
            finished.setdefault(victim_identity(r), set()).add((r.get("poisons_sha256"), row_defense(r)))
        return finished

    def plan(
        self, key: int, done: dict[tuple, set[tuple[str | None, tuple]]], digest: str | None, setup: PoisonSetup
    ) -> list[tuple[str, int]]:
        """The (arm, seed) victims still to train for `key` on the poisons named `digest` (None: not crafted yet).

        A row counts when it was trained on these poisons, or on unnamed ones (rows from before rows named their
        poisons), and, for a detector arm, scanned with today's options. A defended arm is measured against the
        undefended victim of the same seed *on the same poisons*, so that twin is planned too when the undefended rows
        of that seed were trained on other poisons."""
        config = self.config

        def trained(arm: str, seed: int, exact: bool = False) -> bool:
            rows = done.get(self.identity(key, arm, seed), set())
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

    def identity(self, key: int, arm: str, seed: int) -> tuple:
        """`victim_identity` of this run's victim of `arm` and `seed` on `key`."""
        config = self.config
        return victim_identity(
            {
                "attack": config.attack,
                "eps": config.eps,
                "budget": config.budget,
                "poison_key": key,
                "arm": arm,
                "victim_seed": seed,
                "scale": config.scale,
                "model": self.scale.model,
                "epochs": self.recipe.epochs,
            }
        )

    def twin_row(self, key: int, seed: int, digest: str, setup: PoisonSetup) -> dict[str, Any] | None:
        """The row of the undefended victim of `key` and `seed` trained on the poisons named `digest` (None: not
        measured yet). A detector that flags nothing leaves that victim's training data as it was, so this row
        measured the detector arm's victim already."""
        wanted, defense = self.identity(key, "undefended", seed), self.defense("undefended", setup)
        for row in read_rows(self.out) if self.results.exists() else []:
            if victim_identity(row) == wanted and row.get("poisons_sha256") == digest and row_defense(row) == defense:
                return row
        return None

    def append(self, row: dict[str, Any]) -> bool:
        """Append `row` to results.jsonl unless the same victim's row (identity, poisons, defense) is there: a shard
        that measured a victim another shard wrote meanwhile adds nothing. Whether it was appended."""
        with exclusive(self.results) as handle:
            if (row.get("poisons_sha256"), row_defense(row)) in self.done().get(victim_identity(row), set()):
                return False
            handle.write(json.dumps(row) + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        return True


def victim_identity(row: dict[str, Any]) -> tuple:
    """What names a row's victim, besides its poisons and defense: (attack, eps, budget, key, arm, seed, scale,
    model, epochs)."""
    return tuple(
        row[name]
        for name in ("attack", "eps", "budget", "poison_key", "arm", "victim_seed", "scale", "model", "epochs")
    )


def trainer_on_poisons(
    models: ModelCache, train: ArrayDataset, setup: PoisonSetup, eps: float, attack: str, tag: str, seeds
):
    """`train(deltas, iteration)`: models of `models`' recipe trained from scratch on the data with these poisons, one
    a seed of `seeds(iteration)`, cached like every model."""

    def train_on(deltas: torch.Tensor, iteration: int) -> list[Classifier]:
        poisoned = arm_data(train, "undefended", PoisonSet(setup, eps, deltas, attack), setup, eps)
        return [models.trained(poisoned, seed, tag)[0] for seed in seeds(iteration)]

    return train_on


def surrogate_retrainer(
    models: ModelCache, train: ArrayDataset, setup: PoisonSetup, eps: float, attack: str, count: int
):
    """`retrain(deltas, iteration)` for `retrain_every`: `count` surrogates of `models`' recipe, with attacker seeds of
    their own."""
    return trainer_on_poisons(
        models, train, setup, eps, attack, "surrogate-retrained",
        lambda iteration: [SURROGATE_SEED + 1000 * iteration + index for index in range(count)],
    )  # fmt: skip


def scan_proxy_trainer(
    models: ModelCache,
    train: ArrayDataset,
    setup: PoisonSetup,
    eps: float,
    attack: str,
    seeds: str = "own",
    model: str = "scan",
):
    """`train(deltas, iteration)` for `evade_space=proxy`: the default scan's recipe and architecture (`model` scan) or
    the one `sanitize scan --model` names (several joined by "+": a proxy of each), with the attacker's own seeds, one
    a refresh (`seeds` own), or every time with the default scan's seed (`scan`)."""
    scan = ScanConfig()

    def seeded(iteration: int) -> list[int]:
        return [scan.seed if seeds == "scan" else EVADE_PROXY_SEED + 1000 * iteration]

    trainers = [
        trainer_on_poisons(
            dataclasses.replace(
                models,
                model=resolve_model_name(scan.model if name == "scan" else name, train.image_size),
                model_kwargs={},
                recipe=scan.train,
            ),
            train,
            setup,
            eps,
            attack,
            "evade-proxy",
            seeded,
        )
        for name in model.split("+")
    ]
    return lambda deltas, iteration: [proxy for trainer in trainers for proxy in trainer(deltas, iteration)]


def arm_data(
    train: ArrayDataset, arm: str, poisons: PoisonSet | None, setup: PoisonSetup | None, eps: float
) -> ArrayDataset:
    """The training set an arm starts from: clean, the random-noise control, or the poisoned set (undefended, and
    every defended arm, which filters it). The control needs only the key's `setup` (its poison positions), so it
    runs without a surrogate or crafted poisons; `setup` defaults to the poisons'."""
    if arm == "clean":
        return train
    setup = setup or poisons.setup
    positions = np.asarray(setup.poison_indices)
    clean = torch.from_numpy(train.images[positions]).permute(0, 3, 1, 2)
    if arm != "random-noise":
        changed = poisons.apply(clean)
    else:  # random signs at full eps on the same images, the control
        generator = torch.Generator().manual_seed(setup.key)
        signs = torch.randint(0, 2, clean.shape, generator=generator).to(torch.int16) * 2 - 1
        changed = (clean.to(torch.int16) + signs * int(math.floor(eps))).clamp(0, 255).to(torch.uint8)
    images = np.array(train.images, copy=True)
    images[positions] = changed.permute(0, 2, 3, 1).numpy()
    return train.with_images(images)


def measure_victim(
    model: Classifier, test: ImageDataset, setup: PoisonSetup, device: torch.device, amp: torch.dtype | None
) -> dict[str, Any]:
    """A victim's prediction on the target, its probability of the intended class (a finer signal than success, which
    is all-or-nothing) and its accuracy on the test set without the target."""
    logits = predict(model, test, np.arange(len(test)), device, amp)
    predictions = logits.argmax(axis=1)
    keep = np.ones(len(test), bool)
    keep[setup.target_index] = False
    probabilities = torch.softmax(torch.as_tensor(logits[setup.target_index], dtype=torch.float32), dim=0)
    return {
        "target_pred": int(predictions[setup.target_index]),
        "p_intended": round(float(probabilities[setup.intended_class]), 4),
        "clean_acc": float((predictions[keep] == test.labels[keep]).mean()),
    }


def summed(first: Cost, second: Cost) -> Cost:
    """Two runs' costs added, each part None where either run lacks it."""
    return Cost(*(None if None in pair else pair[0] + pair[1] for pair in zip(first, second)))


def rule_changes(variant: dict[str, Any]) -> dict[str, Any]:
    """The default detector's rule options in `variant` that differ from its defaults (a variant naming a default
    value is the default's scan)."""
    defaults = dataclasses.asdict(options_class("knn_density")())
    return {name: value for name, value in variant.items() if name in defaults and defaults[name] != value}


def save_scan_outcome(path: Path, data: ArrayDataset, result: ScanResult, cost: Cost) -> None:
    """A scan's flags, scores, summary and first run's cost, losslessly (npz, no pickles), named by its data."""
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays = {
        "fingerprint": np.array(data.fingerprint),
        "flags": np.packbits(result.flags),
        "count": np.array(len(result.flags)),
        "scores": np.asarray(result.scores),
        "summary": np.array(json.dumps(result.summary, default=str)),
        "cost": np.array(json.dumps(cost._asdict())),
    }
    partial = path.with_name(path.stem + ".partial.npz")
    np.savez_compressed(partial, **arrays)
    os.replace(partial, path)


def same_scan_outcome(path: Path, data: ArrayDataset, result: ScanResult) -> bool:
    """Whether `path` already publishes `result`'s flags and scores for `data` (its summary's date and command may
    differ: they name the run that wrote it). Scores match to float32 rounding: the same cached embeddings give
    scores a few 1e-6 apart under another thread count, and that is the same outcome, not a new one to publish."""
    stored = load_scan_outcome(path, data) if path.exists() else None
    return (
        stored is not None
        and np.array_equal(stored[0].flags, result.flags)
        and np.allclose(stored[0].scores, np.asarray(result.scores), rtol=1e-5, atol=1e-4)
    )


def flagged_by(summary: dict[str, Any], options: dict[str, Any]) -> bool:
    """Whether a scan whose summary is `summary` flagged by the rule that `options` give today: its detector and every
    one of the detector's options (a published outcome of a default that has changed since is stale and scanned again)."""
    expected = ScanConfig.from_options(**options).to_dict()
    recorded = summary["config"]
    return recorded["detector"] == expected["detector"] and recorded["options"] == json.loads(
        json.dumps(expected["options"], default=str)
    )


def current_outcome(path: Path, data: ArrayDataset, options: dict[str, Any]) -> tuple[ScanResult, Cost] | None:
    """The outcome published at `path` if it is of exactly `data` and flagged by today's rule under `options`."""
    stored = load_scan_outcome(path, data) if path.exists() else None
    return stored if stored is not None and flagged_by(stored[0].summary, options) else None


def load_scan_outcome(path: Path, data: ArrayDataset) -> tuple[ScanResult, Cost] | None:
    """A published scan outcome of exactly `data` (None for another data set's)."""
    with np.load(path, allow_pickle=False) as stored:
        if str(stored["fingerprint"]) != data.fingerprint:
            return None
        flags = np.unpackbits(stored["flags"], count=int(stored["count"])).astype(bool)
        scores, summary = stored["scores"], json.loads(str(stored["summary"]))
        cost = Cost(**json.loads(str(stored["cost"])))
    result = ScanResult(list(data.ids), list(data.paths), data.labels, scores, flags, summary, files={})
    return result, cost
