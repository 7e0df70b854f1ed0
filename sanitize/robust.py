"""EPIC robust training (Yang, Liu & Mirzasoleiman 2022): drop isolated examples periodically while training from scratch.

Every `every` epochs from epoch `warmup` until the last learning-rate milestone, the model (eval mode, no
augmentation) gives every example its last-layer gradient proxy softmax - onehot; per class, facility-location medoids
(ceil(fraction x class size)) are chosen over all examples, every example joins its nearest medoid, and medoids alone in
their cluster are dropped, for good; the survivors train unweighted. Added to EPIC: a cap on the total dropped
fraction (beyond it, the isolated examples with the largest gradient proxy go first; `spread_cap` shares it evenly over
the rounds), deterministic medoids, a drop log (id, class, round) and resume after a kill (the log is cut back to the
checkpoint's epoch). A round's gradient proxy goes to a memory-mapped file beside the log (removed after the round) and
is read one class at a time; under torchrun each rank fills its share of the rows and picks the medoids of every
world_size-th class.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from numpy.lib.format import open_memmap

from sanitize.config import RobustConfig
from sanitize.data import ImageDataset, write_atomic
from sanitize.distributed import World, barrier, gather_rows
from sanitize.embeddings import softmax_minus_onehot
from sanitize.medoids import isolated_medoids
from sanitize.training import EpochHook, predict_batches
from sanitize.work import trained_examples

# trains scout `j` (1..pool_runs - 1) from scratch with seed `scout_seed(seed, j)` on the dropper's data, calling the
# hook after every epoch; the hook stops it at the first round by raising ScoutDone, which the trainer lets through
ScoutTrainer = Callable[[int, EpochHook], None]


class ScoutDone(Exception):
    """Raised by a scout's epoch hook once its first round is stored: the scout trains no further."""


NORM_ROWS = 65_536  # rows of a round's gradient proxy read at once for their norms


def scout_path(log_path: Path, j: int) -> Path:
    """Where scout `j` of the run logging to `log_path` keeps its first round (isolated positions, proxy norms,
    training seconds): beside the log."""
    return log_path.with_name(f"{log_path.stem}.scout{j}.npz")


def scout_seed(seed: int, j: int) -> int:
    """The training seed of a run's scout `j`: apart from the seeds 0, 1, 2, ... that victims and users pick."""
    return seed + 1000 * j


