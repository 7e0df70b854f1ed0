"""The default scan's gate and class alarm on clean data as diverse as the project can build without downloads, and
on the evaluations' poisoned sets.

    OMP_NUM_THREADS=1 python benchmarks/class_alarm.py --shared ../shared --work work-data/class-alarm \
        --cache work-data/cache-cpu --out reports/class-alarm

The gate must not fail clean data, and must fail a poisoned set whose victims flip. Clean side: how often the default
scan flags more than the gate allows, raises a class alarm, or flags more than 5% of one class, on
CIFAR-10 subsets of several seeds and sizes and the whole training set; grayscale and re-sized copies; class subsets;
a class made homogeneous (near-duplicates of a few images) and one made heterogeneous (two classes merged);
scikit-learn's digits; proxies of other seeds and lengths. Poisoned side: the cpu evaluation's published poison sets
(OUT of `sanitize evaluate --scale cpu`, e.g. reports/gradient-matching-cpu; another scale's with `--scale`), each scanned as its `scan` arm is, with
the undefended victims that flipped read from that evaluation's results. Each scan keeps its proxy and embeddings
(WORK/scans/NAME; a poisoned set's in the evaluation's cache), so a rerun under a changed default only runs the
detector again. One JSON line per scan in OUT/rows.jsonl, replaced when the scan options differ; OUT/README.md is
rewritten with both tables.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

from sanitize import scan
from sanitize.cli import parse_scan_options
from sanitize.data.digits import digits_arrays
from sanitize.detectors.knn_density import KnnDensityOptions

Variant = Callable[[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]


def subset(per_class: int, seed: int, classes: tuple[int, ...] | None = None) -> Variant:
    def make(x, y):
        rng = np.random.default_rng(seed)
        keep = classes if classes is not None else tuple(range(int(y.max()) + 1))
        chosen = np.sort(np.concatenate([rng.choice(np.flatnonzero(y == c), per_class, replace=False) for c in keep]))
        remap = {c: i for i, c in enumerate(keep)}
        return x[chosen], np.array([remap[int(c)] for c in y[chosen]])

    return make


def then(first: Variant, second: Callable[[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]) -> Variant:
    return lambda x, y: second(*first(x, y))


def grayscale(x, y):
    gray = (x.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)).round().astype(np.uint8)
    return np.repeat(gray[..., None], 3, axis=3), y


def resized(side: int) -> Callable:
    return lambda x, y: (np.stack([np.asarray(Image.fromarray(i).resize((side, side), Image.BILINEAR)) for i in x]), y)


def near_duplicates(label: int, sources: int = 50, seed: int = 0) -> Callable:
    """Class `label` rebuilt from `sources` of its images, each copied with +-3 grey levels of noise: very homogeneous."""

    def make(x, y):
        rng = np.random.default_rng(seed)
        members = np.flatnonzero(y == label)
        originals = x[rng.choice(members, sources, replace=False)]
        copies = originals[rng.integers(0, sources, len(members))].astype(np.int16)
        x = x.copy()
        x[members] = (copies + rng.integers(-3, 4, copies.shape)).clip(0, 255).astype(np.uint8)
        return x, y

    return make


def merged(kept: int, into: int) -> Callable:
    """Class `kept`'s images labelled `into` (a class merged from two: heterogeneous), the emptied label removed."""

    def make(x, y):
        y = np.where(y == kept, into, y)
        return x, np.where(y > kept, y - 1, y)

    return make


def corpus() -> dict[str, tuple[Variant | None, dict]]:
    """name -> (how to build the data from CIFAR-10's training set, or None for digits; scan options)."""
    ten_k = subset(1000, 0)
    return {
        "cifar10k-seed0": (ten_k, {}),
        "cifar10k-seed1": (subset(1000, 1), {}),
        "cifar10k-seed2": (subset(1000, 2), {}),
        "cifar1k": (subset(100, 0), {}),
        "cifar5k": (subset(500, 0), {}),
        "cifar20k": (subset(2000, 0), {}),
        "cifar50k": (lambda x, y: (x, y), {}),
        "cifar10k-gray": (then(ten_k, grayscale), {}),
        "cifar10k-16px": (then(ten_k, resized(16)), {}),
        "cifar10k-48px": (then(ten_k, resized(48)), {}),
        "cifar-5-classes": (subset(1000, 0, (0, 1, 2, 3, 4)), {}),
        "cifar-2-classes": (subset(2500, 0, (3, 5)), {}),
        "cifar10k-near-duplicate-class": (then(ten_k, near_duplicates(1)), {}),
        "cifar10k-merged-class": (then(ten_k, merged(5, 3)), {}),
        "digits": (None, {}),
        "cifar10k-proxy-seed1": (ten_k, {"seed": 1}),
        "cifar10k-proxy-seed2": (ten_k, {"seed": 2}),
        "cifar10k-proxy-8-epochs": (ten_k, {"epochs": 8}),
        "cifar10k-proxy-32-epochs": (ten_k, {"epochs": 32}),
        "cifar10k-no-augment": (ten_k, {"augment": False}),
    }


