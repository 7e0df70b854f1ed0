"""Detection of real poisons by every detector and knn_density variant, without training victims.

    python benchmarks/detection_sweep.py --cache work-data/cache-cpu --keys 0,1 [--model NAME] [--eps 16] \
        [--attack NAME] [--craft-option NAME=VALUE ...] [--results reports/EVALUATION] --out reports/...

For each key whose poisons are cached: the default `sanitize scan` of the poisoned set (the same cached scan the
evaluation's `scan` arm uses), then, on its proxy's embeddings, every baseline detector and knn_density in each
embedding space and at several neighbourhood sizes (below and above the poison group, docs/protocol.md's design note).
With --proxy-epochs, proxies trained for other lengths are scanned too, and with --proxy-sides proxies that see
the images resized (the trade-off of a proxy trained at reduced resolution on large images), and with
--proxy-schedules proxies trained with another learning-rate schedule (onecycle), and with --proxy-progressive
proxies trained with progressive resizing (their first epochs at a reduced side, the last at the images' own), and
with --proxy-seeds proxies trained with other seeds (a seed an attacker who imitates the scan did not train with). Reports flagged fraction, precision, recall
and AUROC against the true poisons (knn_density also at z cut-offs 2.5 and 3.0 besides its default 3.5), and which
poisons were caught: each poison's pull on the target (its gradient on the clean surrogate projected on the target's
adversarial gradient, the quantity crafting raises) picks the carriers, the fewest poisons holding half the total
pull; rows give recall among carriers and among the rest, and the rank correlation of score with pull. Appends one JSON line per (key, proxy, variant) to
OUT/detection.jsonl and rewrites OUT/detection.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
from PIL import Image
from scipy.stats import spearmanr

from attacks import choose_setup
from attacks.arms import poison_truth, split_by_carriers, told_count
from attacks.carriers import poison_pull, pull_carriers
from attacks.experiment import Harness, proxy_variant_folder, scanning
from attacks.registry import parse_option
from attacks.scales import GRADIENT_MATCHING, EvaluationConfig
from sanitize import scan
from sanitize.config import ScanConfig
from sanitize.data.arrays import ArrayDataset, from_arrays
from sanitize.data.encoded import fit_to_size
from sanitize.density import knn, z_to_score
from sanitize.detectors import run_detector
from sanitize.detectors.knn_density import KnnDensityOptions
from sanitize.embeddings import load_embeddings
from sanitize.manifest import flag_metrics
from sanitize.models import default_model_name, resolve_model_name
from sanitize.scanner import scan_work
from sanitize.work import trained_examples

# knn_density's first default (issue 3): mean distance, large scale 20% of the class (at most 256), nothing else
FIRST_DEFAULT = {"distance": "mean", "k_fraction": 0.2, "k_max": 256, "low_loss_weight": 0.0, "class_alarm_p": 0.0}
UNSTATED = {
    "alarm_rule": "hard",
    "alarm_confidence": 0.0,
    "closed_group_conductance": 0.0,
    "closed_group_second_pass": False,
}  # what a knn_density variant leaves unstated means what it meant when the variant was written
WIDE = {"distance": "kth", "k_fraction": 0.5, "k_max": 1000}
CLUMP_K = 10  # neighbours of the clump diagnostic (poison_neighbour_share): the default scan's k_small
AT_Z = (2.5, 3.0)  # lower cut-offs than the default's z 3.5, reported beside it
# the default from 2026-12-01 (negative-binomial alarm) to the closed-group pass (2026-12-05)
NEGATIVE_BINOMIAL_ALARM = (
    FIRST_DEFAULT
    | WIDE
    | {
        "low_loss_weight": 1.0,
        "class_alarm_p": 0.03,
        "alarm_rule": "either",
        "alarm_confidence": 0.5,
    }
)
CURRENT = NEGATIVE_BINOMIAL_ALARM | {"closed_group_conductance": 0.105}  # with the closed-group pass
# today's default, the one before it, and what a 50,000-image set might want beside that (built on it as written)
CURRENT_VARIANTS = [
    ("knn_density", CURRENT),
    # the candidate of 2026-12-05 23:15 UTC, not chosen (reports/adaptive-attack): the closed-group alarm triggers
    # the second pass
    ("knn_density", CURRENT | {"closed_group_second_pass": True}),
    ("knn_density", NEGATIVE_BINOMIAL_ALARM),
    ("knn_density", NEGATIVE_BINOMIAL_ALARM | {"embedding": "gradient"}),
    ("knn_density", NEGATIVE_BINOMIAL_ALARM | {"embedding": "logit_gradient"}),
    ("knn_density", NEGATIVE_BINOMIAL_ALARM | {"k_max": 2500}),
    ("knn_density", NEGATIVE_BINOMIAL_ALARM | {"k_small": 50}),
    ("knn_density", NEGATIVE_BINOMIAL_ALARM | {"class_alarm_p": 0.3}),
    ("knn_density", NEGATIVE_BINOMIAL_ALARM | {"alarm_z": 1.0}),
]
VARIANTS = [  # options are given in full against the first default, so rows stay readable when defaults move
    ("knn_density", FIRST_DEFAULT),
    ("knn_density", FIRST_DEFAULT | {"embedding": "gradient"}),
    ("knn_density", FIRST_DEFAULT | {"embedding": "logit_gradient"}),
    ("knn_density", FIRST_DEFAULT | {"k_fraction": 0.05}),
    ("knn_density", FIRST_DEFAULT | {"k_fraction": 0.5, "k_max": 1000}),
    ("knn_density", FIRST_DEFAULT | {"distance": "kth"}),
    ("knn_density", FIRST_DEFAULT | WIDE),
    ("knn_density", FIRST_DEFAULT | {"low_loss_weight": 1.0}),
    ("knn_density", FIRST_DEFAULT | WIDE | {"low_loss_weight": 1.0}),
    ("knn_density", FIRST_DEFAULT | WIDE | {"class_alarm_p": 1e-6}),
    (
        "knn_density",
        FIRST_DEFAULT | WIDE | {"low_loss_weight": 1.0, "class_alarm_p": 1e-6},
    ),  # the default since issue 4
    ("knn_density", FIRST_DEFAULT | WIDE | {"low_loss_weight": 1.0, "class_alarm_p": 1e-6, "alarm_z": 1.0}),
    ("knn_density", FIRST_DEFAULT | WIDE | {"low_loss_weight": 1.0, "class_alarm_p": 1e-6, "alarm_z": 2.0}),
    (
        "knn_density",
        FIRST_DEFAULT | WIDE | {"low_loss_weight": 1.0, "class_alarm_p": 1e-4},
    ),  # a looser alarm, for eps 8
    # the second pass by the proxy's class assignment (alarm_rule), for eps 8's carriers past the boundary
    ("knn_density", FIRST_DEFAULT | WIDE | {"low_loss_weight": 1.0, "class_alarm_p": 1e-6, "alarm_rule": "either"}),
    (
        "knn_density",
        FIRST_DEFAULT | WIDE | {"low_loss_weight": 1.0, "class_alarm_p": 1e-4, "alarm_rule": "misassigned"},
    ),
    ("knn_density", FIRST_DEFAULT | WIDE | {"low_loss_weight": 1.0, "class_alarm_p": 1e-4, "alarm_rule": "either"}),
    # misassigned only with conviction (the proxy gives the other class >= p): the carriers, fewer clean boundary examples
    (
        "knn_density",
        FIRST_DEFAULT
        | WIDE
        | {"low_loss_weight": 1.0, "class_alarm_p": 1e-4, "alarm_rule": "either", "alarm_confidence": 0.5},
    ),
    (
        "knn_density",
        FIRST_DEFAULT
        | WIDE
        | {"low_loss_weight": 1.0, "class_alarm_p": 1e-4, "alarm_rule": "either", "alarm_confidence": 0.6},
    ),
    *CURRENT_VARIANTS,
    ("epic", {}),
    ("deep_knn", {}),
    ("spectral_signatures", {}),
    ("activation_clustering", {}),
]


def swept(args) -> list[tuple[str, dict]]:
    """The variants a run sweeps: all, or today's default with the variants built on it and the baselines (a
    50,000-image class takes about a minute per variant on one thread)."""
    if args.variants == "all":
        return VARIANTS
    return [("knn_density", FIRST_DEFAULT), *CURRENT_VARIANTS, *[(d, o) for d, o in VARIANTS if d != "knn_density"]]


def variant_config(detector: str, options: dict, told: int | None = None) -> ScanConfig:
    """The scan settings of one swept variant; knn_density's unstated options keep the meaning they had when written."""
    stated = UNSTATED | options if detector == "knn_density" else options
    return ScanConfig.from_options(detector=detector, expected_poisons=told, **stated)


