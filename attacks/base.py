"""The threat model of targeted clean-label poisoning, the poison set it produces, and lossless writing.

A poison key picks, deterministically: the target class, the intended (adversarial) class, one target image from the
test set, and `budget x N` training images of the intended class to perturb. Perturbations live in an l-inf ball of
radius eps (0..255 units) and the valid pixel range, and are stored as integers so that the poisoned images written
to PNG or npz read back bit-exactly.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import shutil
import zipfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from attacks.recolor import largest_change
from sanitize.data import ImageDataset, write_atomic
from sanitize.errors import SanitizeError
from sanitize.manifest import MANIFEST, TARGET_IMAGE
from sanitize.training import autocast

WRITABLE_KINDS = ("npz", "folder")  # the data a poisoned copy is written for (write_poisoned)


@dataclass(frozen=True)
class PoisonSetup:
    """What a poison key picks. Positions index the train / test datasets; ids are their stable names."""

    key: int
    target_class: int
    intended_class: int
    target_index: int
    target_id: str
    poison_indices: tuple[int, ...]


def choose_setup(key: int, train: ImageDataset, test: ImageDataset, budget: float) -> PoisonSetup:
    """Deterministic choice from the key alone (and the data): repeatable runs, as the poisoning benchmark does."""
    rng = np.random.default_rng([int(key), 20210112])
    num_classes = train.num_classes
    target_class = int(rng.integers(num_classes))
    intended_class = int((target_class + rng.integers(1, num_classes)) % num_classes)
    candidates = np.flatnonzero(test.labels == target_class)
    if len(candidates) == 0:
        raise SanitizeError(f"the test set has no image of class {target_class} to target")
    target_index = int(rng.choice(candidates))
    count = max(1, round(budget * len(train)))
    pool = np.flatnonzero(train.labels == intended_class)
    if count > len(pool):
        raise SanitizeError(
            f"budget {budget} asks for {count} poisons but class {intended_class} has {len(pool)} images"
        )
    poison_indices = tuple(int(i) for i in np.sort(rng.choice(pool, count, replace=False)))
    return PoisonSetup(key, target_class, intended_class, target_index, test.ids[target_index], poison_indices)


@dataclass
class PoisonSet:
    """Integer perturbations (P, 3, H, W) in 0..255 units for `setup.poison_indices`, and how they were made. With
    ReColor, `colour` holds each poison's colour map (P, 3, G, G, G; attacks.recolor) and `deltas` the whole change:
    the colour map's plus the additive part, which is within eps of the recoloured image."""

    setup: PoisonSetup
    eps: float
    deltas: torch.Tensor  # int16
    method: str
    metadata: dict[str, Any] = field(default_factory=dict)
    colour: torch.Tensor | None = None  # float32 colour-map perturbations in YUV units

    def reach(self) -> int:
        """The largest change of a pixel these poisons may make: eps, plus what the colour maps can add."""
        if self.colour is None:
            return math.floor(self.eps)
        return math.floor(self.eps) + largest_change(float(self.colour.abs().max()))

    def apply(self, clean: torch.Tensor) -> torch.Tensor:
        """Poisoned uint8 images from the clean uint8 images of the poison positions."""
        return (clean.to(torch.int16) + self.deltas).clamp_(0, 255).to(torch.uint8)

    def digest(self) -> str:
        """sha256 of the positions and the perturbations (16 hex digits): names these exact poisons, since crafting the
        same key twice (another machine, thread count or torch build) gives other poisons."""
        content = hashlib.sha256(np.asarray(self.setup.poison_indices, dtype=np.int64).tobytes())
        content.update(self.deltas.to(torch.int16).contiguous().numpy().tobytes())
        return content.hexdigest()[:16]


def stored_poisons(places: list[Path], setup: PoisonSetup) -> PoisonSet | None:
    """The poisons from the first of `places` that holds them, copied to the others (a cache and the copy published
    beside the results); None when none does."""
    for stored in places:
        if stored.exists():
            poisons = load_poisons(stored, setup)
            keep_poisons(poisons, places)
            return poisons
    return None


def keep_poisons(poisons: PoisonSet, places: list[Path]) -> None:
    """Save the poisons to each of `places` that does not hold them yet."""
    for place in places:
        if not place.exists():
            save_poisons(poisons, place)


def save_poisons(poisons: PoisonSet, path: Path) -> None:
    """The poison set as a compressed npz (deltas, poison positions, eps, method, metadata as JSON): lossless, readable
    without pickle, ~130 KB for 100 CIFAR poisons; with ReColor also the colour maps. Written atomically: a kill
    leaves no half file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    colour = {} if poisons.colour is None else {"colour": poisons.colour.numpy().astype(np.float32)}
    np.savez_compressed(
        buffer,
        deltas=poisons.deltas.numpy(),
        poison_indices=np.asarray(poisons.setup.poison_indices),
        eps=poisons.eps,
        method=poisons.method,
        metadata=json.dumps(poisons.metadata),
        **colour,
    )
    write_atomic(path, buffer.getvalue())


def load_poisons(path: Path, setup: PoisonSetup) -> PoisonSet:
    """A poison set written by `save_poisons`, checked against the key's `setup`: a file for other poison positions, or
    a damaged one, is a clear error."""
    try:
        with np.load(path, allow_pickle=False) as stored:
            deltas, positions = stored["deltas"], stored["poison_indices"]
            eps, method, metadata = float(stored["eps"]), str(stored["method"]), json.loads(str(stored["metadata"]))
            colour = torch.from_numpy(stored["colour"].astype(np.float32)) if "colour" in stored else None
    except (OSError, ValueError, KeyError, zipfile.BadZipFile) as error:
        raise SanitizeError(f"{path} is not a poison set written by sanitize ({error})") from None
    if tuple(int(i) for i in positions) != setup.poison_indices or deltas.shape[0] != len(positions):
        raise SanitizeError(f"{path} holds poisons for other positions than key {setup.key} picks")
    if colour is not None and (colour.ndim != 5 or len(colour) != len(positions) or not torch.isfinite(colour).all()):
        raise SanitizeError(f"{path} has colour maps that do not fit its poisons")
    poisons = PoisonSet(setup, eps, torch.from_numpy(deltas.astype(np.int16)), method, metadata, colour)
    if np.abs(deltas).max(initial=0) > poisons.reach():
        raise SanitizeError(f"{path} has perturbations larger than its eps {eps:g} (and colour maps) allow")
    return poisons


def surrogate_features(model, x: torch.Tensor, amp_dtype: torch.dtype | None) -> torch.Tensor:
    """A model's penultimate features of `x` under autocast, in float32 (differentiable in `x`)."""
    with autocast(x.device, amp_dtype):
        return model.features(x).float()