class EpicDropper:
    """The `after_epoch` hook of `train_model`: decides the rounds, drops, logs; resumable from the log file."""

    def __init__(
        self,
        dataset: ImageDataset,
        config: RobustConfig,
        epochs: int,
        last_milestone: int,
        log_path: Path,
        device: torch.device,
        amp_dtype: torch.dtype | None,
        world: World = World(),
        train_scout: ScoutTrainer | None = None,
    ):
        if config.pool_runs > 1 and train_scout is None:
            raise ValueError("a first round pooled over runs needs a scout trainer")
        self.dataset, self.config, self.log_path = dataset, config, log_path
        self.device, self.amp_dtype, self.world, self.train_scout = device, amp_dtype, world, train_scout
        period = config.period(epochs)
        self.rounds = [e for e in range(max(1, config.warmup), min(last_milestone, epochs - 1) + 1) if e % period == 0]
        self.cap = math.floor(config.max_dropped_fraction * len(dataset))
        self.log = self._read_log()  # a finished run's log stands; a resumed run cuts it back on the first call
        self.resumed = False

    def __call__(self, epoch: int, model: torch.nn.Module, indices: np.ndarray) -> np.ndarray:
        """After 0-based `epoch`: run a round when the next epoch is a round epoch; returns the survivors."""
        if not self.resumed:  # training (re)started after `epoch` finished epochs: later rounds are not in its indices
            self.log, self.resumed = [row for row in self.log if row["round"] <= epoch], True
            self._write_log()
        next_epoch = epoch + 1
        if next_epoch not in self.rounds or len(self.log) >= self.cap:
            return indices
        was_training = model.training  # the round predicts in eval mode; training goes on in the mode it was in
        isolated, norms = self._isolated(model, self.log_path.stem)
        votes = np.zeros(len(self.dataset), dtype=np.int64)
        votes[isolated] = 1
        if next_epoch == self.rounds[0] and self.config.pool_runs > 1:
            for j in range(1, self.config.pool_runs):
                scout = self.scout_round(j)
                votes[scout["isolated"]] += 1
                norms = norms + scout["norms"]
            isolated = np.flatnonzero(votes >= self.config.pool_votes)
        new = np.setdiff1d(isolated, np.setdiff1d(np.arange(len(self.dataset)), indices))  # not dropped before
        room = self._allowance(next_epoch) - len(self.log)
        if len(new) > room:  # the most votes first, then the largest gradient proxy (summed over the runs)
            new = new[np.lexsort((-norms[new], -votes[new]))[:room]]
        self.log += [
            {"id": self.dataset.ids[i], "position": int(i), "class": int(self.dataset.labels[i]), "round": next_epoch}
            for i in np.sort(new)
        ]
        self._write_log()
        model.train(was_training)
        return np.setdiff1d(indices, new)

    def _isolated(self, model: torch.nn.Module, stem: str) -> tuple[np.ndarray, np.ndarray]:
        """The examples isolated in `model`'s gradient proxy (sorted positions; every rank gets all of them) and every
        example's proxy norm; the proxy's file (beside the log, named after `stem`) is removed."""
        proxy_path = self.log_path.with_name(stem + ".proxy.npy")
        proxy = self._gradient_proxy(model, proxy_path)
        my_classes = range(self.world.rank, self.dataset.num_classes, self.world.world_size)
        isolated, _ = isolated_medoids(
            proxy, self.dataset.labels, self.dataset.num_classes, self.config.fraction, classes=my_classes
        )
        isolated = np.sort(gather_rows(isolated, self.world))
        norms = np.empty(len(proxy), dtype=np.float32)
        for start in range(0, len(proxy), NORM_ROWS):  # a slice at a time: the file may not fit in memory
            norms[start : start + NORM_ROWS] = np.linalg.norm(proxy[start : start + NORM_ROWS], axis=1)
        del proxy
        barrier(self.world)  # every rank has read the proxy
        if self.world.is_main:
            proxy_path.unlink()
        return isolated, norms

    def scout_round(self, j: int) -> dict[str, np.ndarray]:
        """Scout `j`'s first round: read if stored, else trained (`train_scout`) until its hook stores it."""
        stored = scout_path(self.log_path, j)
        if not stored.exists():
            started, cpu_started = time.perf_counter(), time.process_time()

            def at_first_round(epoch: int, model: torch.nn.Module, indices: np.ndarray) -> np.ndarray:
                if epoch + 1 < self.rounds[0]:
                    return indices
                isolated, norms = self._isolated(model, stored.stem)
                if self.world.is_main:
                    partial = stored.with_suffix(".partial.npz")
                    seconds = [time.perf_counter() - started, time.process_time() - cpu_started]
                    np.savez(partial, isolated=isolated, norms=norms, epochs=self.rounds[0], seconds=seconds)
                    partial.replace(stored)
                barrier(self.world)
                raise ScoutDone

            try:
                self.train_scout(j, at_first_round)
            except ScoutDone:
                pass
            if not stored.exists():
                raise RuntimeError(f"scout {j} stopped before robust training's first round (epoch {self.rounds[0]})")
        with np.load(stored, allow_pickle=False) as arrays:
            return {name: arrays[name] for name in arrays.files}

    def stored_scouts(self) -> dict[int, dict[str, np.ndarray]]:
        """The scouts' first rounds stored so far, by scout number (none when the first round is not pooled)."""
        return {
            j: self.scout_round(j) for j in range(1, self.config.pool_runs) if scout_path(self.log_path, j).exists()
        }

    def scout_seconds(self) -> tuple[float, float]:
        """(wall, process CPU) seconds the stored scouts took to reach the first round, as the processes that finished
        them measured (a scout resumed after a kill counts from its resume)."""
        seconds = [scout["seconds"] for scout in self.stored_scouts().values()]
        return float(sum(s[0] for s in seconds)), float(sum(s[1] for s in seconds))

    def _allowance(self, round_epoch: int) -> int:
        """How many may be dropped in all once the round at `round_epoch` is done: the cap, or with `spread_cap` the
        cap's share of the rounds so far."""
        if not self.config.spread_cap:
            return self.cap
        return math.floor(self.cap * (self.rounds.index(round_epoch) + 1) / len(self.rounds))

    def _gradient_proxy(self, model: torch.nn.Module, path: Path) -> np.ndarray:
        """softmax - onehot of every example (eval mode), in a memory-mapped file beside the log: each rank fills its
        share of the rows, and the medoids then read one class at a time (no N x C array in memory, at ImageNet's
        1.28M x 1000 5 GB per process)."""
        n, labels = len(self.dataset), self.dataset.labels
        if self.world.is_main:
            open_memmap(path, mode="w+", dtype=np.float32, shape=(n, self.dataset.num_classes)).flush()
        barrier(self.world)
        lo, hi = self.world.row_range(n)
        rows = open_memmap(path, mode="r+")
        for positions, logits in predict_batches(model, self.dataset, np.arange(lo, hi), self.device, self.amp_dtype):
            rows[positions] = softmax_minus_onehot(logits, labels[positions])
        rows.flush()
        del rows
        barrier(self.world)
        return np.load(path, mmap_mode="r")

    def scout_summary(self, seed: int) -> list[dict[str, int]]:
        """Each stored scout's seed (of a run trained with `seed`) and the number of examples its first round isolated."""
        return [
            {"seed": scout_seed(seed, j), "isolated": len(scout["isolated"])}
            for j, scout in self.stored_scouts().items()
        ]

    def scout_work(self, batch_size: int) -> tuple[int, int]:
        """(examples trained on, examples scored) by the scouts, as `scout_work_counts` counts them."""
        return scout_work_counts(self._log_record(), len(self.dataset), batch_size)

    def scored_rounds(self) -> list[int]:
        """The rounds that scored every example (after the run: every planned round until the cap was reached)."""
        return scored_rounds(self._log_record())

    def dropped(self) -> np.ndarray:
        return np.array([row["position"] for row in self.log], dtype=np.int64)

    def _read_log(self) -> list[dict]:
        if not self.log_path.exists():
            return []
        return json.loads(self.log_path.read_text())["dropped"]

    def _write_log(self) -> None:
        if not self.world.is_main:  # every rank holds the same log (the ranks share the isolated examples)
            return
        write_atomic(self.log_path, json.dumps(self._log_record(), indent=1))

    def _log_record(self) -> dict:
        return {"config": asdict(self.config), "rounds": self.rounds, "cap": self.cap, "dropped": self.log}