def poison_pulls(harness: Harness, setup, poisoned) -> np.ndarray:
    """Each poison's pull on the target (attacks.gradient_matching.poison_pull) on the clean surrogate."""
    (surrogate, *_), _ = harness.surrogates()
    images, labels, _ = poisoned.load_batch(np.asarray(setup.poison_indices))
    return poison_pull(surrogate, images, labels, harness.test.load_image(setup.target_index), setup.intended_class)


def caught_by_pull(flags: np.ndarray, scores: np.ndarray, pull: np.ndarray, carriers: np.ndarray, setup) -> dict:
    """Recall among the carriers (the fewest poisons holding half the pull) and among the rest; rank correlation."""
    split = split_by_carriers(flags, setup, carriers)
    return {
        "carriers": split["carriers"],
        "recall_carriers": split["carrier_recall"],
        "recall_rest": split["rest_recall"],
        "score_pull_spearman": float(spearmanr(scores[np.asarray(setup.poison_indices)], pull).statistic),
    }


def downsampled(data: ArrayDataset, side: int) -> ArrayDataset:
    """`data` as a folder scanned with `--image-size side` sees it: each image's shorter side resized to `side` and
    centre-cropped (the product's own fit_to_size, bilinear)."""
    images = np.stack(
        [
            np.asarray(fit_to_size(Image.fromarray(data.load_image(i).permute(1, 2, 0).numpy()), (side, side)))
            for i in range(len(data))
        ]
    )
    return from_arrays(images, data.labels, data.classes, f"{data.source} at {side} px", ids=list(data.ids))


