"""The crafting loop every registered attack runs on: restarts, the optimiser, projection, quantisation, checkpoints.

Perturbations are optimised in normalised units (delta / the data's std, as the reference implementations do) from a
Gaussian start inside eps (or uniform in it, or none: `start`), by Adam fed with the sign of the gradient (signed Adam, Witches'
Brew's choice; plain Adam with `signed` off, MetaPoison's) at `lr`, decayed x0.1 at the `milestones` fractions of the
iterations, and projected after every step onto the eps ball and the pixel range. With `recolor`, each poison also
gets a colour map (attacks.recolor) applied before the additive part, optimised alongside it in units of its bound. The
gradient of all batches of poisons is accumulated before each step, so the result does not depend on the batch size.
Of R restarts the one with the lowest final loss is kept; with a checkpoint the best restart so far is saved after
every restart, and within a restart every `save_every` seconds (the perturbation, the optimiser, the random state and
the attack's own moving state, `Attack.state_dict`, and what re-trained surrogates and the evasion's proxies last
trained on, attacks.refresh), so that a killed run resumes where it was to the same result. Deltas are returned as
integers.
"""

from __future__ import annotations

import dataclasses
import functools
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

from attacks.adaptive import DensityEvasion, FeatureAnchor
from attacks.base import PoisonSet, PoisonSetup
from attacks.recolor import largest_change, project_colour, recolor, smoothness
from attacks.refresh import RefreshedModels
from attacks.registry import get_attack
from sanitize.data import ImageDataset
from sanitize.errors import SanitizeError
from sanitize.models import Classifier, list_models
from sanitize.training import autocast, precision_name, save_atomic
from sanitize.wording import unknown


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
    # the perturbation's start: gaussian (sd eps, clipped), uniform in the eps ball, or zero (the clean images)
    start: str = "gaussian"
    # ReColor before the additive perturbation (MetaPoison's reference default; attacks.recolor): a smooth colour map
    # per poison, each grid point within recolor_bound (YUV units) of the identity, its smoothness penalised
    recolor: bool = False
    recolor_bound: float = 0.04
    recolor_grid: int = 10
    recolor_smoothness: float = 1.0
    # the adaptive attacker (attacks.adaptive), weights 0 in the plain attack: the feature-anchoring penalty, and the
    # evasion of the default scan's density rule in its `spread` or `clump` variant
    anchor: float = 0.0
    evade: float = 0.0
    evade_variant: str = "spread"
    evade_scope: str = "batch"  # which poisons the evasion's variant counts: the crafting batch's, or all
    # the space the evasion is computed in: the attack's surrogates, or proxies of the default scan's own recipe
    # trained on the data with the current poisons (attacks.refresh), trained again every
    # evade_refresh iterations (0: once, on the start's poisons). Needs a way to train them (the evaluation's)
    evade_space: str = "surrogate"
    evade_refresh: int = 20
    # the proxies' seeds: the attacker's own (`own`), or the default scan's (`scan`: the seed is part of the default,
    # so an attacker who knows the scan knows it; its proxies then start and order their data as the defender's do)
    evade_seed: str = "own"
    # the proxies' architecture: the default scan's (`scan`), or a registry name, the one a scan run with --model
    # trains (the attacker who knows a scan configured with another proxy), or several joined by "+" (e.g.
    # scan+resnet18_cifar_w16: a proxy of each, the evasion averaged over them; the attacker who knows scans read as one
    # gate by `sanitize combine`)
    evade_model: str = "scan"


# the loop's options that name one of a few choices
CHOICES = {
    "start": ("gaussian", "uniform", "zero"),
    "evade_variant": ("spread", "clump"),
    "evade_scope": ("batch", "all"),
    "evade_space": ("surrogate", "proxy"),
    "evade_seed": ("own", "scan"),
}

# options added after poisons were first cached, at the value that crafts as before: left out of a poison set's name
IDENTITY_DEFAULTS = {
    "retrain_every": 0,
    "selection": "random",
    "signed": True,
    "start": "gaussian",
    "recolor": False,
    "recolor_bound": 0.04,
    "recolor_grid": 10,
    "recolor_smoothness": 1.0,
    "anchor": 0.0,
    "evade": 0.0,
    "evade_variant": "spread",
    "evade_scope": "batch",
    "evade_space": "surrogate",
    "evade_refresh": 20,
    "evade_seed": "own",
    "evade_model": "scan",
}


