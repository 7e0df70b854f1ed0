"""The evaluation: victims trained from scratch on clean, poisoned and control data; one JSON line each.

Follows docs/protocol.md: per poison key a surrogate (pretrained once on the clean data, cached), poisons crafted
against it (cached), and V victims per arm trained from scratch with fresh seeds the attacker never saw. Rows go to
`results.jsonl` as each victim finishes, so a killed run resumes where it stopped and runs accumulate; then
attacks.summary writes summary.json and summary.md.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import numpy as np

from attacks.arms import (
    CALIBRATION_ARMS,
    DETECTOR_ARMS,
    NOISE_ARMS,
    ROBUST_ARMS,
    SCANNED_ARMS,
    UNPOISONED_ARMS,
    removed_metrics,
    scan_share,
    scan_then_robust_removed,
    split_by_carriers,
)
from attacks.base import choose_setup
from attacks.experiment import Harness
from attacks.locks import exclusive
from attacks.rows import robust_changes, run_record
from attacks.scales import EvaluationConfig
from attacks.selection import select_poisons
from attacks.summary import aggregate


def run_evaluation(
    train_path: str | Path,
    test_path: str | Path,
    out: str | Path,
    config: EvaluationConfig,
    progress: bool = True,
    command: str | None = None,
) -> Path:
    """Train and measure every (key, arm, victim) not yet in OUT/results.jsonl; then aggregate. With
    `config.craft_only`, craft the keys' poisons and stop."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    harness = Harness(Path(train_path), Path(test_path), out, config, progress)
    done = harness.done()
    robust_options = robust_changes(harness.models.robust_config)
    surrogate_models = None
    for key in config.keys:
        setup = choose_setup(key, harness.train, harness.test, config.budget)
        if harness.craft_config.selection != "random":  # the poison images depend on the surrogates
            if surrogate_models is None:
                surrogate_models, surrogate_cost = harness.surrogates()
            setup = select_poisons(setup, harness.craft_config.selection, surrogate_models, harness.train)
        stored = harness.stored_poisons(setup)
        if config.craft_only:  # e.g. tuning keys scanned before any victim is spent on them
            if stored is None:
                if surrogate_models is None:
                    surrogate_models, surrogate_cost = harness.surrogates()
                harness.poisons(setup, surrogate_models)
            continue
        todo = harness.plan(key, done, stored.digest() if stored else None, setup)
        if not todo:
            continue
        poisons = None  # the unpoisoned controls need neither surrogate nor poisons
        if any(arm not in UNPOISONED_ARMS for arm, _ in todo):
            if surrogate_models is None:
                surrogate_models, surrogate_cost = harness.surrogates()
            poisons = stored or harness.poisons(setup, surrogate_models)
        carriers = None
        poisoned_fingerprint = harness.data_for("undefended", poisons).fingerprint if poisons is not None else None
        for arm, victim_seed in todo:
            data = harness.data_for(arm, poisons, setup)
            defense = {"dropped_fraction": 0.0, "poison_precision": None, "poison_recall": None, "auroc": None}
            seconds = {"surrogate": None, "crafting": None}
            if poisons is not None:
                seconds = {"surrogate": round(surrogate_cost.wall, 1), "crafting": poisons.metadata.get("seconds")}
            robust = arm in ROBUST_ARMS
            if arm in SCANNED_ARMS or arm in CALIBRATION_ARMS or robust:
                carriers = harness.carriers(setup, data, surrogate_models[0]) if carriers is None else carriers
            if arm in CALIBRATION_ARMS:
                data, dropped, defense = harness.calibration(data, arm, setup)
                defense |= split_by_carriers(dropped, setup, carriers)
            caught = np.zeros(len(data), dtype=bool)
            flops = {}
            if arm in SCANNED_ARMS:
                data, caught, defense, scan_cost = harness.filtered(data, arm, setup)
                defense |= split_by_carriers(caught, setup, carriers)
                seconds |= {"scan": round(scan_cost.wall, 1), "scan_cpu": _rounded(scan_cost.cpu)}
                flops["scan"] = scan_cost.flops
            poisoned = data.fingerprint == poisoned_fingerprint
            twin = None
            if arm in DETECTOR_ARMS and poisoned:  # it flagged nothing: its victim is the undefended twin's
                twin = harness.twin_row(key, victim_seed, poisons.digest(), setup)
            if twin is not None:
                measured = {name: twin[name] for name in ("target_pred", "p_intended", "clean_acc")}
                victim = {
                    "seconds": {name: twin["seconds"].get(name) for name in VICTIM_SECONDS},
                    "flops": twin.get("flops", {}).get("victim_training"),
                    "run": twin.get("run"),
                }
            else:
                tag = victim_tag(arm, poisoned)
                model, victim_cost = harness.models_for(arm).trained(data, victim_seed, tag, robust)
                if robust:  # what robust training dropped, added to what the scan flagged
                    drop_log = harness.models.path(data, victim_seed, tag, robust).with_suffix(".drop_log.json")
                    removed = scan_then_robust_removed(caught, drop_log)
                    scanned = scan_share(defense) if arm in SCANNED_ARMS else {}
                    defense |= removed_metrics(removed, setup, carriers) | scanned
                started = time.perf_counter()
                measured = harness.measure(model, setup)
                victim = {
                    "seconds": {
                        "victim_training": round(victim_cost.wall, 1),
                        "victim_training_cpu": _rounded(victim_cost.cpu),
                        "measure": round(time.perf_counter() - started, 1),
                    },
                    "flops": victim_cost.flops,
                    "run": run_record(harness.device, harness.amp),
                }
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
                    **({"robust_options": robust_options} if robust and robust_options else {}),
                    **({"noise_eps": config.noise_eps} if arm in NOISE_ARMS else {}),
                    "poisons_sha256": poisons.digest() if poisons is not None and arm not in UNPOISONED_ARMS else None,
                    "model": harness.scale.model,
                    "train_size": len(harness.train),
                    "epochs": harness.recipe.epochs,
                    "augment": harness.recipe.augment,
                    "craft_config": dataclasses.asdict(harness.craft_config) if arm not in UNPOISONED_ARMS else None,
                    "surrogates": config.surrogates if arm not in UNPOISONED_ARMS else None,
                    "seconds": seconds | victim["seconds"],
                    "flops": flops | {"victim_training": victim["flops"]},
                    "run": victim["run"],
                    **({"victim_of": "undefended"} if twin is not None else {}),
                    "craft_final_loss": min(poisons.metadata.get("final_loss_per_restart", [float("nan")]))
                    if poisons
                    else None,
                }
            )
            _aggregate(harness, command)  # after every victim: the summary always matches the rows, mid-run too
    if not config.craft_only:
        _aggregate(harness, command)
    return out


def _aggregate(harness: Harness, command: str | None) -> None:
    """The summaries of the rows, written by one shard at a time (they read the results file others append to)."""
    with exclusive(harness.results):
        aggregate(harness.out, command)


VICTIM_SECONDS = ("victim_training", "victim_training_cpu", "measure")  # a row's seconds that are its victim's


def victim_tag(arm: str, poisoned: bool) -> str:
    """The cache tag of an arm's victims; `poisoned`: its data is the poisoned set itself. A scan that flagged nothing
    leaves the poisoned data, and the victim trained on it (cached; or its row, `Harness.twin_row`) is this arm's."""
    if arm in SCANNED_ARMS and poisoned:
        return f"victim-{'robust' if arm in ROBUST_ARMS else 'undefended'}"
    return f"victim-{arm}"


def _rounded(value: float | None) -> float | None:
    return None if value is None else round(value, 1)
