"""The crafting loop every registered attack runs on: restarts, the optimiser, projection, quantisation, checkpoints.

Perturbations are optimised in normalised units (delta / the data's std, as the reference implementations do) from a
Gaussian start inside eps (or uniform in it: `start`), by Adam fed with the sign of the gradient (signed Adam, Witches'
Brew's choice; plain Adam with `signed` off, MetaPoison's) at `lr`,
decayed x0.1 at the `milestones` fractions of the iterations, and projected after every step onto the eps ball and the
pixel range. The gradient of all batches of poisons is accumulated before each step, so the result does not depend on
the batch size. Of R restarts the one with the lowest final loss is kept; with a checkpoint the best restart so far is
saved after every restart, and a killed run resumes from it to the same result. Deltas are returned as integers.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from attacks.base import PoisonSet, PoisonSetup
from attacks.registry import get_attack
from sanitize.data import ImageDataset
from sanitize.errors import SanitizeError
from sanitize.models import Classifier
from sanitize.training import autocast, save_atomic


@dataclass
class CraftingOptions:
    """What the loop takes from every attack's options (an attack's dataclass extends this one)."""

    iterations: int = 250
    restarts: int = 8
    lr: float = 0.1  # in normalised units
    milestones: tuple[float, ...] = (3 / 8, 5 / 8, 7 / 8)  # fractions of the iterations where lr drops x0.1
    batch_size: int = 512
    seed: int = 0
    # re-train the surrogates from scratch on the data with the current poisons every this many iterations and craft
    # on against the new ones (Sleeper Agent: every 50 of 250); 0: never. Needs a way to re-train (the evaluation's)
    retrain_every: int = 0
    # which images of the intended class to perturb: the key's random pick, or those with the largest training gradient
    # on the surrogate(s) ("gradient-norm", attacks.selection); the evaluation applies it before crafting
    selection: str = "random"
    signed: bool = True  # Adam on the sign of the gradient (Witches' Brew) or on the gradient itself (MetaPoison)
    start: str = "gaussian"  # the perturbation's start: gaussian (sd eps, clipped) or uniform in the eps ball


# options added after poisons were first cached, at the value that crafts as before: left out of a poison set's name
IDENTITY_DEFAULTS = {"retrain_every": 0, "selection": "random", "signed": True, "start": "gaussian"}


def options_identity(options: Any) -> dict[str, Any]:
    """What names a poison set's options: every option, less the later ones at the value that crafts as before (so
    poisons cached before those options existed keep their names)."""
    return {k: v for k, v in dataclasses.asdict(options).items() if IDENTITY_DEFAULTS.get(k, object()) != v}


# re-trains the surrogates on the data with these integer deltas at the poison positions, after this many iterations
Retrain = Callable[[torch.Tensor, int], list[Classifier]]


def parameter_gradient(
    model: Classifier, x: torch.Tensor, y: torch.Tensor, create_graph: bool, amp_dtype: torch.dtype | None
) -> list[torch.Tensor]:
    """grad_theta of the mean cross-entropy over (x, y), one tensor per parameter."""
    with autocast(x.device, amp_dtype):
        loss = F.cross_entropy(model(x).float(), y)
    params = [p for p in model.parameters() if p.requires_grad]
    return list(torch.autograd.grad(loss, params, create_graph=create_graph))


def quantize(clean: torch.Tensor, poisoned: torch.Tensor, eps: float) -> torch.Tensor:
    """int16 deltas of float images in [0, 1]: rounded to whole grey levels, inside eps and the pixel range."""
    target = (poisoned.detach().float() * 255).round().clamp(0, 255)
    bound = math.floor(eps)
    delta = (target - clean.float()).clamp(-bound, bound)
    return delta.to(torch.int16)


def project(delta: torch.Tensor, clean: torch.Tensor, bound: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """Onto the eps ball and so that clean + delta stays inside [0, 1] (delta in normalised units)."""
    delta = torch.max(torch.min(delta, bound), -bound)
    return torch.max(torch.min(delta, (1 - clean) / std), -clean / std)


def craft(
    name: str,
    surrogates: list[Classifier],
    train: ImageDataset,
    target_image: torch.Tensor,
    setup: PoisonSetup,
    eps: float,
    options: Any,
    device: torch.device,
    amp_dtype: torch.dtype | None = None,
    progress: bool = True,
    checkpoint: Path | None = None,
    retrain: Retrain | None = None,
) -> PoisonSet:
    """Craft the poisons for `setup` with the registered attack `name` against its surrogate(s); with
    `options.retrain_every`, `retrain` gives new surrogates trained on the current poisons."""
    if options.retrain_every and retrain is None:
        raise SanitizeError("retrain_every needs surrogates that can be re-trained (sanitize evaluate provides them)")
    if options.start not in ("gaussian", "uniform"):
        raise SanitizeError(f"start must be gaussian or uniform, not {options.start!r}")
    target = target_image.to(device)

    def attack_on(models: list[Classifier]) -> Any:
        for model in models:
            model.to(device).eval()
            for p in model.parameters():
                p.requires_grad_(True)
        return get_attack(name)(options, models, target, setup, device, amp_dtype, train)

    positions = np.asarray(setup.poison_indices)
    clean_uint8, labels, _ = train.load_batch(positions)
    clean = clean_uint8.float().div(255).to(device)
    labels = labels.to(device)
    std = surrogates[0].std.to(device)
    bound = eps / 255 / std
    generator = torch.Generator().manual_seed(options.seed)
    identity = json.dumps(options_identity(options), sort_keys=True)
    best_delta, best_loss, losses_per_restart, done, spent = None, float("inf"), [], 0, 0.0
    if checkpoint is not None and checkpoint.exists():
        state = torch.load(checkpoint, map_location="cpu", weights_only=True)
        if state["config"] == identity:
            best_delta, best_loss = state["best_delta"].to(device), state["best_loss"]
            done, spent, losses_per_restart = state["restarts_done"], state["seconds"], state["losses_per_restart"]
            generator.set_state(state["generator"])

    def after(iteration: int, delta: torch.Tensor) -> Any | None:
        """The attack on new surrogates, trained on the current poisons, when this iteration re-trains; else None."""
        if not options.retrain_every or iteration % options.retrain_every:
            return None
        deltas = quantize(clean_uint8, (clean + delta.detach() * std).cpu(), eps)
        return attack_on(retrain(deltas, iteration))

    started = time.perf_counter() - spent
    for restart in range(done, options.restarts):
        if options.start == "gaussian":
            noise = torch.randn(clean.shape, generator=generator)
        else:
            noise = torch.rand(clean.shape, generator=generator) * 2 - 1
        delta = (noise.to(device) * bound).clamp(-bound, bound)
        delta = project(delta, clean, bound, std).requires_grad_(True)

        history = _optimise(
            attack_on(surrogates), after, delta, clean, labels, bound, std, options, generator, restart, progress
        )
        losses_per_restart.append(history)
        if history[-1] < best_loss:
            best_loss, best_delta = history[-1], delta.detach().clone()
        if checkpoint is not None:
            state = {"config": identity, "best_delta": best_delta.cpu(), "best_loss": best_loss}
            state |= {"restarts_done": restart + 1, "losses_per_restart": losses_per_restart}
            state |= {"generator": generator.get_state(), "seconds": time.perf_counter() - started}
            save_atomic(state, checkpoint)
    deltas = quantize(clean_uint8, (clean + best_delta * std).cpu(), eps)
    finals = [h[-1] for h in losses_per_restart]
    metadata = {
        "config": dataclasses.asdict(options),
        "final_loss_per_restart": finals,
        "loss_history_best": losses_per_restart[int(np.argmin(finals))],
        "surrogates": len(surrogates),
        "seconds": round(time.perf_counter() - started, 2),
        "precision": "bf16" if amp_dtype is not None else "fp32",
    }
    return PoisonSet(setup=setup, eps=eps, deltas=deltas, method=name, metadata=metadata)


def _optimise(attack, after, delta, clean, labels, bound, std, options, generator, restart, progress) -> list[float]:
    """One restart: signed Adam with step decay on `delta` (in place); the loss of every iteration. `after(i, delta)`
    may return the attack on re-trained surrogates to craft on against from iteration i on."""
    optimizer = torch.optim.Adam([delta], lr=options.lr)
    steps = sorted({int(options.iterations * f) for f in options.milestones})
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, steps, gamma=0.1)
    count, history = len(clean), []
    desc = f"craft restart {restart + 1}/{options.restarts}"
    bar = tqdm(range(options.iterations), desc=desc, leave=False, disable=not progress)
    for iteration in bar:
        attack = (iteration and after(iteration, delta)) or attack
        optimizer.zero_grad()
        total = 0.0
        for start in range(0, count, options.batch_size):
            part = slice(start, start + options.batch_size)
            loss = attack.loss(clean[part] + delta[part] * std, labels[part], generator)
            weight = (min(count, start + options.batch_size) - start) / count
            (loss * weight).backward()
            total += float(loss.detach()) * weight
        if options.signed:
            delta.grad.sign_()
        optimizer.step()
        scheduler.step()
        with torch.no_grad():
            delta.copy_(project(delta, clean, bound, std))
        attack.advance(iteration, generator)
        history.append(total)
        bar.set_postfix(loss=f"{total:.4f}")
    return history