def options_identity(options: Any) -> dict[str, Any]:
    """What names a poison set's options: every option, less the later ones at the value that crafts as before (so
    poisons cached before those options existed keep their names)."""
    return {k: v for k, v in dataclasses.asdict(options).items() if IDENTITY_DEFAULTS.get(k, object()) != v}


# how often a restart in progress is saved (a MetaPoison craft step at the full scale takes ~10 CPU-minutes)
SAVE_EVERY_SECONDS = 600.0

# re-trains the surrogates (or the evasion's proxies) on the data with these integer deltas at the poison positions,
# after this many iterations
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


@dataclass
class Perturbation:
    """What one restart optimises: the additive `delta` (normalised units) and, with ReColor, the colour maps'
    perturbation in units of `colour_bound` (so that one learning rate suits both)."""

    delta: torch.Tensor
    colour: torch.Tensor | None
    colour_bound: float

    @classmethod
    def restored(
        cls, delta: torch.Tensor, colour: torch.Tensor | None, colour_bound: float, device: torch.device
    ) -> Perturbation:
        """A perturbation as a checkpoint saved it, on `device`."""
        return cls(delta.to(device), None if colour is None else colour.to(device), colour_bound)

    def detached(self) -> Perturbation:
        colour = None if self.colour is None else self.colour.detach().clone()
        return Perturbation(self.delta.detach().clone(), colour, self.colour_bound)

    def parameters(self) -> list[torch.Tensor]:
        return [self.delta] if self.colour is None else [self.delta, self.colour]

    def colour_map(self, part: slice = slice(None)) -> torch.Tensor:
        return self.colour[part] * self.colour_bound

    def base(self, clean: torch.Tensor, part: slice = slice(None)) -> torch.Tensor:
        """The clean images of `part` under their colour maps (themselves without ReColor)."""
        return clean[part] if self.colour is None else recolor(clean[part], self.colour_map(part))

    def images(self, clean: torch.Tensor, std: torch.Tensor, part: slice = slice(None)) -> torch.Tensor:
        return self.base(clean, part) + self.delta[part] * std

    def penalty(self, smoothness_weight: float, part: slice) -> torch.Tensor | float:
        return 0.0 if self.colour is None else smoothness_weight * smoothness(self.colour_map(part))

    @torch.no_grad()
    def project(self, clean: torch.Tensor, bound: torch.Tensor, std: torch.Tensor) -> None:
        if self.colour is not None:
            self.colour.copy_(project_colour(self.colour_map(), self.colour_bound) / self.colour_bound)
        self.delta.copy_(project(self.delta, self.base(clean), bound, std))

    def deltas(self, clean_uint8: torch.Tensor, clean: torch.Tensor, std: torch.Tensor, eps: float) -> torch.Tensor:
        """The integer change of every pixel: the additive part within eps of the recoloured image."""
        with torch.no_grad():
            reach = eps if self.colour is None else math.floor(eps) + largest_change(self.colour_bound)
            return quantize(clean_uint8, self.images(clean, std).cpu(), reach)


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
    save_every: float = SAVE_EVERY_SECONDS,
    proxies: Retrain | None = None,
) -> PoisonSet:
    """Craft the poisons for `setup` with the registered attack `name` against its surrogate(s); with
    `options.retrain_every`, `retrain` gives new surrogates trained on the current poisons; with
    `options.evade_space` proxy, `proxies` trains the evasion's proxies on them."""
    for option, allowed in CHOICES.items():
        value = getattr(options, option)
        if value not in allowed:
            raise SanitizeError(f"{option} must be {', '.join(allowed[:-1])} or {allowed[-1]}, not {value!r}")
    if options.retrain_every and retrain is None:
        raise SanitizeError(
            "retrain_every needs surrogates that can be re-trained "
            "(sanitize evaluate, and sanitize attack on .npz data, provide them)"
        )
    by_proxy = options.evade and options.evade_space == "proxy"
    if by_proxy and proxies is None:
        raise SanitizeError(
            "evade_space=proxy needs proxies trained on the poisoned data "
            "(sanitize evaluate, and sanitize attack on .npz data, provide them)"
        )
    for architecture in options.evade_model.split("+"):
        if architecture not in ("scan", *list_models()):
            raise SanitizeError(unknown("evade_model", architecture, ["scan", *list_models()]))
    if options.evade_refresh < 0:
        raise SanitizeError(f"evade_refresh must be >= 0, not {options.evade_refresh}")
    if options.recolor and not (options.recolor_bound > 0 and options.recolor_grid >= 2):
        raise SanitizeError("recolor needs recolor_bound > 0 and recolor_grid >= 2")
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
    best, best_loss, losses_per_restart, done, spent = None, float("inf"), [], 0, 0.0
    within = None  # a restart interrupted in its middle: where it was
    if checkpoint is not None and checkpoint.exists():
        state = torch.load(checkpoint, map_location="cpu", weights_only=True)
        if state["config"] == identity:
            if state["best_delta"] is not None:
                best = Perturbation.restored(
                    state["best_delta"], state.get("best_colour"), options.recolor_bound, device
                )
            best_loss = state["best_loss"]
            done, spent, losses_per_restart = state["restarts_done"], state["seconds"], state["losses_per_restart"]
            generator.set_state(state["generator"])
            within = state.get("within")

    def deltas_of(perturbation: Perturbation) -> torch.Tensor:
        return perturbation.deltas(clean_uint8, clean, std, eps)

    def frozen(models: list[Classifier]) -> list[Classifier]:
        """The evasion's proxies: the gradient goes to the images only."""
        return [model.to(device).eval().requires_grad_(False) for model in models]

    started = time.perf_counter() - spent

    def save(restarts_done: int, within_restart: dict[str, Any] | None = None) -> None:
        """The checkpoint: the best restart so far and, in the middle of a restart, where that restart is."""
        state = {"config": identity, "best_delta": None if best is None else best.delta.cpu(), "best_loss": best_loss}
        if best is not None and best.colour is not None:
            state["best_colour"] = best.colour.cpu()
        state |= {"restarts_done": restarts_done, "losses_per_restart": losses_per_restart}
        state |= {"generator": generator.get_state(), "seconds": time.perf_counter() - started}
        save_atomic(state | ({"within": within_restart} if within_restart else {}), checkpoint)

    for restart in range(done, options.restarts):
        if within is not None:
            perturbation = Perturbation.restored(within["delta"], within.get("colour"), options.recolor_bound, device)
        else:
            perturbation = _start(clean, bound, std, options, generator, device)
        for parameter in perturbation.parameters():
            parameter.requires_grad_(True)
        models = RefreshedModels(retrain, deltas_of, options.retrain_every, initial=surrogates)
        refreshed = None
        if by_proxy:
            refreshed = RefreshedModels(lambda *at: frozen(proxies(*at)), deltas_of, options.evade_refresh)
        history = _optimise(
            attack_on,
            models,
            perturbation,
            clean,
            labels,
            bound,
            std,
            options,
            generator,
            restart,
            progress,
            resumed=within,
            save=None if checkpoint is None else functools.partial(save, restart),
            save_every=save_every,
            proxies=refreshed,
        )
        within = None
        losses_per_restart.append(history)
        if history[-1] < best_loss:
            best_loss = history[-1]
            best = perturbation.detached()
        if checkpoint is not None:
            save(restart + 1)
    deltas = best.deltas(clean_uint8, clean, std, eps)
    finals = [h[-1] for h in losses_per_restart]
    metadata = {
        "config": dataclasses.asdict(options),
        "final_loss_per_restart": finals,
        "loss_history_best": losses_per_restart[int(np.argmin(finals))],
        "surrogates": len(surrogates),
        "seconds": round(time.perf_counter() - started, 2),
        "precision": precision_name(amp_dtype),
    }
    colour_maps = None if best.colour is None else best.colour_map().cpu()
    return PoisonSet(setup=setup, eps=eps, deltas=deltas, method=name, metadata=metadata, colour=colour_maps)


