"""Models trained from scratch (surrogates and victims), cached by everything they depend on.

A model is named by the data's fingerprint, the architecture, the recipe, the seed (and robust training's settings),
so a rerun, another process or another evaluation sharing the cache loads it instead of training it again (one that
asks while it is being trained waits for it); an interrupted training resumes from its last epoch.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch

from attacks.locks import exclusive
from sanitize.config import RobustConfig, TrainConfig
from sanitize.data import ImageDataset
from sanitize.friendly import friendly_passes
from sanitize.models import Classifier, create_model
from sanitize.robust import EpicDropper, ScoutDone, robust_work_counts, scout_seed
from sanitize.training import milestone_epochs, save_atomic, train_model
from sanitize.work import example_flops, phase_work, trained_examples


def stable_hash(*parts: Any) -> str:
    """16 hex digits naming `parts` (JSON with sorted keys: field order and int/float spelling do not matter)."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


class Cost(NamedTuple):
    """Wall seconds, process CPU seconds on a CPU device (None elsewhere, or for runs cached before they were kept),
    and model FLOPs (sanitize.work: what neither the device nor the machine's load changes)."""

    wall: float
    cpu: float | None
    flops: float | None = None


@dataclasses.dataclass
class ModelCache:
    """Train-or-load for one architecture and recipe; models share the input normalisation (mean, std)."""

    directory: Path
    model: str
    model_kwargs: dict[str, Any]
    recipe: TrainConfig
    num_classes: int
    image_size: tuple[int, int]
    mean: torch.Tensor
    std: torch.Tensor
    device: torch.device
    amp: torch.dtype | None
    progress: bool = True
    robust_config: RobustConfig = dataclasses.field(default_factory=RobustConfig)  # robust training's settings

    def new_model(self, seed: int) -> Classifier:
        torch.manual_seed(seed)
        model = create_model(self.model, self.num_classes, (3, *self.image_size), **self.model_kwargs)
        model.set_normalization(self.mean, self.std)
        return model

    def path(self, data: ImageDataset, seed: int, tag: str, robust: bool = False) -> Path:
        """Where the model trained on `data` with `seed` is cached; a robust model's drop log lies beside it
        (.drop_log.json)."""
        parts = [data.fingerprint, self.model, self.model_kwargs, self.recipe.identity(), seed]
        if robust:
            parts.append(self.robust_config.identity())
        return self.directory / f"{tag}-{stable_hash(*parts)}.pt"

    def trained(self, data: ImageDataset, seed: int, tag: str, robust: bool = False) -> tuple[Classifier, Cost]:
        """A model trained from scratch on `data` with `seed` (or loaded from the cache), and what its training cost
        (summed over epochs, so a resumed run counts every epoch once). With `robust`, EPIC's dropping
        (sanitize.robust) runs during training. One process at a time trains a model: another that asks for it
        meanwhile waits and loads it; a finished model (written whole, by a rename) loads without waiting."""
        final = self.path(data, seed, tag, robust)
        if final.exists():
            return self._load_or_train(final, data, seed, tag, robust)
        with exclusive(final.with_suffix(".lock"), waiting=f"{final.name} is being trained"):
            return self._load_or_train(final, data, seed, tag, robust)

    def _load_or_train(
        self, final: Path, data: ImageDataset, seed: int, tag: str, robust: bool
    ) -> tuple[Classifier, Cost]:
        partial = final.with_suffix(".partial.pt")
        model = self.new_model(seed)
        if final.exists():
            state = torch.load(final, map_location="cpu", weights_only=True)
            model.load_state_dict(state["model"])
            return model, Cost(float(state["seconds"]), state.get("cpu_seconds"), self.work(data, seed, tag, robust))
        self.directory.mkdir(parents=True, exist_ok=True)
        recipe = dataclasses.replace(self.recipe, seed=seed)
        dropper = None
        if robust:
            drop_log = final.with_suffix(".drop_log.json")
            last = max(milestone_epochs(recipe))
            dropper = EpicDropper(
                data,
                self.robust_config,
                recipe.epochs,
                last,
                drop_log,
                self.device,
                self.amp,
                train_scout=lambda j, hook: self._train_scout(final, data, scout_seed(seed, j), hook),
            )
        history = train_model(
            model,
            data,
            np.arange(len(data)),
            recipe,
            self.device,
            self.amp,
            checkpoint=partial,
            meta={"name": final.stem},
            progress=self.progress,
            desc=tag,
            after_epoch=dropper,
        )
        cpu = [epoch.get("cpu_seconds") for epoch in history]  # a run resumed from an older checkpoint lacks some
        on_cpu = self.device.type == "cpu" and None not in cpu
        scout_wall, scout_cpu = dropper.scout_seconds() if dropper else (0.0, 0.0)
        wall, cpu = sum(epoch["seconds"] for epoch in history) + scout_wall, sum(cpu) + scout_cpu if on_cpu else None
        save_atomic({"model": model.state_dict(), "seconds": wall, "cpu_seconds": cpu}, final)
        partial.unlink(missing_ok=True)
        return model, Cost(wall, cpu, self.work(data, seed, tag, robust))

    def _train_scout(self, final: Path, data: ImageDataset, seed: int, hook: Any) -> None:
        """Robust training's scout with `seed`: trained from scratch on `data` until `hook` stops it at the first round
        (sanitize.robust); resumable from a checkpoint beside `final`, removed once the round is stored."""
        checkpoint = final.with_suffix(f".scout-seed{seed}.partial.pt")
        try:
            train_model(
                self.new_model(seed),
                data,
                np.arange(len(data)),
                dataclasses.replace(self.recipe, seed=seed),
                self.device,
                self.amp,
                checkpoint=checkpoint,
                meta={"name": final.stem, "scout_seed": str(seed)},
                progress=self.progress,
                desc=f"scout {seed}",
                after_epoch=hook,
            )
        except ScoutDone:
            checkpoint.unlink(missing_ok=True)
            raise

    def work(self, data: ImageDataset, seed: int, tag: str, robust: bool = False) -> float:
        """The model FLOPs of training on `data` (sanitize.work), counted from the recipe and, for robust training,
        the drop log: the same for a model trained now and one loaded from the cache."""
        flops = example_flops(self.model, self.num_classes, (3, *self.image_size), **self.model_kwargs)
        size, epochs, batch_size = len(data), self.recipe.epochs, self.recipe.batch_size
        friendly = friendly_passes(self.recipe, size)  # noise found for every example, before any is dropped
        if not robust:
            return phase_work(flops, trained_examples(size, epochs, batch_size) + friendly, 0)["flops"]
        log = json.loads(self.path(data, seed, tag, robust).with_suffix(".drop_log.json").read_text())
        trained, scored = robust_work_counts(log, size, epochs, batch_size)
        return phase_work(flops, trained + friendly, scored)["flops"]