def scored_rounds(log: dict) -> list[int]:
    """The rounds of a finished run's drop log (its JSON) that scored every example: each planned round that began
    with fewer examples dropped than the cap."""
    drops = [row["round"] for row in log["dropped"]]
    return [r for r in log["rounds"] if sum(d < r for d in drops) < log["cap"]]


def scout_work_counts(log: dict, size: int, batch_size: int) -> tuple[int, int]:
    """(examples trained on, examples scored) by a finished run's scouts (none unless its first round was pooled and
    ran): each trained to the first round on all `size` examples and scored them there."""
    scouts = log["config"].get("pool_runs", 1) - 1
    if not scouts or not log["rounds"] or log["rounds"][0] not in scored_rounds(log):
        return 0, 0
    return scouts * trained_examples(size, log["rounds"][0], batch_size), scouts * size


def robust_work_counts(log: dict, size: int, epochs: int, batch_size: int) -> tuple[int, int]:
    """(examples trained on, examples scored) by a finished single-process robust run of `epochs` on `size` examples,
    its scouts included, from its drop log alone (sanitize.work), so a cached model that kept no history counts too."""
    trained = trained_examples(size, epochs, batch_size, [row["round"] for row in log["dropped"]])
    scout_trained, scout_scored = scout_work_counts(log, size, batch_size)
    return trained + scout_trained, len(scored_rounds(log)) * size + scout_scored