def _start(clean, bound, std, options, generator, device) -> Perturbation:
    """A restart's first perturbation: `options.start` inside the eps ball, projected; colour maps at the identity."""
    if options.start == "gaussian":
        noise = torch.randn(clean.shape, generator=generator)
    elif options.start == "uniform":
        noise = torch.rand(clean.shape, generator=generator) * 2 - 1
    else:
        noise = torch.zeros(clean.shape)
    grid = options.recolor_grid
    colour = torch.zeros(len(clean), 3, grid, grid, grid, device=device) if options.recolor else None
    perturbation = Perturbation((noise.to(device) * bound).clamp(-bound, bound), colour, options.recolor_bound)
    perturbation.project(clean, bound, std)
    return perturbation


def _moment(perturbation: Perturbation, optimizer, history: list[float], attack, models, proxies) -> dict[str, Any]:
    """What a restart in progress needs to go on: the perturbation, the optimiser (with its decayed rate), the losses
    so far, the attack's moving state and what its surrogates and the evasion's proxies were last trained on."""
    moment = {"delta": perturbation.delta.detach().cpu(), "optimizer": optimizer.state_dict(), "history": history}
    if perturbation.colour is not None:
        moment["colour"] = perturbation.colour.detach().cpu()
    if models.deltas is not None:
        moment["surrogates"] = models.state_dict()
    if proxies is not None:
        moment["evade_proxies"] = proxies.state_dict()
    return moment | {"attack": attack.state_dict()}


