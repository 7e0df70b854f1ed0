"""Friendly noise (Liu, Yang & Mirzasoleiman, NeurIPS 2022): for every example, the largest perturbation within
+-eps / 255 that leaves the model's prediction where it was, found once early in training (TrainConfig.friendly_eps)
and added to the example for the rest of it. Poisons work through sharp regions of the loss that their small
perturbation reaches; moving every example as far as the model tolerates smooths those regions over. The paper pairs it
with random sign noise (TrainConfig.noise_eps); the facts below are its reference's (tianyu139/friendly-noise).

The noise lives in a memory-mapped file of the data's shape (N x H x W x C, int8 levels of 1/255: one byte a pixel, no
N x D float array in memory), written a batch at a time beside a count of the batches done, so a killed generation
resumes at its next batch and a killed training reloads it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from sanitize.config import TrainConfig
from sanitize.data import ImageDataset, iterate_batches

STEPS = 30  # optimisation steps per batch (the reference's friendly_epochs)
LEARNING_RATE = 100.0  # SGD with Nesterov momentum 0.9, the rate x0.1 after half and three quarters of the steps
MOMENTUM = 0.9
SIZE_WEIGHT = 1.0  # mu: the loss is KL(prediction before || after) - mu * mean(noise^2)
START = 8 / 255  # the noise starts uniform in +-START
STARTS_AT = 1 / 8  # generated when this share of the epochs is done (the reference's example: epoch 5 of 40)
BATCH_SIZE = 128  # the reference's: the size term is a mean over the batch, so the batch sets its weight


def friendly_epoch(config: TrainConfig) -> int:
    """The 0-based epoch before which the noise is generated."""
    return round(config.epochs * STARTS_AT)


def friendly_passes(config: TrainConfig, size: int) -> int:
    """Forward-backward passes the generation costs (STEPS a trained example; counted as training passes, which
    overstates it a little: no weight gradients are taken)."""
    return STEPS * size if config.friendly_eps else 0


def _batches(positions: np.ndarray) -> int:
    """Batches the generation takes for `positions`."""
    return -(-len(positions) // BATCH_SIZE)


class FriendlyNoise:
    """The noise of one training run at `path` (.npy, int8 N x H x W x C) with its progress beside it (.json)."""

    def __init__(self, path: Path, dataset: ImageDataset, eps: float) -> None:
        self.path, self.eps = path, eps
        self.progress_path = path.with_suffix(".json")
        self.shape = (len(dataset), *dataset.image_size, 3)
        self._noise: np.ndarray | None = None

    @property
    def batches_done(self) -> int:
        if not self.progress_path.exists() or not self.path.exists():
            return 0
        return int(json.loads(self.progress_path.read_text())["batches_done"])

    def complete(self, positions: np.ndarray) -> bool:
        """Whether the noise of `positions` is all found."""
        return self.batches_done >= _batches(positions)

    def _array(self, mode: str) -> np.ndarray:
        if self._noise is None or mode == "w+":
            if mode == "w+":
                self.path.parent.mkdir(parents=True, exist_ok=True)
            self._noise = np.lib.format.open_memmap(self.path, mode=mode, dtype=np.int8, shape=self.shape)
        return self._noise

    def generate(
        self,
        model: torch.nn.Module,
        dataset: ImageDataset,
        positions: np.ndarray,
        device: torch.device,
        amp_dtype: torch.dtype | None,
        seed: int,
        progress: bool = True,
    ) -> None:
        """Find the noise of `positions` (the examples being trained), resuming after the batches already done."""
        from sanitize.training import autocast, to_model_input

        positions = np.sort(np.asarray(positions, dtype=np.int64))
        if self.complete(positions):
            return
        total, done = _batches(positions), self.batches_done
        noise = self._array("r+" if done else "w+")
        was_training = model.training
        model.eval()
        requires_grad = [p.requires_grad for p in model.parameters()]
        for p in model.parameters():
            p.requires_grad_(False)  # only the noise's gradient is taken
        bound = self.eps / 255
        batches = iterate_batches(dataset, positions[done * BATCH_SIZE :], BATCH_SIZE)
        for number, (images, _, where) in enumerate(
            tqdm(batches, total=total - done, desc="friendly noise", leave=False, disable=not progress), start=done
        ):
            x = to_model_input(images, device)
            with torch.no_grad(), autocast(device, amp_dtype):
                before = F.log_softmax(model(x).float(), dim=1)
            generator = torch.Generator().manual_seed(seed * 1_000_003 + number)
            start = (torch.rand(x.shape, generator=generator) * 2 - 1) * START
            delta = start.to(device).contiguous(memory_format=torch.channels_last).requires_grad_(True)
            optimizer = torch.optim.SGD([delta], lr=LEARNING_RATE, momentum=MOMENTUM, nesterov=True)
            schedule = torch.optim.lr_scheduler.MultiStepLR(optimizer, [STEPS // 2, STEPS // 4 * 3])
            for _ in range(STEPS):
                bounded = delta.clamp(-bound, bound)
                with autocast(device, amp_dtype):
                    after = F.log_softmax(model((x + bounded).clamp(0, 1)).float(), dim=1)
                loss = F.kl_div(after, before, reduction="batchmean", log_target=True)
                loss = loss - SIZE_WEIGHT * bounded.float().pow(2).mean()
                (delta.grad,) = torch.autograd.grad(loss, delta)
                optimizer.step()
                schedule.step()
            levels = (delta.detach().clamp(-bound, bound) * 255).round().to(torch.int8)
            noise[where.numpy()] = levels.permute(0, 2, 3, 1).cpu().numpy()
            noise.flush()
            self._record(number + 1)
        for p, wanted in zip(model.parameters(), requires_grad):
            p.requires_grad_(wanted)
        model.train(was_training)

    def _record(self, batches_done: int) -> None:
        tmp = self.progress_path.with_name(self.progress_path.name + ".tmp")
        tmp.write_text(json.dumps({"batches_done": batches_done, "eps": self.eps}))
        os.replace(tmp, self.progress_path)

    def added(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """`x` (in [0, 1], the batch of dataset `positions`) with its examples' noise added; not clipped, as the
        reference adds it."""
        levels = torch.from_numpy(np.ascontiguousarray(self._array("r")[positions.numpy()]))
        # N x H x W x C permuted to N x C x H x W is channels_last in memory
        return x + levels.permute(0, 3, 1, 2).to(x.device, dtype=x.dtype) / 255

    def remove(self) -> None:
        self._noise = None
        self.path.unlink(missing_ok=True)
        self.progress_path.unlink(missing_ok=True)
