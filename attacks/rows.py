"""Rows of results.jsonl: reading them, and reading rows written by older versions the way they were meant, in one
place. A detector arm's row records the scan options that made its flags (`recorded_scan_options`); rows scanned under
another default than today's, and robust arms' rows trained with other settings (`robust_options`), are another
variant of their arm (`defense_variant`), never mixed with today's. Rows
whose poisons were crafted with other options than their scale's (the adaptive attacker's weights, an ensemble) are
another variant of the attack (`attack_variant`), whatever their arm."""

from __future__ import annotations

import dataclasses
import datetime
import json
from pathlib import Path
from typing import Any

import torch

from attacks.arms import NOISE_ARMS, ROBUST_ARMS, SCANNED_ARMS
from attacks.registry import attack_options
from attacks.scales import SCALES
from sanitize.config import PAPER_NOISE_EPS, RobustConfig, ScanConfig
from sanitize.detectors.epic import EpicOptions
from sanitize.detectors.knn_density import KnnDensityOptions
from sanitize.errors import SanitizeError
from sanitize.models import resolve_model_name
from sanitize.training import device_record

KNN_DENSITY_OPTIONS = tuple(f.name for f in dataclasses.fields(KnnDensityOptions))
# options recorded only since they were added (alarm_confidence: 2026-11; the alarm's test and group: 2026-12-01;
# the label check, which acts only with proxy folds or a held-out checkpoint: 2026-12-02; its rule: 2026-12-04), with
# the value that reproduces older rows
BEFORE_RECORDED = {
    "alarm_confidence": 0.0,
    "alarm_test": "poisson",
    "alarm_group_fraction": 0.0,
    "label_check": True,
    "label_rule": "confident",
    "closed_group_conductance": 0.0,  # the closed-group pass, off until 2026-12-05
    "closed_group_min_fraction": 0.01,
    "closed_group_max_fraction": 0.2,
    "closed_group_min_class": 1000,
    "closed_group_second_pass": False,  # added 2026-12-06
}
# the proxy, recorded only when not auto until 2026-12-02 (since then always, as the architecture auto resolved to):
# auto meant the ConvNet for the small images every evaluation uses
PROXY_BEFORE_RECORDED = "convnet"
# what a detector arm's row records of the scan that made its flags, so rows stay readable when the defaults move
SCAN_OPTIONS_RECORDED = ("detector", *KNN_DENSITY_OPTIONS, "epic_fraction", "expected_poisons")
RECORDED_DEFAULTS = (
    dataclasses.asdict(KnnDensityOptions()) | dataclasses.asdict(EpicOptions()) | {"expected_poisons": None}
)
REQUIRED = {
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
}


def run_record(device: torch.device, amp_dtype: torch.dtype | None) -> dict[str, Any]:
    """Where and how the process that writes a row ran (its victim trained there unless it was cached): the precision
    `auto` resolved to differs between machines (bf16 only where the hardware runs it natively), so rows that pair
    victims across machines can say so. Rows written before 2026-12-04 17:30 UTC lack it."""
    return {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")} | device_record(
        device, amp_dtype
    )


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
        missing = REQUIRED - set(row)
        if missing:
            raise SanitizeError(f"{path}:{number} lacks {', '.join(sorted(missing))}")
        rows.append(row)
    return rows


def recorded_scan_options(settings: dict[str, Any]) -> dict[str, Any]:
    """What a detector arm's row records of the scan (a ScanConfig as a dict) that made its flags: flat, the detector's
    own options and, for the names it does not have, the other detectors' defaults (the rows' format since before
    detectors owned their options, so every row compares with every other)."""
    detector_options = settings["options"] or {}
    flat = {"detector": settings["detector"]} | {
        name: detector_options.get(name, RECORDED_DEFAULTS[name]) for name in SCAN_OPTIONS_RECORDED[1:]
    }
    # folds, a schedule other than step decay, a seed other than 0 and a held-out checkpoint recorded only when used;
    # the proxy's architecture always (auto is resolved by the scan, and rows from before that lack it:
    # PROXY_BEFORE_RECORDED)
    folds, model, seed = settings.get("proxy_folds", 0), settings.get("model", "auto"), settings.get("seed", 0)
    schedule = settings["train"].get("schedule", "step")
    return (
        flat
        | {"proxy_epochs": settings["train"]["epochs"]}
        | ({"proxy_folds": folds} if folds else {})
        | ({"proxy_model": model} if model != "auto" else {})
        | ({"proxy_schedule": schedule} if schedule != "step" else {})
        | ({"proxy_seed": seed} if seed != 0 else {})
        | ({"held_out_checkpoint": True} if settings.get("held_out_checkpoint") else {})
    )


def default_scan_options(
    detector: str, told: int | None, image_size: tuple[int, int] = (32, 32), **options: Any
) -> dict[str, Any]:
    """What a row of `detector`'s arm records when images of `image_size` (the evaluations' are 32 px) are scanned
    with today's defaults and `options` (told `told`); a baseline gets the default scan's proxy."""
    model = resolve_model_name(options.pop("model", "auto"), image_size)
    config = ScanConfig.from_options(detector=detector, expected_poisons=told, model=model, **options)
    return recorded_scan_options(config.to_dict())