class Proxy(NamedTuple):
    """A proxy the sweep scans with: its model, epochs, the side it sees the images at (None: their own), its
    learning-rate schedule and its progressive resizing ((side, epochs) of its reduced first epochs; None: off)."""

    model: str
    epochs: int
    side: int | None
    schedule: str
    reduced: tuple[int, int] | None = None
    seed: int = 0


def proxy_changes(data, proxy: Proxy) -> dict[str, Any]:
    """The scan options by which `proxy` differs from the default scan's, as the evaluation's --scan-option names them
    (its side is not one: a set resized is other data)."""
    default = ScanConfig()
    changes: dict[str, Any] = {}
    if proxy.model != default_model_name(data.image_size):
        changes["model"] = proxy.model
    if proxy.epochs != default.train.epochs:
        changes["epochs"] = proxy.epochs
    if proxy.schedule != default.train.schedule:
        changes["schedule"] = proxy.schedule
    if proxy.reduced is not None:
        changes |= {"reduced_side": proxy.reduced[0], "reduced_epochs": proxy.reduced[1]}
    if proxy.seed != default.seed:
        changes["seed"] = proxy.seed
    return changes


def proxy_scan_dir(harness: Harness, data, proxy: Proxy) -> Path:
    """The scan of `data` with a proxy: the evaluation's folder for the same proxy (the default scan's, or its
    --scan-option variant's), so each proxy of a set is trained once and both read the same flags."""
    changes, side = proxy_changes(data, proxy), proxy.side
    root = harness.scan_dir(data)
    scan_dir = proxy_variant_folder(root, changes) if changes else root / "knn_density"
    if side is not None:
        scan_dir = scan_dir.with_name(f"{scan_dir.name}-side{side}")
        if (scan_dir / "summary.json").exists():
            return scan_dir  # finished: its embeddings are read back without resizing the set again
        data = downsampled(data, side)
    # the evaluation's lock on the same folder: a sweep and an evaluation that scan one set take turns, and the
    # second reuses the first one's proxy and embeddings (scan's own lock would refuse it instead)
    with scanning(scan_dir):
        scan(  # the model named: a set resized below 64 px would otherwise resolve `auto` to another architecture
            data,
            scan_dir,
            **changes | {"model": proxy.model},
            quiet=True,
            device=harness.config.device,
            precision=harness.config.precision,
        )
    return scan_dir


