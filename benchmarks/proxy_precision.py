"""What the precision of robust training's gradient proxy changes in one round's drops, on the same weights.

    python benchmarks/proxy_precision.py --results reports/gradient-matching-full-tuning-fp32 \
        --cache work-data/cache-full --key 104 --seed 0 --checkpoint CHECKPOINT --out reports/proxy-precision

CHECKPOINT is a `scan-robust` victim's training checkpoint (`*.partial.pt`, copied when its `epoch` is a round's
epoch: it holds the weights that round scored with). The script rebuilds the data that victim trained on (the key's
poisons, what the default scan kept: both read from the evaluation folder or the cache, never crafted or scanned
again) and runs that round of robust training (sanitize.robust.EpicDropper, as the victim did) twice on the same
weights: the proxy softmax - onehot computed in fp32, and under bf16 autocast (what `--precision auto` gives on a GPU
or a CPU with native bf16). It writes OUT/key<K>-seed<S>-epoch<E>.json: how far the two proxies differ, how much the
two rounds' drops overlap, how many poisons and carriers each drops, and whether the fp32 round reproduces the
checkpoint's own survivors (the victim's round, when that victim trained in fp32). Never trains.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from run_record import write_results  # run as a script: benchmarks/ is on the path

from attacks import choose_setup
from attacks.evaluate import victim_tag
from attacks.experiment import Harness
from attacks.scales import EvaluationConfig
from sanitize.cli import parse_scan_options
from sanitize.robust import EpicDropper
from sanitize.training import milestone_epochs

ARM = "scan-robust"
PRECISIONS = {"fp32": None, "bf16": torch.bfloat16}


class KeptProxyDropper(EpicDropper):
    """EpicDropper that keeps a copy of its round's gradient proxy (the product's removes it after the round)."""

    proxy: np.ndarray | None = None

    def _gradient_proxy(self, model: torch.nn.Module, path: Path) -> np.ndarray:
        self.proxy = np.array(super()._gradient_proxy(model, path))
        return self.proxy


class EvaluatedKey(NamedTuple):
    """One evaluated key's parts that the benchmarks of robust training read."""

    harness: Harness
    setup: Any
    poisoned: Any
    carriers: np.ndarray  # over the poisons, in setup order
    kept: Any  # what the default scan kept of the poisoned set
    caught: np.ndarray  # the scan's flags over the poisoned set

    def kept_masks(self) -> tuple[np.ndarray, np.ndarray]:
        """Which rows of the kept set are poisons, and which of those are carriers."""
        kept_positions = np.flatnonzero(~self.caught)  # the kept set's rows, as positions of the poisoned set
        poison_indices = np.asarray(self.setup.poison_indices)
        return np.isin(kept_positions, poison_indices), np.isin(kept_positions, poison_indices[self.carriers])

    def victim_weights(self, seed: int, models: Any = None) -> Path:
        """Where the key's `scan-robust` victim with `seed` is cached (`models`: the evaluation's by default); its drop
        log lies beside it (.drop_log.json)."""
        return (models or self.harness.models).path(self.kept, seed, victim_tag(ARM, False), robust=True)


def evaluated_key(
    results: Path,
    cache: Path,
    data: Path,
    key: int,
    precision: str = "auto",
    scan_options: dict[str, Any] | None = None,
) -> EvaluatedKey:
    """A full-scale gradient-matching key as its `scan-robust` victims saw it: its poisons, carriers and the scan's
    kept set (the default's, or the rule with `scan_options` on the same proxy and embeddings), read from the
    evaluation folder or the cache, never crafted or scanned again; models trained at `precision`."""
    config = EvaluationConfig(
        scale="full",
        eps=16.0,
        keys=(key,),
        arms=(ARM,),
        cache=str(cache),
        precision=precision,
        scan_options=scan_options or {},
    )
    harness = Harness(data / "cifar10_train.npz", data / "cifar10_test.npz", results, config, False)
    setup = choose_setup(key, harness.train, harness.test, config.budget)
    poisons = harness.stored_poisons(setup)
    if poisons is None:
        raise SystemExit(f"key {key}'s poisons are neither cached nor published in {results}")
    poisoned = harness.data_for(ARM, poisons, setup)
    (surrogate,), _ = harness.surrogates()
    carriers = harness.carriers(setup, poisoned, surrogate)
    if not harness._scanned(harness.scan_dir(poisoned) / "knn_density"):
        raise SystemExit("the key's default scan is neither cached nor published: this script never scans")
    kept, caught, _, _ = harness.filtered(poisoned, ARM, setup)
    return EvaluatedKey(harness, setup, poisoned, carriers, kept, caught)


