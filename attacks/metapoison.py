"""MetaPoison (Huang, Geiping, Fowl, Taylor & Goldstein, NeurIPS 2020), written from the paper and the reference's
facts (wronnyhuang/metapoison): poisons crafted by differentiating through training itself.

For each surrogate of a *staggered ensemble*, K SGD steps are unrolled from a training batch that holds poisons
(the rest clean training images) and then K - 1 clean batches, the gradient reaching the poisons through the first
step's weight update (`create_graph`), as the reference does. Every craft step, every poison is unrolled once per
member, as the reference unrolls every batch of an epoch that holds poisons. The target is scored at the weights after
each step: the Carlini-Wagner margin towards the intended class, max(max_other z - z_intended, -100), averaged over
steps 1..K (or the cross-entropy, `objective`). As in the reference, the target joins the forward pass of the next
step's batch, so batch norm normalises it with that batch's statistics (`target_norm`). The ensemble's members sit at
evenly spaced points of a training run (`span_epochs`); after every craft step each member trains on
(`advance_epochs`), and a member that reaches the end of the span starts again from a fresh initialisation, so the
ensemble always spans early to late training. The meta-gradient is the mean over members. The optimiser is the
shared loop's with the reference's settings: Adam on the gradient itself (not its sign) at a large rate (~200 grey
levels), x0.1 at craft steps 20 and 40 of 61, one restart, the perturbation started uniformly in the eps ball.

Deviations from the paper, chosen for a CPU: M = 6 members, not 24; `batch_size` poisons per unrolled batch (25 of 125,
where a 1% budget puts about one in a real batch: 20x fewer unrolls per craft step; the direction of each poison's
meta-gradient changes little, its size is the optimiser's to normalise); members train as the project's victims do
(SGD with Nesterov momentum and weight decay, the reference trains plain SGD), the unroll is plain SGD at their rate;
members train on the data with the current poisons (the reference's `trajectory poison` option, not its default: with
clean members the poisons moved smoke-scale victims away from the intended class, reports/metapoison-pilot); ReColor
(the shared loop's `recolor` option, attacks.recolor) is off by default, where the reference turns it on, so that the
default stays in the additive eps ball of docs/protocol.md; `recolor=true` crafts the reference's variant.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.func import functional_call

from attacks.base import random_shift_flip
from attacks.crafting import CraftingOptions
from attacks.registry import Attack, register_attack
from sanitize.config import TrainConfig
from sanitize.errors import SanitizeError
from sanitize.training import autocast, recipe_optimizer

CW_CLAMP = -100.0  # the reference's floor of the margin


@dataclass
class MetaPoisonOptions(CraftingOptions):
    iterations: int = 61  # craft steps
    restarts: int = 1
    batch_size: int = 25  # poisons per unrolled batch (the rest of its clean_batch clean images)
    lr: float = 3.0  # normalised units: ~200 grey levels (the reference's craft rate), Adam's step before the drops
    milestones: tuple[float, ...] = (20 / 61, 40 / 61)
    signed: bool = False
    start: str = "uniform"
    unroll: int = 2  # K, SGD steps differentiated through
    inner_lr: float = 0.1  # the unrolled steps' and the members' SGD rate
    # batch norm in the unrolled steps: "batch" statistics as training uses them, or the member's "running" ones
    unroll_norm: str = "batch"
    # how the target is scored after an unrolled step: in the "batch" of the next training step, normalised with its
    # statistics (the reference: the target joins every unrolled forward pass), or alone with the member's "running"
    # statistics, as a victim classifies it at test time (weaker at the smoke scale: reports/metapoison-pilot)
    target_norm: str = "batch"
    # how members' meta-gradients combine: their "mean", or a mean of "unit"-norm ones (no member outweighs the others)
    member_weights: str = "mean"
    # what members train on between craft steps: the data with the current "poison"s, as a victim does (the
    # reference's option), or "clean" data (the reference's default; worse here: reports/metapoison-pilot)
    trajectory: str = "poison"
    # the ensemble: "staggered" fresh members spread over a training run (the method), or copies of the trained
    # surrogate that gradient matching crafts against, never re-initialised (a diagnostic: is it the objective or the
    # members that transfers poorly?)
    members: str = "staggered"
    clean_batch: int = 125  # the unrolled batches' size (poisons and clean training images)
    ensemble: int = 6  # M members (the paper: 24)
    span_epochs: float = 20.0  # the members sit evenly over this much of a training run ...
    advance_epochs: float = 0.25  # ... and each trains on this much per craft step, restarting at the span's end
    objective: str = "cw"  # cw (Carlini-Wagner margin) or xent (cross-entropy towards the intended class)
    augment: bool = True  # differentiable shift + flip on the unrolled batches, as the victims' training augments
    max_shift: int = 4


def target_objective(logits: torch.Tensor, intended: int, objective: str) -> torch.Tensor:
    """Lower is closer to the intended class: the CW margin (floored at -100) or the cross-entropy."""
    if objective == "xent":
        return F.cross_entropy(logits, torch.full((len(logits),), intended, device=logits.device))
    others = logits.clone()
    others[:, intended] = float("-inf")
    return torch.clamp(others.max(dim=1).values - logits[:, intended], min=CW_CLAMP).mean()


@register_attack("metapoison")
class MetaPoison(Attack):
    """Loss: the target's adversarial objective after K unrolled SGD steps on poisons + clean data, averaged over the
    unroll steps and a staggered ensemble of surrogates that keep training while the poisons are crafted."""

    Options = MetaPoisonOptions
    surrogate = "model"  # the architecture and normalisation of the ensemble (its weights only with members=surrogate)

    def __init__(self, options, surrogates, target_image, setup, device, amp_dtype, train=None) -> None:
        super().__init__(options, surrogates, target_image, setup, device, amp_dtype, train)
        if train is None:
            raise SanitizeError("metapoison trains its surrogates while crafting: it needs the training set")
        choices = {
            "objective": ("cw", "xent"),
            "unroll_norm": ("batch", "running"),
            "target_norm": ("batch", "running"),
            "member_weights": ("mean", "unit"),
            "trajectory": ("clean", "poison"),
            "members": ("staggered", "surrogate"),
        }
        for option, allowed in choices.items():
            if getattr(options, option) not in allowed:
                raise SanitizeError(f"metapoison {option} must be one of {allowed}, not {getattr(options, option)!r}")
        self.target = target_image.float().div(255)[None].to(device)
        self.steps_per_epoch = max(1, len(train) // options.clean_batch)
        self.span = max(options.ensemble, round(options.span_epochs * self.steps_per_epoch))
        self.advance_steps = max(1, round(options.advance_epochs * self.steps_per_epoch))
        self.poison_row = {int(index): row for row, index in enumerate(setup.poison_indices)}
        self.current_poisons, self.seen_poisons = None, []  # the poisons of the last craft step (trajectory "poison")
        self.member_generator = torch.Generator().manual_seed(options.seed + 1)
        self.members, self.ages, self.optimizers = [], [], []
        if options.members == "surrogate":
            self.span = 2**62  # never re-initialised
        for m in range(options.ensemble):
            if options.members == "surrogate":
                self.members.append(copy.deepcopy(self.surrogates[m % len(self.surrogates)]).to(device))
            else:
                self.members.append(self._fresh(m))
            self.optimizers.append(self._optimizer(self.members[m]))
            self.ages.append(0)
        self.staggered = options.members != "staggered"  # done at the first loss: a resumed craft loads its members

    def _stagger(self) -> None:
        """Member m trains m/M of the span before the first craft step (once: nothing after that)."""
        if self.staggered:
            return
        for m in range(self.options.ensemble):
            self._train(m, round(m * self.span / self.options.ensemble))
        self.staggered = True

    def _optimizer(self, member) -> torch.optim.Optimizer:
        """A member trains as the victims do (the project's recipe), at the unroll's rate."""
        return recipe_optimizer(member.parameters(), TrainConfig(), lr=self.options.inner_lr)

    def _fresh(self, seed: int):
        """A newly initialised copy of the surrogate's architecture (and its data normalisation)."""
        member = copy.deepcopy(self.surrogates[0]).to(self.device)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(torch.randint(2**31, (1,), generator=self.member_generator)) + seed)
            for module in member.modules():
                if module is not member and hasattr(module, "reset_parameters"):
                    module.reset_parameters()
        return member

    def _clean_batch(self, generator: torch.Generator, size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """`size` (default clean_batch) training images drawn at random, in [0, 1] on the device (with trajectory
        "poison", the poisons among them as the last craft step left them)."""
        size = self.options.clean_batch if size is None else size
        indices = np.sort(torch.randint(len(self.train), (size,), generator=generator).numpy())
        images, labels, _ = self.train.load_batch(indices)
        images = images.float().div(255).to(self.device)
        if self.current_poisons is not None:
            for j, index in enumerate(indices.tolist()):
                if index in self.poison_row:
                    images[j] = self.current_poisons[self.poison_row[index]]
        return images, labels.to(self.device)

    def _augment(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        return random_shift_flip(x, self.options.max_shift, generator) if self.options.augment else x

    def _train(self, m: int, steps: int, generator: torch.Generator | None = None) -> None:
        """Member m trains `steps` SGD steps on clean data; at the end of the span it starts again, fresh."""
        generator = generator or self.member_generator
        member, optimizer = self.members[m], self.optimizers[m]
        member.train()
        for _ in range(steps):
            if self.ages[m] >= self.span:
                self.members[m] = member = self._fresh(m + self.ages[m])
                self.optimizers[m] = optimizer = self._optimizer(member)
                self.ages[m] = 0
                member.train()
            x, y = self._clean_batch(generator)
            with autocast(self.device, self.amp_dtype):
                loss = F.cross_entropy(member(self._augment(x, generator)).float(), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            self.ages[m] += 1

    def _unrolled_objective(self, m, poisons, poison_labels, generator) -> torch.Tensor:
        """The target's objective after each of K unrolled SGD steps, the first on `poisons` filled up with clean
        training images, the others on clean batches; averaged over the steps, differentiable in `poisons`."""
        member = self.members[m]
        params = dict(member.named_parameters())
        buffers = {name: b.clone() for name, b in member.named_buffers()}  # the unroll leaves the member untouched
        in_batch = self.options.target_norm == "batch"
        scores = []
        for step in range(self.options.unroll + in_batch):  # "batch": the last forward pass only scores the target
            fill = self.options.clean_batch - (len(poisons) if step == 0 else 0)
            x, y = self._clean_batch(generator, max(fill, 1))
            if step == 0:
                x, y = torch.cat([poisons, x]), torch.cat([poison_labels, y])
            x = self._augment(x, generator)
            if in_batch:
                x = torch.cat([x, self.target])
            member.train(self.options.unroll_norm == "batch")
            with autocast(self.device, self.amp_dtype):
                logits = functional_call(member, (params, buffers), (x,)).float()
            if in_batch and step > 0:
                scores.append(target_objective(logits[-1:], self.setup.intended_class, self.options.objective))
            if step == self.options.unroll:
                break
            grads = torch.autograd.grad(F.cross_entropy(logits[: len(y)], y), list(params.values()), create_graph=True)
            params = {name: p - self.options.inner_lr * g for (name, p), g in zip(params.items(), grads)}
            if not in_batch:
                member.eval()
                with autocast(self.device, self.amp_dtype):
                    target_logits = functional_call(member, (params, buffers), (self.target,)).float()
                scores.append(target_objective(target_logits, self.setup.intended_class, self.options.objective))
        return torch.stack(scores).mean()

    def loss(self, poisoned: torch.Tensor, labels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """The mean over members of the unrolled objective of this batch of poisons. Each member's meta-gradient is
        taken (and its graph freed) before the next member's unroll, so memory holds one unroll at a time; the value
        returned is the mean objective and its gradient in `poisoned` the mean meta-gradient."""
        self._stagger()
        if self.options.trajectory == "poison":
            self.seen_poisons.append(poisoned.detach())
        total, meta_gradient = 0.0, torch.zeros_like(poisoned)
        for m in range(len(self.members)):
            objective = self._unrolled_objective(m, poisoned, labels, generator) / len(self.members)
            gradient = torch.autograd.grad(objective, poisoned)[0]
            if self.options.member_weights == "unit":
                gradient = gradient / gradient.norm().clamp_min(1e-12) / len(self.members)
            meta_gradient += gradient
            total += float(objective.detach())
        linear = (poisoned * meta_gradient).sum()
        return linear - linear.detach() + total

    def state_dict(self) -> dict[str, Any]:
        """The members as they are: weights, optimisers, ages, the poisons they train on and their random state."""
        return {
            "members": [member.state_dict() for member in self.members],
            "optimizers": [optimizer.state_dict() for optimizer in self.optimizers],
            "ages": list(self.ages),
            "current_poisons": None if self.current_poisons is None else self.current_poisons.cpu(),
            "member_generator": self.member_generator.get_state(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for member, optimizer, weights, moment in zip(
            self.members, self.optimizers, state["members"], state["optimizers"]
        ):
            member.load_state_dict(weights)
            optimizer.load_state_dict(moment)
        self.ages = list(state["ages"])
        poisons = state["current_poisons"]
        self.current_poisons = None if poisons is None else poisons.to(self.device)
        self.member_generator.set_state(state["member_generator"])
        self.staggered = True

    def advance(self, iteration: int, generator: torch.Generator) -> None:
        self._stagger()
        if self.seen_poisons:  # the loop passed every poison, in order, since the last step
            self.current_poisons, self.seen_poisons = torch.cat(self.seen_poisons), []
        for m in range(len(self.members)):
            self._train(m, self.advance_steps, generator)