def default_options() -> dict:
    """The default detector's options, recorded in each row: a row is redone when the default changes."""
    return dataclasses.asdict(KnnDensityOptions())


def class_view(summary: dict, index: int) -> dict:
    """One class's flags and alarm statistics from a scan summary."""
    name = summary["data"]["classes"][index]
    info = summary["detector"].get("per_class", {}).get(name, {})
    n = summary["data"]["counts_per_class"][name]
    return {
        "class": name,
        "flagged_fraction": summary["flagged"]["per_class"][name] / max(n, 1),
        "grouped_fraction": info.get("grouped_flags", 0) / max(n, 1),
        "alarm_p": info.get("alarm_p_value"),
    }


def row_of(name: str, options: dict, summary: dict, seconds: float) -> dict:
    counts = summary["data"]["counts_per_class"]
    views = [class_view(summary, c) for c in range(len(counts))]
    worst = max(views, key=lambda v: v["flagged_fraction"])
    p_values = [v["alarm_p"] for v in views if v["alarm_p"] is not None]
    return {
        "name": name,
        "options": options,
        "detector": default_options(),
        # the architecture auto resolved to (rows without it: the options' model, else the ConvNet)
        "proxy_model": summary["config"]["model"],
        "examples": summary["data"]["examples"],
        "classes": len(counts),
        "proxy_accuracy": summary["model"]["train_accuracy_eval_mode"],
        "flagged_fraction": summary["flagged"]["fraction"],
        "worst_class": worst["class"],
        "worst_class_fraction": worst["flagged_fraction"],
        "max_grouped_fraction": max(v["grouped_fraction"] for v in views),
        "alarmed_classes": summary["gate"]["alarmed_classes"],
        "min_alarm_p": min(p_values) if p_values else None,
        "gate_passed": summary["gate"]["passed"],
        "seconds": round(seconds, 1),
    }


def poisoned_sets(args) -> list[tuple[str, object, dict]]:
    """(name, poisoned data, facts) for every published poison set of the evaluation in args.evaluation (at
    args.scale; sets of another scale than cpu are named with it)."""
    from attacks import choose_setup
    from attacks.experiment import Harness
    from attacks.rows import read_rows
    from attacks.scales import EvaluationConfig

    data = args.shared / "data" / "cifar10"
    victims = read_rows(args.evaluation)
    found = []
    for eps in (16.0, 8.0):
        config = EvaluationConfig(scale=args.scale, eps=eps, cache=str(args.cache))
        harness = Harness(
            data / "cifar10_train.npz", data / "cifar10_test.npz", args.evaluation, config, progress=False
        )
        for key in range(8):
            setup = choose_setup(key, harness.train, harness.test, config.budget)
            poisons = harness.stored_poisons(setup)
            if poisons is None:
                continue
            undefended = [
                r
                for r in victims
                if (r["arm"], r["poison_key"], r["eps"], r["epochs"]) == ("undefended", key, eps, harness.recipe.epochs)
            ]
            facts = {
                "key": key,
                "eps": eps,
                "intended_class": int(setup.intended_class),
                "positions": [int(i) for i in setup.poison_indices],
                "victims": len(undefended),
                "flipped": sum(r["success"] for r in undefended),
            }
            prefix = "" if args.scale == "cpu" else f"{args.scale}-"
            found.append((f"{prefix}key{key}-eps{eps:g}", harness.data_for("undefended", poisons), facts, harness))
    return found


def poisoned_row(name: str, summary: dict, facts: dict, result, seconds: float) -> dict:
    truth = np.zeros(len(result.flags), dtype=bool)
    truth[facts["positions"]] = True
    intended = class_view(summary, facts["intended_class"])
    classes = range(len(summary["data"]["classes"]))
    others = [class_view(summary, c) for c in classes if c != facts["intended_class"]]
    return {
        "name": name,
        **{k: facts[k] for k in ("key", "eps", "victims", "flipped")},
        "intended_class": intended["class"],
        "detector": default_options(),
        "flagged_fraction": summary["flagged"]["fraction"],
        "poison_recall": float(result.flags[truth].mean()),
        "intended_flagged_fraction": intended["flagged_fraction"],
        "intended_grouped_fraction": intended["grouped_fraction"],
        "intended_alarm_p": intended["alarm_p"],
        "max_other_grouped_fraction": max(v["grouped_fraction"] for v in others),
        "alarmed_classes": summary["gate"]["alarmed_classes"],
        "gate_passed": summary["gate"]["passed"],
        "seconds": round(seconds, 1),
    }


