"""Witches' Brew: gradient matching (Geiping et al., ICLR 2021), written from the paper and the reference's facts.

The poisons' training gradient is aligned with the gradient that would push the target image to the intended class:

    loss(delta) = 1 - cos( grad_theta CE(f(x_t), y_adv),  grad_theta CE(f(aug(x_p + delta)), y_p) )

over all parameters flattened into one vector, the poison gradient taken with create_graph=True so the loss can be
differentiated in delta. The surrogate is pretrained on clean data and kept in eval mode. The update is Adam fed with
the sign of the gradient, lr 0.1 in normalised units (delta / data std, as the reference), decayed x0.1 at 3/8, 5/8
and 7/8 of the iterations, followed by projection onto the eps ball and the pixel range. R restarts from random
Gaussian starts inside eps keep the one with the lowest final loss. Poisons are processed in batches; the gradient of
all batches is accumulated before each step, so the result does not depend on the batch size.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from attacks.base import PoisonSet, PoisonSetup, quantize, random_shift_flip
from sanitize.data import ImageDataset
from sanitize.models import Classifier
from sanitize.training import autocast, save_atomic


@dataclass
class GradientMatchingConfig:
    iterations: int = 250
    restarts: int = 8
    lr: float = 0.1
    milestones: tuple[float, ...] = (3 / 8, 5 / 8, 7 / 8)
    augment: bool = True
    max_shift: int = 4
    batch_size: int = 512
    seed: int = 0


def parameter_gradient(
    model: Classifier, x: torch.Tensor, y: torch.Tensor, create_graph: bool, amp_dtype: torch.dtype | None
) -> list[torch.Tensor]:
    """grad_theta of the mean cross-entropy over (x, y), one tensor per parameter."""
    with autocast(x.device, amp_dtype):
        loss = F.cross_entropy(model(x).float(), y)
    return list(
        torch.autograd.grad(loss, [p for p in model.parameters() if p.requires_grad], create_graph=create_graph)
    )


def alignment_loss(
    poison_grad: list[torch.Tensor], target_grad: list[torch.Tensor], target_norm: torch.Tensor
) -> torch.Tensor:
    """1 - cosine similarity of the two gradients as single flattened vectors."""
    dot = sum((p.float() * t).sum() for p, t in zip(poison_grad, target_grad))
    poison_norm = torch.sqrt(sum(p.float().pow(2).sum() for p in poison_grad))
    return 1 - dot / (poison_norm * target_norm)


def poison_pull(
    model: Classifier, images: torch.Tensor, labels: torch.Tensor, target_image: torch.Tensor, intended_class: int
) -> np.ndarray:
    """Each poison's pull on the target: its own parameter gradient projected on the unit adversarial target gradient
    (eval mode, fp32, no augmentation). The crafted objective aligns their sum; this says which poisons carry it.
    Images are uint8 (P, 3, H, W) and (3, H, W)."""
    model.eval()
    target_grad = torch.cat(
        [
            g.flatten()
            for g in parameter_gradient(
                model, target_image.float().div(255)[None], torch.tensor([intended_class]), False, None
            )
        ]
    )
    direction = target_grad / target_grad.norm()
    return np.array(
        [
            float(
                torch.cat(
                    [
                        g.flatten()
                        for g in parameter_gradient(
                            model, image[None].float().div(255), label.view(1).long(), False, None
                        )
                    ]
                )
                @ direction
            )
            for image, label in zip(images, labels)
        ]
    )


def pull_carriers(pull: np.ndarray) -> np.ndarray:
    """Mask of the fewest poisons whose pulls add up to half of the total: the ones that carry the attack."""
    order = np.argsort(-pull)
    count = int(np.searchsorted(np.cumsum(pull[order]), 0.5 * pull.sum())) + 1
    carriers = np.zeros(len(pull), bool)
    carriers[order[:count]] = True
    return carriers


def craft_gradient_matching(
    surrogates: list[Classifier],
    train: ImageDataset,
    target_image: torch.Tensor,
    setup: PoisonSetup,
    eps: float,
    config: GradientMatchingConfig,
    device: torch.device,
    amp_dtype: torch.dtype | None = None,
    progress: bool = True,
    checkpoint: Path | None = None,
) -> PoisonSet:
    """Craft the poisons for `setup` against the (ensemble of) surrogate(s); returns integer deltas. With `checkpoint`,
    the best restart so far is saved after every restart and a killed run resumes from it, to the same result."""
    for model in surrogates:
        model.to(device).eval()
        for p in model.parameters():
            p.requires_grad_(True)
    target = target_image.to(device).float().div(255)[None]
    intended = torch.tensor([setup.intended_class], device=device)
    target_grads = [[g.detach() for g in parameter_gradient(m, target, intended, False, amp_dtype)] for m in surrogates]
    target_norms = [torch.sqrt(sum(g.pow(2).sum() for g in grads)) for grads in target_grads]
    positions = np.asarray(setup.poison_indices)
    clean_uint8, labels, _ = train.load_batch(positions)
    clean = clean_uint8.float().div(255).to(device)
    labels = labels.to(device)
    std = surrogates[0].std.to(device)  # deltas are optimised in normalised units, as in the reference
    bound = eps / 255 / std
    generator = torch.Generator().manual_seed(config.seed)
    best_delta, best_loss, losses_per_restart, done, spent = None, float("inf"), [], 0, 0.0
    if checkpoint is not None and checkpoint.exists():
        state = torch.load(checkpoint, map_location="cpu", weights_only=True)
        if state["config"] == json.dumps(asdict(config)):
            best_delta, best_loss, done, spent = (
                state["best_delta"].to(device),
                state["best_loss"],
                state["restarts_done"],
                state["seconds"],
            )
            losses_per_restart = state["losses_per_restart"]
            generator.set_state(state["generator"])
    started = time.perf_counter() - spent
    for restart in range(done, config.restarts):
        delta = (torch.randn(clean.shape, generator=generator).to(device) * bound).clamp(-bound, bound)
        delta = _project(delta, clean, bound, std).requires_grad_(True)
        optimizer = torch.optim.Adam([delta], lr=config.lr)
        steps = sorted({int(config.iterations * f) for f in config.milestones})
        scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, steps, gamma=0.1)
        history = []
        bar = tqdm(
            range(config.iterations),
            desc=f"craft restart {restart + 1}/{config.restarts}",
            leave=False,
            disable=not progress,
        )
        for _ in bar:
            optimizer.zero_grad()
            total = 0.0
            for start in range(0, len(positions), config.batch_size):
                part = slice(start, start + config.batch_size)
                loss = _batch_loss(
                    surrogates,
                    clean[part] + delta[part] * std,
                    labels[part],
                    target_grads,
                    target_norms,
                    config,
                    generator,
                    amp_dtype,
                )
                weight = (min(len(positions), start + config.batch_size) - start) / len(positions)
                (loss * weight).backward()
                total += float(loss.detach()) * weight
            delta.grad.sign_()
            optimizer.step()
            scheduler.step()
            with torch.no_grad():
                delta.copy_(_project(delta, clean, bound, std))
            history.append(total)
            bar.set_postfix(loss=f"{total:.4f}")
        losses_per_restart.append(history)
        if history[-1] < best_loss:
            best_loss, best_delta = history[-1], delta.detach().clone()
        if checkpoint is not None:
            save_atomic(
                {
                    "config": json.dumps(asdict(config)),
                    "best_delta": best_delta.cpu(),
                    "best_loss": best_loss,
                    "restarts_done": restart + 1,
                    "losses_per_restart": losses_per_restart,
                    "generator": generator.get_state(),
                    "seconds": time.perf_counter() - started,
                },
                checkpoint,
            )
    deltas = quantize(clean_uint8, (clean + best_delta * std).cpu(), eps)
    metadata = {
        "config": asdict(config),
        "final_loss_per_restart": [h[-1] for h in losses_per_restart],
        "loss_history_best": losses_per_restart[int(np.argmin([h[-1] for h in losses_per_restart]))],
        "surrogates": len(surrogates),
        "seconds": round(time.perf_counter() - started, 2),
        "precision": "bf16" if amp_dtype is not None else "fp32",
    }
    return PoisonSet(setup=setup, eps=eps, deltas=deltas, method="gradient-matching", metadata=metadata)


def _batch_loss(surrogates, poisoned, labels, target_grads, target_norms, config, generator, amp_dtype) -> torch.Tensor:
    """Alignment loss of one batch of poisons, averaged over the ensemble; fresh augmentation per model."""
    losses = []
    for model, target_grad, target_norm in zip(surrogates, target_grads, target_norms):
        x = random_shift_flip(poisoned, config.max_shift, generator) if config.augment else poisoned
        poison_grad = parameter_gradient(model, x, labels, True, amp_dtype)
        losses.append(alignment_loss(poison_grad, target_grad, target_norm))
    return torch.stack(losses).mean()


def _project(delta: torch.Tensor, clean: torch.Tensor, bound: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """Onto the eps ball and so that clean + delta stays inside [0, 1] (delta in normalised units)."""
    delta = torch.max(torch.min(delta, bound), -bound)
    return torch.max(torch.min(delta, (1 - clean) / std), -clean / std)