def defense_options(scan_options: dict[str, Any]) -> dict[str, Any]:
    """The recorded options that decide a detector's flags: every one for the default scan; for a baseline, all but
    knn_density's own (a baseline row stays current when only the default detector's settings move)."""
    scan_options = {"proxy_model": PROXY_BEFORE_RECORDED} | scan_options
    if scan_options["detector"] == "knn_density":
        return scan_options | {name: value for name, value in BEFORE_RECORDED.items() if name not in scan_options}
    return {name: value for name, value in scan_options.items() if name not in KNN_DENSITY_OPTIONS}


def defense_key(scan_options: dict[str, Any] | None) -> str:
    """A detector arm's defense as one comparable string ("unrecorded" for a row that kept no scan options)."""
    return "unrecorded" if scan_options is None else json.dumps(defense_options(scan_options), sort_keys=True)


def robust_changes(config: RobustConfig) -> dict[str, Any]:
    """Robust training's settings that differ from `sanitize train --robust`'s defaults: what a robust arm's row
    records (`robust_options`, only when there are any: a row without them trained with the defaults)."""
    default = dataclasses.asdict(RobustConfig())
    return {name: value for name, value in dataclasses.asdict(config).items() if default[name] != value}


def robust_key(changes: dict[str, Any] | None) -> str:
    """A robust arm's training settings as one comparable string (the defaults for rows that record none)."""
    return json.dumps(changes or {}, sort_keys=True)


def noise_key(noise_eps: float) -> str:
    """A noise arm's training noise as one comparable string."""
    return json.dumps({"noise_eps": float(noise_eps)})


def training_key(row: dict[str, Any]) -> str | None:
    """How a defended arm's victim trained, where the arm changes it: robust training's settings for robust arms, the
    noise for noise arms; None for the other arms."""
    if row["arm"] in ROBUST_ARMS:
        return robust_key(row.get("robust_options"))
    return noise_key(row["noise_eps"]) if row["arm"] in NOISE_ARMS else None


def row_defense(row: dict[str, Any]) -> tuple[str | None, str | None]:
    """A row's defense as `Harness.defense` names an arm's: the scan's key for detector arms, and how the victim
    trained (`training_key`), None for what the arm does not have."""
    scanned = defense_key(row.get("scan_options")) if row["arm"] in SCANNED_ARMS else None
    return scanned, training_key(row)


def attack_changes(row: dict[str, Any]) -> dict[str, Any]:
    """How a row's poisons were crafted, as the options that differ from its scale's defaults for its attack (the
    attack's own defaults in the transfer setting; none for rows without poisons and for rows of other settings). An
    option a row does not record (older rows) took its default."""
    crafted = row.get("craft_config")
    # the transfer setting's black-box poisons, crafted against substitutes instead of the victims' extractor
    against = {"substitutes": ",".join(row["substitutes"])} if crafted and row.get("substitutes") else {}
    if not crafted:
        return against
    if row["scale"] in SCALES:
        effort = SCALES[row["scale"]].effort(row["attack"])
    elif row["scale"].startswith("transfer-"):  # the transfer setting crafts at the attack's own defaults
        effort = {}
    else:
        return against
    default = json.loads(json.dumps(dataclasses.asdict(attack_options(row["attack"], **effort))))
    changed = {name: value for name, value in crafted.items() if name in default and default[name] != value}
    return changed | ({"surrogates": row["surrogates"]} if row.get("surrogates") not in (None, 1) else {}) | against


def attack_variant(row: dict[str, Any], leaving_out: tuple[str, ...] = ()) -> str:
    """`attack_changes` as text ("" when none), so that aggregate keeps each weight of the adaptive attacker, say,
    apart; without the options named in `leaving_out`."""
    return ", ".join(f"{name}={value}" for name, value in attack_changes(row).items() if name not in leaving_out)


def variant(row: dict[str, Any]) -> str:
    """A row's variant of its arm: how its poisons were crafted, then how it was scanned, where either differs from
    today's defaults ("" when neither does)."""
    return "; ".join(part for part in (attack_variant(row), defense_variant(row)) if part)


def defense_variant(row: dict[str, Any]) -> str:
    """How a defended arm's row was scanned and robustly trained, as the options that differ from today's defaults
    ("" when none do, and for the other arms; robust training's prefixed `robust `), so that aggregate keeps rows
    scanned under an older default, or trained with another cap, apart from the current arm."""
    robust = [f"robust {name}={value}" for name, value in (row.get("robust_options") or {}).items()]
    if row["arm"] in NOISE_ARMS and row["noise_eps"] != PAPER_NOISE_EPS:
        robust.append(f"noise_eps={row['noise_eps']:g}")
    if row["arm"] not in SCANNED_ARMS:
        return ", ".join(robust)
    recorded = row.get("scan_options")
    if recorded is None:
        return ", ".join(["scan options not recorded", *robust])
    current = defense_options(default_scan_options(recorded["detector"], recorded["expected_poisons"]))
    changed = [f"{name}={value}" for name, value in defense_options(recorded).items() if current.get(name) != value]
    return ", ".join(changed + robust)