# which sets chose the default (docs/protocol.md: tune, freeze, then measure on what the choice never saw)
TUNING = ("cifar10k-seed0", "cifar10k-seed1", "cifar10k-seed2", "cifar1k", "cifar5k", "cifar20k", "cifar50k")
TUNING_POISONED = ("key0-eps16", "key3-eps8", "key4-eps8")
METHOD = f"""
## How the default was chosen

The gate fails when more than 5% is flagged or a class raises the class alarm (`sanitize/detectors/knn_density.py`,
`alarmed_class_flags`). Until 2026-12-01 the alarm was a Poisson test of a class's first-pass flag count against the
other classes' rate (p < 1e-4 / classes): it fired on clean CIFAR-10 as the set grew (20,000 images: one class; all
50,000: cat and dog, 24% of cat flagged by the second pass, the gate failed). Classes differ in their natural outlier
rate (spread, confusion with another class), and a fixed-rate test calls that difference significant once the counts
are large. The alarm now needs both:
- **a count beyond the classes' own spread**: a negative binomial whose dispersion is the other classes' (Pearson
  chi-square per degree of freedom, at least 1), p < `class_alarm_p` 0.03 / classes;
- **a group**: at least `alarm_group_fraction` 0.5% of the class are flagged examples at least half of whose 10
  nearest same-class neighbours are flagged too. Poisons aimed at one target crowd together; a class's natural
  outliers are lone (on the tuning sets, 42 of the 43 grouped flags in key 0's poisoned class are poisons).

Both thresholds were chosen on the tuning sets alone ({", ".join(TUNING)}; poisoned {", ".join(TUNING_POISONED)}), whose
embeddings were scored offline, and frozen at commit 9a65a74 before the other rows were computed: the remaining clean
scans and the poisoned sets key 5-7 at eps 8 are held out. The tightest margins on the tuning sets: the clean class
with the smallest p (cifar10k-seed2's automobile, 6.8e-3 per class) has no group; the clean class with the most grouped
flags (cifar20k's ship, 0.9%) has p 1.0e-2; key 3's frog at eps 8, whose victims flip, has p 1.3e-3 and 0.9% grouped.
The margins are thin (a factor 2-5 in p): more poisoned sets with working victims will test them (the full-scale
pilot's poisons, crafted after the freeze: reports/gradient-matching-pilot).

Rows record the detector's options and the proxy they ran with (rows without a proxy: the ConvNet). The same corpus
scanned with the victims' architecture at the full scale (`--scan-option model=resnet18_cifar_w16`, a candidate proxy of
reports/gradient-matching-full-tuning) is reports/class-alarm/resnet18_cifar_w16.
"""


def render(clean: list[dict], poisoned: list[dict], out: Path, command: str) -> None:
    lines = [
        "## Clean data",
        "",
        "| data | scan options | proxy | examples | proxy accuracy | flagged | worst class (flagged) | most grouped class "
        "| class alarm (min p) | gate |",
        "|" + " --- |" * 10,
    ]
    for r in clean:
        alarm = ", ".join(r["alarmed_classes"]) or "none"
        lines.append(
            f"| {r['name']} | {json.dumps(r['options']) if r['options'] else 'default'} "
            f"| {r.get('proxy_model') or r['options'].get('model', 'convnet')} | {r['examples']} "
            f"| {r['proxy_accuracy']:.1%} | {r['flagged_fraction']:.2%} | {r['worst_class']} ({r['worst_class_fraction']:.1%}) "
            f"| {r['max_grouped_fraction']:.2%} | {alarm} ({r['min_alarm_p']:.1e}) | {'passed' if r['gate_passed'] else 'FAILED'} |"
        )
    lines += [
        "",
        "## Poisoned sets (the cpu evaluation's published poisons: 10,000 images, 100 poisons in the intended class)",
        "",
        "| set | undefended victims flipped | flagged | poison recall | intended class: flagged, grouped, alarm p "
        "| most grouped other class | alarmed classes | gate |",
        "|" + " --- |" * 8,
    ]
    for r in poisoned:
        p = f"{r['intended_alarm_p']:.1e}" if r["intended_alarm_p"] is not None else "-"
        lines.append(
            f"| {r['name']} | {r['flipped']} of {r['victims']} | {r['flagged_fraction']:.2%} | {r['poison_recall']:.0%} "
            f"| {r['intended_flagged_fraction']:.1%}, {r['intended_grouped_fraction']:.1%}, {p} "
            f"| {r['max_other_grouped_fraction']:.2%} | {', '.join(r['alarmed_classes']) or 'none'} "
            f"| {'passed' if r['gate_passed'] else 'FAILED'} |"
        )
    false_alarms = sum(bool(r["alarmed_classes"]) for r in clean)
    failed = sum(not r["gate_passed"] for r in clean)
    over = sum(r["worst_class_fraction"] > 0.05 for r in clean)
    flipping = [r for r in poisoned if r["flipped"]]
    caught = sum(not r["gate_passed"] for r in flipping)
    head = (
        f"# The gate and its class alarm on clean and poisoned data\n\n**Result:** {len(clean)} clean scans: "
        f"{false_alarms} raised a class alarm, {failed} failed the gate, {over} flagged more than 5% of a class. "
        f"{len(poisoned)} poisoned sets: the gate fails {caught} of the {len(flipping)} whose undefended victims flipped "
        f"and {sum(not r['gate_passed'] for r in poisoned)} of all {len(poisoned)}.\n\nCommand: `{command}`\n\n"
    )
    (out / "README.md").write_text(head + "\n".join(lines) + "\n" + METHOD)


