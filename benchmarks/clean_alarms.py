"""False alarms of the default scan on clean data as diverse as the project can build without downloads.

    OMP_NUM_THREADS=1 python benchmarks/clean_alarms.py --shared ../shared --work work-data/clean-alarms --out reports/clean-alarms

The gate must not fail clean data, and a fired class alarm should fail it (issue 18): this measures how often the
default scan flags more than the gate allows, raises a class alarm, or flags more than 5% of one class on clean sets:
CIFAR-10 subsets of several seeds and sizes and the whole training set; grayscale and re-sized copies; class subsets;
a class made homogeneous (near-duplicates of a few images) and one made heterogeneous (two classes merged);
scikit-learn's digits; proxies of other seeds and lengths. Each scan keeps its embeddings (WORK/scans/NAME), so other
alarm statistics can be computed on them without training again. One JSON line per scan in OUT/rows.jsonl (a rerun
skips the scans already there); OUT/README.md is rewritten with the table.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

from sanitize import scan
from sanitize.data.digits import digits_arrays

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


def row_of(name: str, options: dict, result, seconds: float) -> dict:
    summary = result.summary
    per_class = summary["detector"].get("per_class", {})
    counts = summary["data"]["counts_per_class"]
    flagged = summary["flagged"]["per_class"]
    worst = max(flagged, key=lambda c: flagged[c] / max(counts[c], 1))
    p_values = [info["alarm_p_value"] for info in per_class.values() if "alarm_p_value" in info]
    return {
        "name": name,
        "options": options,
        "examples": summary["data"]["examples"],
        "classes": len(counts),
        "proxy_accuracy": summary["model"]["train_accuracy_eval_mode"],
        "flagged_fraction": summary["flagged"]["fraction"],
        "worst_class": worst,
        "worst_class_fraction": flagged[worst] / max(counts[worst], 1),
        "alarmed_classes": summary["gate"]["alarmed_classes"],
        "min_alarm_p": min(p_values) if p_values else None,
        "gate_passed": summary["gate"]["passed"],
        "seconds": round(seconds, 1),
    }


def render(rows: list[dict], out: Path, command: str) -> None:
    lines = [
        "| data | scan options | examples | proxy accuracy | flagged | worst class (flagged) | class alarm (min p) | gate |",
        "|" + " --- |" * 8,
    ]
    for r in rows:
        alarm = ", ".join(r["alarmed_classes"]) or "none"
        lines.append(
            f"| {r['name']} | {json.dumps(r['options']) if r['options'] else 'default'} | {r['examples']} "
            f"| {r['proxy_accuracy']:.1%} | {r['flagged_fraction']:.2%} | {r['worst_class']} ({r['worst_class_fraction']:.1%}) "
            f"| {alarm} ({r['min_alarm_p']:.1e}) | {'passed' if r['gate_passed'] else 'FAILED'} |"
        )
    false_alarms = sum(bool(r["alarmed_classes"]) for r in rows)
    failed = sum(not r["gate_passed"] for r in rows)
    over = sum(r["worst_class_fraction"] > 0.05 for r in rows)
    head = (
        f"# False alarms of the default scan on clean data\n\n**Result:** {len(rows)} clean scans: {false_alarms} raised a "
        f"class alarm, {failed} failed the gate, {over} flagged more than 5% of a class.\n\nCommand: `{command}`\n\n"
    )
    (out / "README.md").write_text(head + "\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shared", type=Path, default=Path("../shared"))
    parser.add_argument("--work", type=Path, default=Path("work-data/clean-alarms"))
    parser.add_argument("--out", type=Path, default=Path("reports/clean-alarms"))
    parser.add_argument("--only", default=None, help="comma-separated names of the corpus to run")
    args = parser.parse_args()
    command = "OMP_NUM_THREADS=1 python benchmarks/clean_alarms.py " + " ".join(
        f"--{k} {v}" for k, v in vars(args).items() if v is not None
    )
    args.out.mkdir(parents=True, exist_ok=True)
    (args.work / "data").mkdir(parents=True, exist_ok=True)
    rows_path = args.out / "rows.jsonl"
    rows = [json.loads(line) for line in rows_path.read_text().splitlines()] if rows_path.exists() else []
    done = {r["name"] for r in rows}
    with np.load(args.shared / "data" / "cifar10" / "cifar10_train.npz", allow_pickle=False) as arrays:
        x, y = (
            arrays["x_train"] if "x_train" in arrays.files else arrays["x"],
            arrays["y_train"] if "y_train" in arrays.files else arrays["y"],
        )
    wanted = args.only.split(",") if args.only else list(corpus())
    for name, (build, options) in corpus().items():
        if name in done or name not in wanted:
            continue
        data = args.work / "data" / f"{name}.npz"
        if not data.exists():
            images, labels = digits_arrays() if build is None else build(x, y.astype(np.int64))
            np.savez(data, x=images, y=labels)
        started = time.perf_counter()
        result = scan(data, args.work / "scans" / name, quiet=True, **options)
        rows.append(row_of(name, options, result, time.perf_counter() - started))
        with rows_path.open("a") as handle:
            handle.write(json.dumps(rows[-1]) + "\n")
        render(rows, args.out, command)


if __name__ == "__main__":
    main()