def random_shift_flip(x: torch.Tensor, max_shift: int = 4, generator: torch.Generator | None = None) -> torch.Tensor:
    """Differentiable augmentation: per-sample random translation up to `max_shift` px and horizontal flip, through
    `grid_sample`, so gradients reach the perturbation through the same augmentations victims train with."""
    batch, _, height, width = x.shape
    shift = (torch.rand(batch, 2, generator=generator) * 2 - 1) * max_shift
    flip = torch.where(torch.rand(batch, generator=generator) < 0.5, -1.0, 1.0)
    theta = torch.zeros(batch, 2, 3)
    theta[:, 0, 0] = flip
    theta[:, 1, 1] = 1.0
    theta[:, 0, 2] = shift[:, 0] * 2 / width
    theta[:, 1, 2] = shift[:, 1] * 2 / height
    grid = F.affine_grid(theta.to(x), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def manifest(
    poisons: PoisonSet, train: ImageDataset, poisoned_ids: list[str], poisoned_paths: list[str], seed: int
) -> dict[str, Any]:
    setup = poisons.setup
    return {
        "method": poisons.method,
        "eps": poisons.eps,
        "budget": len(setup.poison_indices) / len(train),
        "key": setup.key,
        "seed": seed,
        "target_id": setup.target_id,
        "target_index": setup.target_index,
        "target_class": setup.target_class,
        "intended_class": setup.intended_class,
        "classes": train.classes,
        "poison_indices": list(setup.poison_indices),
        "poison_ids": poisoned_ids,
        "poison_paths": poisoned_paths,
        "source": train.source,
        "source_fingerprint": train.fingerprint,
        "metadata": poisons.metadata,
        # the two parts of the change: the additive one within eps; ReColor's colour maps (in the poison set's npz)
        "recolor": None
        if poisons.colour is None
        else {"grid": poisons.colour.shape[-1], "largest_yuv_change": float(poisons.colour.abs().max())},
        "largest_pixel_change": int(poisons.deltas.abs().max()) if len(poisons.deltas) else 0,
    }


def write_poisoned(
    train: ImageDataset, poisons: PoisonSet, out: Path, seed: int = 0, target_image: torch.Tensor | None = None
) -> Path:
    """A poisoned copy of `train` plus poison_manifest.json: `out`.npz for arrays, an ImageFolder of PNGs otherwise;
    with `target_image` (uint8, 3 x H x W) also target.png, so an audit report can show what the poisons aimed at.

    The source is never modified. Poisoned folder images are written as PNG (JPEG would destroy the perturbation).
    """
    if train.kind not in WRITABLE_KINDS:
        raise SanitizeError(f"poisoned copies are written for ImageFolder or .npz data, not {train.kind}")
    positions = np.asarray(poisons.setup.poison_indices)
    poisoned = poisons.apply(train.load_batch(positions)[0])
    if train.kind == "npz":
        out.mkdir(parents=True, exist_ok=True)
        images = np.array(train.images, copy=True)
        if images.shape[-1] == 1:
            images = np.repeat(images, 3, axis=-1)
        images[positions] = poisoned.permute(0, 2, 3, 1).numpy()
        np.savez(out / "data.npz", x=images, y=train.labels, classes=np.array(train.classes))
        ids, paths = [str(p) for p in positions], ["" for _ in positions]
    else:
        ids, paths = _write_folder_copy(train, positions, poisoned, out)
    record = manifest(poisons, train, ids, paths, seed)
    if target_image is not None:
        Image.fromarray(target_image.permute(1, 2, 0).numpy()).save(out / TARGET_IMAGE)
        record["target_image"] = TARGET_IMAGE
    (out / MANIFEST).write_text(json.dumps(record, indent=1))
    return out


def _write_folder_copy(
    train: ImageDataset, positions: np.ndarray, poisoned: torch.Tensor, out: Path
) -> tuple[list[str], list[str]]:
    """Copy every clean file as it is (hard link where possible) and write the poisons as PNG under data/."""
    root = out / "data"
    replaced = {int(p): poisoned[i] for i, p in enumerate(positions)}
    ids, paths = [], []
    for index, rel in enumerate(train.ids):
        destination = root / rel
        destination.parent.mkdir(parents=True, exist_ok=True)
        if index in replaced:
            destination = destination.with_suffix(".png")
            Image.fromarray(replaced[index].permute(1, 2, 0).numpy()).save(destination)
            ids.append(destination.relative_to(root).as_posix())
            paths.append(str(destination))
        else:
            try:
                os.link(train.paths[index], destination)
            except OSError:
                shutil.copyfile(train.paths[index], destination)
    return ids, paths


def setup_as_dict(setup: PoisonSetup) -> dict[str, Any]:
    return asdict(setup)