def _optimise(
    attack_on,
    models: RefreshedModels,
    perturbation,
    clean,
    labels,
    bound,
    std,
    options,
    generator,
    restart,
    progress,
    resumed: dict[str, Any] | None = None,
    save: Callable[[dict[str, Any]], None] | None = None,
    save_every: float = SAVE_EVERY_SECONDS,
    proxies: RefreshedModels | None = None,
) -> list[float]:
    """One restart: (signed) Adam with step decay on `perturbation` (in place); the loss of every iteration.
    `attack_on(surrogates)` is the attack against the step's `models` (new ones when they are re-trained);
    `proxies`, the evasion's space when it is not the attack's surrogates.
    `resumed` is a saved moment of this restart to go on from; `save(moment)` saves one, every `save_every` seconds
    (never after the last iteration: the restart's end saves it whole)."""
    optimizer = torch.optim.Adam(perturbation.parameters(), lr=options.lr)
    steps = sorted({int(options.iterations * f) for f in options.milestones})
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, steps, gamma=0.1)
    count, history = len(clean), []
    if resumed is not None and "surrogates" in resumed:
        models.load_state_dict(resumed["surrogates"])
    attack = attack_on(models.models)
    if resumed is not None:
        optimizer.load_state_dict(resumed["optimizer"])  # with the decayed rate
        scheduler.last_epoch = len(resumed["history"])
        attack.load_state_dict(resumed["attack"])
        if proxies is not None:
            proxies.load_state_dict(resumed["evade_proxies"])
        history = list(resumed["history"])
    last_saved = time.perf_counter()
    desc = f"craft restart {restart + 1}/{options.restarts}"
    bar = tqdm(
        range(len(history), options.iterations),
        desc=desc,
        leave=False,
        disable=not progress,
        initial=len(history),
        total=options.iterations,
    )
    anchor = evasion = None
    for iteration in bar:
        if models.at(iteration, perturbation) is not attack.surrogates:
            attack = attack_on(models.models)
        if options.anchor and (anchor is None or anchor.surrogates is not attack.surrogates):
            anchor = FeatureAnchor(attack.surrogates, clean, attack.amp_dtype)  # against the current surrogates
        space = attack.surrogates if proxies is None else proxies.at(iteration, perturbation)
        if options.evade and (evasion is None or evasion.surrogates is not space):
            evasion = DensityEvasion(
                space,
                attack.train,
                attack.setup,
                options.evade_variant,
                attack.amp_dtype,
                options.evade_scope,
            )
        optimizer.zero_grad()
        total = 0.0
        for start in range(0, count, options.batch_size):
            part = slice(start, start + options.batch_size)
            images = perturbation.images(clean, std, part)
            loss = attack.loss(images, labels[part], generator) + perturbation.penalty(options.recolor_smoothness, part)
            if anchor is not None:
                loss = loss + options.anchor * anchor(images, part)
            if evasion is not None:
                loss = loss + options.evade * evasion(images, part)
            weight = (min(count, start + options.batch_size) - start) / count
            (loss * weight).backward()
            total += float(loss.detach()) * weight
        if options.signed:
            for parameter in perturbation.parameters():
                parameter.grad.sign_()
        optimizer.step()
        with torch.no_grad():
            attack.proximal(perturbation.delta, optimizer.param_groups[0]["lr"])
        scheduler.step()
        perturbation.project(clean, bound, std)
        attack.advance(iteration, generator)
        history.append(total)
        bar.set_postfix(loss=f"{total:.4f}")
        if save is not None and iteration + 1 < options.iterations and time.perf_counter() - last_saved >= save_every:
            save(_moment(perturbation, optimizer, history, attack, models, proxies))
            last_saved = time.perf_counter()
    return history
