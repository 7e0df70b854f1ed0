"""`sanitize attack` as a function: surrogate, setup from the key, crafting, lossless poisoned copy + manifest."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import torch

from attacks import attack_options, choose_setup, craft
from attacks.base import WRITABLE_KINDS, write_poisoned
from attacks.crafting import options_identity
from attacks.experiment import scan_proxy_trainer, surrogate_retrainer
from attacks.selection import select_poisons
from attacks.surrogates import surrogate as cached_surrogate
from attacks.trained import ModelCache, stable_hash
from sanitize.config import TrainConfig
from sanitize.data import ensure_outside, open_dataset
from sanitize.data.arrays import ArrayDataset
from sanitize.errors import SanitizeError
from sanitize.manifest import read_manifest
from sanitize.models import create_model, load_weights
from sanitize.training import channel_stats, resolve_device, resolve_precision


def attack_dataset(
    data: str | Path,
    test: str | Path,
    out: str | Path,
    method: str = "gradient-matching",
    key: int = 0,
    budget: float = 0.01,
    eps: float = 16.0,
    surrogate: str | None = None,
    epochs: int = 40,
    model: str = "convnet",
    device: str = "auto",
    seed: int = 0,
    progress: bool = True,
    **craft_options: Any,
) -> dict[str, Any]:
    """Craft poisons for poison key `key` against DATA; returns the manifest written beside the poisoned copy. The
    surrogate is `surrogate`'s weights, or one trained on DATA with `seed` and kept in OUT/surrogates/ (a rerun loads
    it), as are the models that `retrain_every` and `evade_space=proxy` train on the current poisons (.npz data). The
    craft saves itself there as it goes: a killed run, started again with the same arguments, resumes."""
    out = Path(out)
    data, test = Path(data), Path(test)
    ensure_outside(data, out)
    options = attack_options(method, seed=seed, **craft_options)  # a bad option fails before any training
    train_set = open_dataset(data, progress=progress)
    if train_set.kind not in WRITABLE_KINDS:  # before crafting, not after it
        raise SanitizeError(f"poisoned copies are written for ImageFolder or .npz data, not {train_set.kind}")
    retrains = options.retrain_every or (options.evade and options.evade_space == "proxy")
    if retrains and not isinstance(train_set, ArrayDataset):  # before any training
        raise SanitizeError(
            "retrain_every and evade_space=proxy train models on the current poisons: they need .npz data"
        )
    test_set = open_dataset(test, progress=progress)
    setup = choose_setup(key, train_set, test_set, budget)
    run_device = resolve_device(device)
    amp = resolve_precision("auto", run_device)
    models = out / "surrogates"
    cache = retrain = proxies = None
    if not surrogate or retrains:  # models to train here
        mean, std = channel_stats(train_set)
        cache = ModelCache(
            models,
            model,
            {},
            TrainConfig(epochs=epochs),
            train_set.num_classes,
            train_set.image_size,
            mean,
            std,
            run_device,
            amp,
            progress,
        )
    if surrogate:
        torch.manual_seed(seed)
        net = create_model(model, train_set.num_classes, (3, *train_set.image_size))
        load_weights(net, Path(surrogate))
        surrogate_identity = hashlib.sha256(Path(surrogate).read_bytes()).hexdigest()
    else:
        net, _ = cached_surrogate(cache, train_set, None, seed)
        surrogate_identity = (model, cache.recipe.identity(), seed)
    setup = select_poisons(setup, options.selection, [net], train_set)
    if retrains:
        retrain = surrogate_retrainer(cache, train_set, setup, eps, method, 1)
        proxies = scan_proxy_trainer(cache, train_set, setup, eps, method, options.evade_seed, options.evade_model)
    target = test_set.load_image(setup.target_index)
    digest = stable_hash(train_set.fingerprint, key, eps, budget, options_identity(options), surrogate_identity)
    models.mkdir(parents=True, exist_ok=True)
    checkpoint = models / f"craft-{method}-key{key}-{digest}.partial.pt"
    poisons = craft(
        method, [net], train_set, target, setup, eps, options, device=run_device, amp_dtype=amp, progress=progress,
        checkpoint=checkpoint, retrain=retrain, proxies=proxies,
    )  # fmt: skip
    write_poisoned(train_set, poisons, out, seed=seed, target_image=target)
    checkpoint.unlink(missing_ok=True)
    return read_manifest(out)
