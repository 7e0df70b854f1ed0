"""The attacker's surrogates: trained once on the clean data with seeds no victim uses, cached, and published beside
the results (e.g. OUT/surrogates/), so that a run on another machine loads them instead of training others and
carriers and crafting are measured on the same models everywhere. `sanitize attack` and `sanitize evaluate` both
get their surrogates here."""

from __future__ import annotations

import shutil
from pathlib import Path

from attacks.trained import Cost, ModelCache
from sanitize.data import ImageDataset
from sanitize.models import Classifier

SURROGATE_SEED = 10_000  # victims use seeds 0..V-1; the attacker's surrogates never share one


def surrogates(
    cache: ModelCache, data: ImageDataset, published: Path | None, count: int = 1, seed: int = SURROGATE_SEED
) -> tuple[list[Classifier], Cost]:
    """`count` surrogates (an ensemble when > 1) with seeds seed, seed + 1, ...; their summed training cost."""
    models, wall, cpu = [], 0.0, 0.0
    for index in range(count):
        model, cost = surrogate(cache, data, published, seed + index)
        models.append(model)
        wall += cost.wall
        cpu = None if cpu is None or cost.cpu is None else cpu + cost.cpu
    return models, Cost(wall, cpu)


def surrogate(cache: ModelCache, data: ImageDataset, published: Path | None, seed: int) -> tuple[Classifier, Cost]:
    return published_model(cache, data, published, seed, "surrogate")


def published_model(
    cache: ModelCache, data: ImageDataset, published: Path | None, seed: int, tag: str
) -> tuple[Classifier, Cost]:
    """The model `cache` trains on `data` with `seed`, copied into `published` once trained and taken from there when
    the cache lacks it (a machine without the cache)."""
    cached = cache.path(data, seed, tag)
    copy = published / cached.name if published is not None else None
    if copy is not None and copy.exists() and not cached.exists():
        cached.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(copy, cached)
    model, cost = cache.trained(data, seed, tag)
    if copy is not None and not copy.exists():
        copy.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(cached, copy)
    return model, cost