def evaluated_key_arguments(doc: str) -> argparse.ArgumentParser:
    """A parser with the options `key_from_arguments` reads: --results, --cache, --data, --key, --precision and
    --scan-option."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--results", type=Path, required=True, help="the evaluation folder of the key's rows")
    parser.add_argument("--cache", type=Path, required=True, help="that evaluation's --cache")
    parser.add_argument("--data", type=Path, default=Path("../shared/data/cifar10"))
    parser.add_argument("--key", type=int, required=True)
    parser.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="auto", help="the models' precision")
    parser.add_argument(
        "--scan-option",
        action="append",
        default=[],
        help="NAME=VALUE, as the evaluation's: the kept set of the scan's rule so changed (same proxy and embeddings)",
    )
    return parser


def key_from_arguments(args: argparse.Namespace) -> EvaluatedKey:
    """`evaluated_key` of a parser made by `evaluated_key_arguments`."""
    options = parse_scan_options(args.scan_option)
    return evaluated_key(args.results, args.cache, args.data, args.key, args.precision, options)


def predicted(proxy: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """The class each row's model predicts, from its proxy softmax - onehot."""
    return (proxy + np.eye(proxy.shape[1], dtype=proxy.dtype)[labels]).argmax(axis=1)


def main() -> None:
    parser = evaluated_key_arguments(__doc__)
    parser.add_argument("--seed", type=int, required=True, help="the victim's seed")
    parser.add_argument("--checkpoint", type=Path, required=True, help="a copy of the victim's partial checkpoint")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()

    key = key_from_arguments(args)
    harness, kept = key.harness, key.kept
    is_poison, is_carrier = key.kept_masks()

    state = torch.load(args.checkpoint, map_location="cpu", weights_only=True)
    round_epoch = int(state["epoch"])
    model = harness.models.new_model(args.seed)
    model.load_state_dict(state["model"])
    recipe = harness.recipe
    run_log = key.victim_weights(args.seed).with_suffix(".drop_log.json")

    outcomes, proxies = {}, {}
    for name, amp in PRECISIONS.items():
        with tempfile.TemporaryDirectory() as scratch:
            log = Path(scratch) / "round.drop_log.json"
            if run_log.exists():  # the rounds before this one, as the victim logged them (the dropper cuts later ones)
                shutil.copy(run_log, log)
            dropper = KeptProxyDropper(
                kept,
                harness.models.robust_config,
                recipe.epochs,
                max(milestone_epochs(recipe)),
                log,
                harness.device,
                amp,
            )
            if round_epoch not in dropper.rounds:
                raise SystemExit(f"epoch {round_epoch} is not a round of this recipe ({dropper.rounds})")
            logged = json.loads(log.read_text())["dropped"] if log.exists() else []
            earlier = np.array([row["position"] for row in logged if row["round"] < round_epoch], dtype=np.int64)
            before = np.setdiff1d(np.arange(len(kept)), earlier)
            started = time.perf_counter()
            survivors = dropper(round_epoch - 1, model, before)
            seconds = time.perf_counter() - started
        dropped = np.setdiff1d(before, survivors)
        outcomes[name] = {
            "dropped": dropped,
            "survivors": survivors,
            "summary": {
                "dropped": len(dropped),
                "poisons_dropped": int(is_poison[dropped].sum()),
                "carriers_dropped": int(is_carrier[dropped].sum()),
                "seconds": round(seconds, 1),
            },
        }
        proxies[name] = dropper.proxy

    fp32, bf16 = proxies["fp32"], proxies["bf16"]
    difference = np.linalg.norm(fp32 - bf16, axis=1)
    norms = np.linalg.norm(fp32, axis=1)
    a, b = outcomes["fp32"]["dropped"], outcomes["bf16"]["dropped"]
    both = len(np.intersect1d(a, b))
    record = {
        "key": args.key,
        "seed": args.seed,
        "round_epoch": round_epoch,
        "kept": len(kept),
        "poisons_kept": int(is_poison.sum()),
        "carriers_kept": int(is_carrier.sum()),
        "carriers": int(key.carriers.sum()),
        "by_precision": {name: outcome["summary"] for name, outcome in outcomes.items()},
        "dropped_by_both": both,
        "jaccard": round(both / max(len(np.union1d(a, b)), 1), 4),
        "proxy_difference": {
            "max_abs": float(np.abs(fp32 - bf16).max()),
            "median_row_l2": float(np.median(difference)),
            "median_row_l2_relative": float(np.median(difference / np.maximum(norms, 1e-12))),
            "rows_with_predicted_class_changed": int(
                (predicted(fp32, kept.labels) != predicted(bf16, kept.labels)).sum()
            ),
        },
        # the checkpoint's indices are the survivors of the victim's own round
        "fp32_reproduces_checkpoint": bool(np.array_equal(outcomes["fp32"]["survivors"], state["indices"].numpy())),
    }
    write_results(args.out / f"key{args.key}-seed{args.seed}-epoch{round_epoch}.json", record)


if __name__ == "__main__":
    main()