def proxies(args, harness: Harness) -> list[Proxy]:
    """Every proxy the sweep scans with; auto is the architecture the scan resolves it to."""
    models = [resolve_model_name(m, harness.train.image_size) for m in args.proxy_models.split(",")]
    sides = [None if s == "native" else int(s) for s in args.proxy_sides.split(",")]
    progressive = [
        None if p == "off" else tuple(int(part) for part in p.split(":")) for p in args.proxy_progressive.split(",")
    ]
    return [
        Proxy(m, int(e), side, schedule, reduced, int(seed))
        for m in models
        for e in args.proxy_epochs.split(",")
        for side in sides
        for schedule in args.proxy_schedules.split(",")
        for reduced in progressive
        for seed in args.proxy_seeds.split(",")
    ]


def proxy_identity(proxy: Proxy) -> dict:
    """Rows name the proxy's epochs, its model unless it is the ConvNet (the default proxy of every row that names
    none: rows from before 2026-12-02 named only other proxies), its side unless it is the data's own, its
    schedule unless it is step decay (rows from before 2026-12-03), its progressive resizing when on and its seed
    unless it is the default's."""
    return (
        {"proxy_epochs": proxy.epochs}
        | ({"proxy_model": proxy.model} if proxy.model != "convnet" else {})
        | ({"proxy_side": proxy.side} if proxy.side is not None else {})
        | ({"proxy_schedule": proxy.schedule} if proxy.schedule != "step" else {})
        | ({"proxy_reduced": list(proxy.reduced)} if proxy.reduced is not None else {})
        | ({"proxy_seed": proxy.seed} if proxy.seed != ScanConfig().seed else {})
    )


def done_rows(rows_path: Path) -> set[str]:
    """The (key, eps, model, epochs, proxy, detector, options) of every row already written: a rerun adds only new ones."""
    if not rows_path.exists():
        return set()
    return {row_identity(r) for r in map(json.loads, rows_path.read_text().splitlines())}


def row_identity(row: dict) -> str:
    """Rows written before 2026-11-23 06:00 do not name their poisons (None): they were the poisons cached then."""
    return json.dumps(
        [
            row["key"],
            row["eps"],
            row["model"],
            row["epochs"],
            row["proxy_epochs"],
            row.get("proxy_model"),
            row.get("proxy_side"),
            row.get("proxy_schedule"),
            row.get("proxy_reduced"),
            row.get("proxy_seed"),
            row["detector"],
            row["options"],
            row.get("poisons_sha256"),
        ],
        sort_keys=True,
    )


def alarm_p_values(detection, intended: int | None) -> dict | None:
    """The class alarm's p-values (alarmed_class_flags): the intended class's and the smallest of the others (the
    margin a looser alarm has before it fires on a clean class); None for a variant without the alarm."""
    p_values = {
        c: info["alarm_p_value"] for c, info in detection.summary["per_class"].items() if "alarm_p_value" in info
    }
    if not p_values:
        return None
    others = [p for c, p in p_values.items() if c != intended]
    return {"intended": p_values.get(intended), "min_other": min(others)}


def poison_neighbour_share(space: np.ndarray, labels: np.ndarray, truth: np.ndarray, k: int = CLUMP_K) -> dict:
    """How clumped the poisons are in an embedding space: the mean share of poisons among the k nearest neighbours
    of poisons and of clean examples, within the classes that hold poisons, beside the poisons' share there (what an
    unclumped set would give). The adaptive attacker's clump term (attacks.adaptive) raises the first."""
    classes = np.unique(labels[truth])
    within = np.isin(labels, classes)
    shares = np.zeros(len(labels))
    for c in classes:
        rows = np.flatnonzero(labels == c)
        _, neighbours = knn(space[rows], k)
        shares[rows] = truth[rows][neighbours].mean(axis=1)
    return share_summary(shares, truth, within, k)