def read_jsonl(path: Path) -> dict[str, dict]:
    return {r["name"]: r for r in map(json.loads, path.read_text().splitlines())} if path.exists() else {}


def write_jsonl(path: Path, rows: dict[str, dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows.values()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shared", type=Path, default=Path("../shared"))
    parser.add_argument("--work", type=Path, default=Path("work-data/class-alarm"))
    parser.add_argument("--evaluation", type=Path, default=Path("reports/gradient-matching-cpu"))
    parser.add_argument("--cache", type=Path, default=Path("work-data/cache-cpu"))
    parser.add_argument("--scale", default="cpu", help="the evaluation's scale (its poisoned sets are named with it)")
    parser.add_argument("--out", type=Path, default=Path("reports/class-alarm"))
    parser.add_argument("--only", default=None, help="comma-separated names of the clean corpus to run")
    parser.add_argument(
        "--scan-option",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="a scan option for every clean scan (e.g. model=resnet18_cifar_w16, with its own --work and --out); "
        "the poisoned sets, whose cached scans are the default's, are then not scanned",
    )
    args = parser.parse_args()
    command = (
        "OMP_NUM_THREADS=1 python benchmarks/class_alarm.py "
        + " ".join(
            f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if v is not None and k != "scan_option"
        )
        + "".join(f" --scan-option {text}" for text in args.scan_option)
    )
    extra = parse_scan_options(args.scan_option)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.work / "data").mkdir(parents=True, exist_ok=True)
    clean_path, poisoned_path = args.out / "rows.jsonl", args.out / "poisoned.jsonl"
    current = default_options()
    clean, poisoned = (
        {name: r for name, r in read_jsonl(path).items() if r.get("detector") == current}  # others are redone
        for path in (clean_path, poisoned_path)
    )

    for name, poisoned_data, facts, harness in [] if extra else poisoned_sets(args):
        if name in poisoned:
            continue
        started = time.perf_counter()
        result = scan(
            poisoned_data,
            harness.scan_dir(poisoned_data) / "knn_density",  # the evaluation's scan arm's: its proxy is reused
            quiet=True,
            device=harness.config.device,
            precision=harness.config.precision,
        )
        poisoned[name] = poisoned_row(name, result.summary, facts, result, time.perf_counter() - started)
        write_jsonl(poisoned_path, poisoned)
        render(list(clean.values()), list(poisoned.values()), args.out, command)

    with np.load(args.shared / "data" / "cifar10" / "cifar10_train.npz", allow_pickle=False) as arrays:
        x, y = (
            arrays["x_train"] if "x_train" in arrays.files else arrays["x"],
            arrays["y_train"] if "y_train" in arrays.files else arrays["y"],
        )
    wanted = args.only.split(",") if args.only else list(corpus())
    for name, (build, options) in corpus().items():
        if name not in wanted or name in clean:
            continue
        data = args.work / "data" / f"{name}.npz"
        if not data.exists():
            images, labels = digits_arrays() if build is None else build(x, y.astype(np.int64))
            np.savez(data, x=images, y=labels)
        started = time.perf_counter()
        result = scan(data, args.work / "scans" / name, quiet=True, **options, **extra)
        clean[name] = row_of(name, options | extra, result.summary, time.perf_counter() - started)
        write_jsonl(clean_path, clean)
        render(list(clean.values()), list(poisoned.values()), args.out, command)
    render(list(clean.values()), list(poisoned.values()), args.out, command)


if __name__ == "__main__":
    main()