def share_summary(shares: np.ndarray, truth: np.ndarray, within: np.ndarray, k: int) -> dict:
    """The mean share of poisons among the k nearest neighbours (`shares`, per example) of the poisons and of the
    clean examples `within` the classes that hold poisons, beside the poisons' share there."""
    return {
        "k": k,
        "poisons": float(shares[truth].mean()),
        "clean": float(shares[within & ~truth].mean()),
        "base": float(truth[within].mean()),
    }


def append_row(rows_path: Path, row: dict) -> None:
    with rows_path.open("a") as handle:
        handle.write(json.dumps(row) + "\n")
    print(json.dumps(row))


def clean_rows(harness: Harness, args, rows_path: Path) -> None:
    """What every knn_density variant flags on the clean subset (false positives, false class alarms)."""
    done = done_rows(rows_path)
    for proxy in proxies(args, harness):
        embeddings = None
        for detector, options in swept(args):
            identity = {
                "key": "clean",
                "eps": None,
                "model": harness.scale.model,
                "epochs": harness.recipe.epochs,
                **proxy_identity(proxy),
                "detector": detector,
                "options": options,
            }
            if detector != "knn_density" or row_identity(identity) in done:
                continue
            if embeddings is None:
                embeddings = load_embeddings(
                    proxy_scan_dir(harness, harness.train, proxy) / "embeddings", harness.train.labels
                )
            config = variant_config(detector, options)
            detection = run_detector(detector, embeddings, config.options, config.context(False))
            alarmed = [c for c, info in detection.summary["per_class"].items() if info.get("alarmed")]
            append_row(
                rows_path,
                identity
                | {
                    "told_expected_poisons": None,
                    "dropped_fraction": float(detection.flags.mean()),
                    "dropped_at_z": {str(z): float((detection.scores >= z_to_score(np.array(z))).mean()) for z in AT_Z},
                    "alarmed_classes": alarmed,
                    "alarm_p": alarm_p_values(detection, None),
                    "proxy_accuracy": embeddings.accuracy(),
                },
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shared", type=Path, default=Path("../shared"))
    parser.add_argument("--cache", type=Path, required=True)
    parser.add_argument(
        "--results",
        type=Path,
        default=None,
        help="The evaluation folder of the keys (its OUT): their published poisons are read from it and the default "
        "scan's outcome published into it, so that the evaluation's victims on a machine without the cache reuse it.",
    )
    parser.add_argument("--keys", default="0")
    parser.add_argument("--model", default=None)
    parser.add_argument("--epochs", type=int, default=None)
    parser.add_argument("--eps", type=float, default=16.0)
    parser.add_argument("--attack", default=GRADIENT_MATCHING, help="The attack whose cached poisons are swept.")
    parser.add_argument(
        "--craft-option",
        action="append",
        default=[],
        help="NAME=VALUE, as the evaluation's --craft-option: the poisons crafted with it (e.g. the adaptive attacker's).",
    )
    parser.add_argument(
        "--proxy-epochs",
        default=str(ScanConfig().train.epochs),
        help="Comma-separated proxy lengths; the default scan's comes from the cache.",
    )
    parser.add_argument(
        "--proxy-models",
        default=ScanConfig().model,
        help="Comma-separated proxy models (the registry's names); every one is trained for every --proxy-epochs.",
    )
    parser.add_argument(
        "--proxy-sides",
        default="native",
        help="Comma-separated sides the proxy sees the images at (native: their own), as with a folder's --image-size.",
    )
    parser.add_argument(
        "--proxy-schedules",
        default=ScanConfig().train.schedule,
        help="Comma-separated learning-rate schedules of the proxies (sanitize scan --schedule: step, onecycle).",
    )
    parser.add_argument(
        "--proxy-progressive",
        default="off",
        help="Comma-separated progressive resizing of the proxies: off, or SIDE:EPOCHS (the first EPOCHS at SIDE px).",
    )
    parser.add_argument(
        "--proxy-seeds",
        default=str(ScanConfig().seed),
        help="Comma-separated seeds of the proxies (sanitize scan --seed): what the gate sees with a seed the attacker "
        "did not train with.",
    )
    parser.add_argument(
        "--clean", action="store_true", help="Also scan the clean subset: what each variant flags without poisons."
    )
    parser.add_argument(
        "--variants",
        default="all",
        choices=["all", "current"],
        help="current: today's default, the variants built on it, the first default and the baselines.",
    )
    parser.add_argument("--scale", default="cpu", choices=["cpu", "full"], help="The evaluation scale of the keys.")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    published = args.results or args.cache  # where published poisons and scan outcomes are read and added
    harness = keys_harness(args, published, model=args.model, epochs=args.epochs)
    args.out.mkdir(parents=True, exist_ok=True)
    rows_path = args.out / "detection.jsonl"
    if args.clean:
        clean_rows(harness, args, rows_path)
    swept_proxies = proxies(args, harness)
    for key, setup, poisons, poisoned in poisoned_keys(harness, args.keys):
        done = done_rows(rows_path)  # read per key: another sweep may have written this key's rows meanwhile
        if any(proxy.side is None for proxy in swept_proxies):
            harness.filtered(poisoned, "scan", setup)  # the default scan: proxy + embeddings, cached
        pull = poison_pulls(harness, setup, poisoned)
        carriers = pull_carriers(pull)
        for proxy in swept_proxies:
            embeddings = load_embeddings(proxy_scan_dir(harness, poisoned, proxy) / "embeddings", poisoned.labels)
            shares = {}  # per embedding space
            for detector, options in swept(args):
                identity = {
                    "key": key,
                    "eps": args.eps,
                    "model": harness.scale.model,
                    "epochs": harness.recipe.epochs,
                    **proxy_identity(proxy),
                    "detector": detector,
                    "options": options,
                    "poisons_sha256": poisons.digest(),
                }
                if row_identity(identity) in done:
                    continue
                told = told_count(detector, setup)
                scan_config = variant_config(detector, options, told)
                detection = run_detector(detector, embeddings, scan_config.options, scan_config.context(False))
                poison_scores = detection.scores[list(setup.poison_indices)]
                truth = poison_truth(setup, len(detection.flags))
                row = identity | {
                    "told_expected_poisons": told,
                    **flag_metrics(detection.flags, detection.scores, truth),
                    "poison_score_median": float(np.median(poison_scores)),
                    **caught_by_pull(detection.flags, detection.scores, pull, carriers, setup),
                    "proxy_accuracy": embeddings.accuracy(),
                }
                if detector == "knn_density":
                    row["at_z"] = {}
                    for z in AT_Z:
                        flags = detection.scores >= z_to_score(np.array(z))
                        row["at_z"][str(z)] = flag_metrics(flags, detection.scores, truth) | {
                            "recall_carriers": split_by_carriers(flags, setup, carriers)["carrier_recall"]
                        }
                    space = options.get("embedding", "features")
                    if space not in shares:
                        shares[space] = poison_neighbour_share(embeddings.space(space), poisoned.labels, truth)
                    row["poison_neighbour_share"] = shares[space]
                    row["alarm_p"] = alarm_p_values(detection, setup.intended_class)
                    row["alarmed_classes"] = [
                        c for c, info in detection.summary["per_class"].items() if info.get("alarmed")
                    ]
                    row["closed_groups"] = {
                        c: info["closed_group"]
                        for c, info in detection.summary["per_class"].items()
                        if "conductance" in info.get("closed_group", {})
                    }
                append_row(rows_path, row)
    render(rows_path, args.out / "detection.md", default_model_name(harness.train.image_size), harness.train)


def keys_harness(args, published: Path, **more) -> Harness:
    """The evaluation harness of a script's keys on CIFAR-10 (its --shared, --attack, --scale, --eps, --craft-option
    and --cache; `more` settings beside them), reading and adding published copies in `published`."""
    data = args.shared / "data" / "cifar10"
    config = EvaluationConfig(
        attack=args.attack,
        scale=args.scale,
        eps=args.eps,
        craft_options=dict(parse_option(args.attack, text) for text in args.craft_option),
        cache=str(args.cache),
        **more,
    )
    return Harness(data / "cifar10_train.npz", data / "cifar10_test.npz", published, config, progress=False)


def poisoned_keys(harness: Harness, keys: str):
    """(key, setup, poisons, the poisoned set) of each of the comma-separated keys whose poisons are cached or
    published; the others are said and skipped."""
    for key in (int(k) for k in keys.split(",")):
        setup = choose_setup(key, harness.train, harness.test, harness.config.budget)
        poisons = harness.stored_poisons(setup)
        if poisons is None:
            print(f"key {key}: no cached or published poisons, skipped")
            continue
        yield key, setup, poisons, harness.data_for("undefended", poisons)


def proxy_cell(row: dict) -> str:
    return (
        f"{row['proxy_epochs']}"
        + (f" ({row['proxy_model']})" if row.get("proxy_model") else "")
        + (f" at {row['proxy_side']} px" if row.get("proxy_side") else "")
        + (f", {row['proxy_schedule']}" if row.get("proxy_schedule") else "")
        + (f", first {row['proxy_reduced'][1]} at {row['proxy_reduced'][0]} px" if row.get("proxy_reduced") else "")
        + (f", seed {row['proxy_seed']}" if "proxy_seed" in row else "")
    )


def variant_label(detector: str, options: dict, row: dict, default_proxy: str) -> str:
    """knn_density options as the difference from its first default (rows before issue 4 gave only that difference)."""
    if detector != "knn_density":
        return json.dumps(options) if options else "default"
    effective = FIRST_DEFAULT | UNSTATED | options
    current = dataclasses.asdict(KnnDensityOptions())
    changed = {k: v for k, v in effective.items() if (FIRST_DEFAULT | UNSTATED).get(k, current.get(k)) != v}
    label = "first default" + (f" + {json.dumps(changed)}" if changed else "")
    is_current = (
        current_rule(options)
        and row["proxy_epochs"] == ScanConfig().train.epochs
        and row.get("proxy_model", "convnet") == default_proxy
        and not row.get("proxy_side")
        and not row.get("proxy_schedule")
        and not row.get("proxy_reduced")
    )
    return f"**{label} = current default**" if is_current else label


def current_rule(options: dict) -> bool:
    """Whether a knn_density row's options are today's default rule (whatever its proxy)."""
    effective = FIRST_DEFAULT | UNSTATED | options
    current = dataclasses.asdict(KnnDensityOptions())
    return (
        all(current[k] == v for k, v in effective.items())
        and effective.get("embedding", "features") == current["embedding"]
    )


def alarm_cell(row: dict) -> str:
    alarm = row.get("alarm_p")
    if not alarm:
        return "-"
    intended = "-" if alarm["intended"] is None else f"{alarm['intended']:.1e}"
    return f"{intended} / {alarm['min_other']:.1e}"


def proxy_flops(row: dict, data: ArrayDataset, default_proxy: str) -> float:
    """The model FLOPs of the row's scan (sanitize.scanner.scan_work for a finished proxy on `data`): its proxy trained
    for its epochs at its side (its first ones reduced under progressive resizing), then one scoring pass."""
    side = row.get("proxy_side")
    image_size = (side, side) if side else data.image_size
    model = row.get("proxy_model", default_proxy)
    reduced = row.get("proxy_reduced") or (None, 0)
    epochs = dataclasses.replace(
        ScanConfig().train, epochs=row["proxy_epochs"], reduced_side=reduced[0], reduced_epochs=reduced[1]
    )
    examples = trained_examples(len(data), 1, epochs.batch_size)
    history = [
        {"examples": examples} | ({"side": epochs.side_at(e)} if epochs.side_at(e) else {})
        for e in range(epochs.epochs)
    ]
    return scan_work({"name": model, "history": history}, data.num_classes, image_size, len(data), [], epochs)["flops"]


def cost_table(rows: list[dict], data: ArrayDataset, default_proxy: str) -> list[str]:
    """Today's default rule on each proxy the sweep scanned with: what the scan costs against the default proxy's
    scan, beside what it found (issue 23: detection per unit of proxy cost)."""
    current = [r for r in rows if r["key"] != "clean" and r["detector"] == "knn_density" and current_rule(r["options"])]
    default = proxy_flops({"proxy_epochs": ScanConfig().train.epochs}, data, default_proxy)
    lines = [
        "",
        f"Today's default rule on each proxy: the scan's model FLOPs against the default proxy's scan "
        f"({default / 1e15:.1f} PFLOP for {len(data):,} images), beside what it found:",
        "",
        "| key | proxy epochs (model) | scan FLOPs vs default | proxy accuracy | flagged | recall | AUROC | carriers caught | class alarm |",
        "|" + " --- |" * 9,
    ]
    for r in current:
        lines.append(
            f"| {r['key']} | {proxy_cell(r)} | {proxy_flops(r, data, default_proxy) / default:.2f}x | {r['proxy_accuracy']:.1%} "
            f"| {r['dropped_fraction']:.2%} | {r['poison_recall']:.2f} | {r['auroc']:.3f} "
            f"| {round(r['recall_carriers'] * r['carriers'])} of {r['carriers']} | {r['alarmed_classes'] or 'none'} |"
        )
    return lines


def clump_table(rows: list[dict]) -> list[str]:
    """How clumped the poisons are in each proxy's embedding spaces (rows that measured it)."""
    seen, lines = set(), []
    for r in rows:
        share = r.get("poison_neighbour_share")
        space = r["options"].get("embedding", "features")
        identity = (r["key"], r.get("poisons_sha256"), proxy_cell(r), space)
        if share is None or identity in seen:
            continue
        seen.add(identity)
        lines.append(
            f"| {r['key']} | {(r.get('poisons_sha256') or '-')[:6]} | {proxy_cell(r)} | {space} "
            f"| {share['poisons']:.2f} | {share['clean']:.3f} | {share['base']:.2f} |"
        )
    if not lines:
        return []
    return [
        "",
        f"How clumped the poisons are: the mean share of poisons among an example's {CLUMP_K} nearest "
        "neighbours in its class (classes holding poisons), for poisons and for clean examples, beside the poisons' share "
        "of those classes:",
        "",
        "| key | poisons | proxy epochs (model) | embedding | poisons' neighbours that are poisons | clean examples' | poisons' share |",
        "| --- | --- | --- | --- | --- | --- | --- |",
        *lines,
    ]


def render(rows_path: Path, out: Path, default_proxy: str, data: ArrayDataset) -> None:
    lines = [
        "| key | poisons | eps | model | epochs | proxy epochs (model) | detector | options | told count | flagged | precision | recall | AUROC | median poison score | recall / flagged at z 3.0 | at z 2.5 | carriers | recall carriers / rest | rank corr. score-pull | class alarm p: intended / lowest other |",
        "|" + " --- |" * 20,
    ]
    for r in map(json.loads, rows_path.read_text().splitlines()):
        if r["key"] == "clean":
            alarmed = f" (alarmed classes: {r['alarmed_classes']})" if r["alarmed_classes"] else ""
            lines.append(
                f"| clean | - | - | {r['model']} | {r['epochs']} | {proxy_cell(r)} | {r['detector']} | {variant_label(r['detector'], r['options'], r, default_proxy)} | - | "
                f"{r['dropped_fraction']:.2%}{alarmed} |" + " - |" * 9 + f" {alarm_cell(r)} |"
            )
            continue
        precision = "-" if r["poison_precision"] is None else f"{r['poison_precision']:.2f}"
        aligned = (
            f"{r['carriers']} | {r['recall_carriers']:.2f} / {r['recall_rest']:.2f} | {r['score_pull_spearman']:.2f}"
            if "carriers" in r
            else "- | - | -"
        )
        at_z = [
            f"{r['at_z'][z]['poison_recall']:.2f} / {r['at_z'][z]['dropped_fraction']:.1%}" if "at_z" in r else "-"
            for z in ("3.0", "2.5")
        ]
        lines.append(
            f"| {r['key']} | {(r.get('poisons_sha256') or '-')[:6]} | {r['eps']:g} | {r['model']} | {r['epochs']} | {proxy_cell(r)} | {r['detector']} | {variant_label(r['detector'], r['options'], r, default_proxy)} | "
            f"{r['told_expected_poisons'] or '-'} | {r['dropped_fraction']:.2%} | {precision} | {r['poison_recall']:.2f} | {r['auroc']:.3f} | {r['poison_score_median']:.3f} | {at_z[0]} | {at_z[1]} | {aligned} | {alarm_cell(r)} |"
        )
    rows = list(map(json.loads, rows_path.read_text().splitlines()))
    lines += cost_table(rows, data, default_proxy) + clump_table(rows)
    out.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
