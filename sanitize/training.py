"""Plain from-scratch training (torchvision-references style), device and precision selection, checkpoints."""

from __future__ import annotations

import contextlib
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from sanitize.config import TrainConfig
from sanitize.data import ImageDataset, iterate_batches
from sanitize.distributed import World, all_reduce_sum
from sanitize.errors import SanitizeError
from sanitize.friendly import FriendlyNoise, friendly_epoch, friendly_passes
from sanitize.models import Classifier, create_model
from sanitize.wording import duration, plural
from sanitize.work import reduced_size, trained_per_epoch


def resolve_device(name: str = "auto", world: World = World()) -> torch.device:
    """`auto` picks CUDA when present, else the CPU; under torchrun, `cuda` means this rank's GPU (its local rank)."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError as error:
        raise SanitizeError(f"bad device {name!r}: {error}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SanitizeError("--device cuda was asked for but no CUDA device is available")
    if device.type == "cuda" and device.index is None and world.distributed:
        device = torch.device("cuda", world.local_rank)
    return device


def resolve_precision(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype, or None for fp32. `auto` uses bf16 where the hardware runs it natively."""
    if precision == "fp32":
        return None
    if device.type == "cuda":
        supported = torch.cuda.is_bf16_supported()
    elif device.type == "cpu":
        supported = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    else:
        supported = False
    if precision == "bf16" or supported:
        return torch.bfloat16
    return None


def precision_name(dtype: torch.dtype | None) -> str:
    """How summaries and benchmarks name `resolve_precision`'s result."""
    return "fp32" if dtype is None else "bf16"


def device_record(device: torch.device, amp_dtype: torch.dtype | None) -> dict[str, str | int]:
    """Where and at what precision a process computes, as scan summaries and evaluation rows record it (`auto`
    resolves per machine, so two runs of one command may differ here)."""
    return {"device": str(device), "precision": precision_name(amp_dtype), "threads": torch.get_num_threads()}


def autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def to_model_input(
    images: torch.Tensor, device: torch.device, memory_format: torch.memory_format = torch.channels_last
) -> torch.Tensor:
    """uint8 (B, 3, H, W) -> float in [0, 1] on `device`, channels_last by default (faster convolutions on CPU and GPU)."""
    x = images.to(device, non_blocking=True).float().div_(255)
    return x.contiguous(memory_format=memory_format)


def random_crop_flip(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Per-example random crop from a zero-padded copy (padding = side / 8, 4 px at 32) and horizontal flip."""
    batch, channels, height, width = x.shape
    pad = max(1, height // 8)
    padded = F.pad(x, (pad, pad, pad, pad))
    dy = torch.randint(0, 2 * pad + 1, (batch,), generator=generator).to(x.device)
    dx = torch.randint(0, 2 * pad + 1, (batch,), generator=generator).to(x.device)
    rows = (dy[:, None] + torch.arange(height, device=x.device))[:, None, :, None]
    cols = (dx[:, None] + torch.arange(width, device=x.device))[:, None, None, :]
    batch_idx = torch.arange(batch, device=x.device)[:, None, None, None]
    chan_idx = torch.arange(channels, device=x.device)[None, :, None, None]
    out = padded[batch_idx, chan_idx, rows, cols]
    flip = (torch.rand(batch, generator=generator) < 0.5).to(x.device)[:, None, None, None]
    keep_format = torch.channels_last if x.is_contiguous(memory_format=torch.channels_last) else torch.contiguous_format
    return torch.where(flip, out.flip(3), out).contiguous(memory_format=keep_format)


def resized(x: torch.Tensor, side: int) -> torch.Tensor:
    """A batch with its shorter side resized to `side` (area averaging, aspect kept), in `x`'s memory format:
    progressive resizing's reduced epochs (TrainConfig.reduced_side)."""
    size = reduced_size(tuple(x.shape[-2:]), side)
    channels_last = x.is_contiguous(memory_format=torch.channels_last)
    out = F.interpolate(x, size=size, mode="area")
    return out.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


def with_sign_noise(x: torch.Tensor, eps: float, generator: torch.Generator) -> torch.Tensor:
    """`x` (in [0, 1]) with every value moved by +-eps / 255, each sign random: TrainConfig.noise_eps. The signs are
    drawn on `x`'s device from a seed the CPU `generator` gives, so a run is reproducible and no batch of signs
    crosses to the device. Not clipped to [0, 1], as the defense's reference adds it."""
    device_generator = torch.Generator(device=x.device).manual_seed(
        int(torch.randint(2**62, (1,), generator=generator))
    )
    signs = torch.empty_like(x).bernoulli_(0.5, generator=device_generator).mul_(2).sub_(1)
    return x + signs * (eps / 255)


def epoch_cost(config: TrainConfig, epoch: int, image_size: tuple[int, int]) -> float:
    """0-based `epoch`'s cost per example relative to one at the images' own size: the pixel share a reduced epoch
    keeps (a convolution's work follows the pixels)."""
    side = config.side_at(epoch)
    return 1.0 if side is None else min(1.0, (side / min(image_size)) ** 2)


def channel_stats(dataset: ImageDataset, sample: int = 5000, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and std in [0, 1] from a random sample of the data (used for input normalisation)."""
    rng = np.random.default_rng(seed)
    indices = np.sort(rng.permutation(len(dataset))[:sample])
    total = torch.zeros(3, dtype=torch.float64)
    total_sq = torch.zeros(3, dtype=torch.float64)
    count = 0
    for images, _, _ in iterate_batches(dataset, indices, 512):
        x = images.double().div(255)
        total += x.sum(dim=(0, 2, 3))
        total_sq += x.pow(2).sum(dim=(0, 2, 3))
        count += x.shape[0] * x.shape[2] * x.shape[3]
    mean = total / count
    std = (total_sq / count - mean.pow(2)).clamp_min(0).sqrt()
    return mean.float(), std.float()


def milestone_epochs(config: TrainConfig) -> list[int]:
    return sorted({max(1, round(f * config.epochs)) for f in config.milestones})


ONE_CYCLE_PEAK = 0.25  # the share of training over which the one-cycle rate rises to its peak


def learning_rate(config: TrainConfig, progress: float) -> float:
    """The recipe's rate `progress` epochs into training (fractional within an epoch). Step decay multiplies by gamma
    at each milestone passed, as torch's MultiStepLR does epoch by epoch; one-cycle is a triangle peaking at lr."""
    if config.schedule == "onecycle":
        peak = ONE_CYCLE_PEAK * config.epochs
        rising = progress / peak if progress < peak else (config.epochs - progress) / (config.epochs - peak)
        return config.lr * max(0.0, rising)
    lr = config.lr
    for milestone in milestone_epochs(config):
        if int(progress) >= milestone:
            lr *= config.gamma
    return lr


def save_atomic(state: dict[str, Any], path: Path) -> None:
    """torch.save through a temporary file and a rename, so a kill never leaves half a checkpoint."""
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def _resume_state(checkpoint: Path | None, device: torch.device) -> dict[str, Any] | None:
    """The training checkpoint to resume from, or None; a damaged one is said and trained again from the start."""
    if checkpoint is None or not checkpoint.exists():
        return None
    try:
        state = torch.load(checkpoint, map_location=device, weights_only=True)
        if not isinstance(state, dict):
            raise ValueError("not a training checkpoint")
        return state
    except Exception as error:  # a damaged file must cost a retraining, not the run
        print(f"note: {checkpoint} is damaged ({type(error).__name__}); training from the start", file=sys.stderr)
        return None


EpochHook = Callable[[int, torch.nn.Module, np.ndarray], np.ndarray]


def recipe_optimizer(parameters, config: TrainConfig, lr: float | None = None) -> torch.optim.SGD:
    """The project's training recipe's optimiser: SGD with Nesterov momentum and weight decay (at `lr` if given)."""
    return torch.optim.SGD(
        parameters,
        lr=config.lr if lr is None else lr,
        momentum=config.momentum,
        weight_decay=config.weight_decay,
        nesterov=True,
    )


ETA_BATCHES = 10  # a training run (and the embedding pass) says how long it will take after this many batches


def train_model(
    model: torch.nn.Module,
    dataset: ImageDataset,
    indices: np.ndarray,
    config: TrainConfig,
    device: torch.device,
    amp_dtype: torch.dtype | None,
    checkpoint: Path | None = None,
    meta: dict[str, str] | None = None,
    workers: int = 0,
    progress: bool = True,
    desc: str = "train",
    after_epoch: EpochHook | None = None,
    memory_format: torch.memory_format = torch.channels_last,
    world: World = World(),
) -> list[dict[str, float]]:
    """Train `model` on `indices` from its current weights; returns per-epoch loss, accuracy, wall and process CPU
    seconds (the epoch hook included), kept across a resume.

    With `checkpoint`, state is saved after every epoch and a run whose `meta` matches resumes from it.
    `after_epoch(epoch, model, indices)` may return a smaller index set for the next epochs (robust training).
    Under torchrun the model is wrapped in DDP and every rank trains on its share of each epoch's order with
    batch_size / world_size examples a step (the recipe's global batch); rank 0 writes the checkpoint; the history
    counts all ranks.
    """
    model.to(device, memory_format=memory_format)
    net = (
        torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
        if world.distributed
        else model
    )
    batch_size = max(1, config.batch_size // world.world_size)
    optimizer = recipe_optimizer(model.parameters(), config)
    history: list[dict[str, float]] = []
    indices = np.asarray(indices, dtype=np.int64)
    start_epoch = 0
    state = _resume_state(checkpoint, device)
    if state is not None:
        if state.get("meta") == (meta or {}):
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            history, start_epoch = state["history"], state["epoch"]
            indices = state["indices"].numpy()
            if progress and world.is_main:
                print(f"resuming {desc} from epoch {start_epoch} of {config.epochs}", file=sys.stderr)
        elif progress and world.is_main:
            print(
                f"note: {checkpoint} is another run's (other data or options); {desc} trains from the start",
                file=sys.stderr,
            )
    friendly, scratch = None, None
    if config.friendly_eps:
        if world.distributed:
            raise SanitizeError("friendly noise is found in one process: train with it without torchrun")
        if checkpoint is None:  # a scratch folder removed with this frame
            scratch = tempfile.TemporaryDirectory(prefix="sanitize-friendly-")
        where = checkpoint.with_suffix(".friendly.npy") if checkpoint else Path(scratch.name) / "friendly.npy"
        friendly = FriendlyNoise(where, dataset, config.friendly_eps)
    decoded = getattr(dataset, "decoded", None)  # a folder's decoded copy (sanitize.data.decoded), if it keeps one
    filling = decoded is not None and decoded.written() < len(dataset)
    estimate_at = {start_epoch, start_epoch + 1} if filling else {start_epoch}
    for epoch in range(start_epoch, config.epochs):
        started, cpu_started = time.perf_counter(), time.process_time()
        with_friendly = friendly is not None and epoch >= friendly_epoch(config)
        if with_friendly and not friendly.complete(indices):
            friendly.generate(model, dataset, indices, device, amp_dtype, config.seed, progress and world.is_main)
        # the generation's passes are the epoch's that starts with it, also when a resumed run found it done
        generated = friendly_passes(config, len(indices)) if epoch == friendly_epoch(config) else 0
        model.train()
        generator = torch.Generator().manual_seed(config.seed * 100_003 + epoch)
        order = world.epoch_share(np.random.default_rng([config.seed, epoch]).permutation(indices))
        order = order[: trained_per_epoch(len(order), batch_size)]  # a batch of one breaks batch norm
        loss_sum, correct, seen = 0.0, 0, 0
        side = config.side_at(epoch)  # progressive resizing: this epoch's reduced side, or None
        batches = iterate_batches(dataset, order, batch_size, workers, pin_memory=device.type == "cuda")
        per_epoch = -(-len(order) // batch_size)
        for batch, (images, labels, positions) in enumerate(
            tqdm(
                batches, total=per_epoch, desc=f"{desc} {epoch + 1}/{config.epochs}", leave=False, disable=not progress
            )
        ):
            if batch == ETA_BATCHES and epoch in estimate_at and progress and world.is_main:
                # before the long phase is under way: its rough length, from its first batches (warm-up included);
                # again in the next epoch when this one fills a decoded copy, which the later epochs read faster
                spent = time.perf_counter() - started
                size = tuple(images.shape[-2:])
                later = sum(epoch_cost(config, e, size) for e in range(epoch, config.epochs)) / epoch_cost(
                    config, epoch, size
                )  # epochs at a reduced side cost less
                total = spent / batch * per_epoch * later
                epochs = plural(config.epochs - epoch, "epoch")
                said = (
                    f"about {duration(total)} for {epochs}"
                    + (" (at most: later epochs read decoded images)" if filling else "")
                    if epoch == start_epoch
                    else f"about {duration(total)} for the other {epochs}, reading decoded images"
                )
                tqdm.write(f"{desc}: {said}", sys.stderr)
            x = to_model_input(images, device, memory_format)
            if with_friendly:
                x = friendly.added(x, positions)
            if config.augment:
                x = random_crop_flip(x, generator)
            if side is not None:
                x = resized(x, side)
            if config.noise_eps:
                x = with_sign_noise(x, config.noise_eps, generator)
            y = labels.to(device, non_blocking=True)
            for group in optimizer.param_groups:
                group["lr"] = learning_rate(config, epoch + (batch + 0.5) / per_epoch)
            with autocast(device, amp_dtype):
                logits = net(x)
                loss = F.cross_entropy(logits.float(), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            loss_sum += float(loss.detach()) * len(y)
            correct += int((logits.argmax(1) == y).sum())
            seen += len(y)
        loss_sum, correct, seen = all_reduce_sum([loss_sum, correct, seen], world)
        if after_epoch is not None:
            indices = np.asarray(after_epoch(epoch, model, indices), dtype=np.int64)
        history.append(
            {
                "epoch": epoch + 1,
                "loss": loss_sum / max(seen, 1),
                "train_acc": correct / max(seen, 1),
                "examples": int(seen),
                **({"side": side} if side is not None else {}),
                **({"friendly_passes": generated} if generated else {}),
                "seconds": time.perf_counter() - started,
                "cpu_seconds": time.process_time() - cpu_started,
            }
        )
        if checkpoint is not None and world.is_main:
            save_atomic(
                {
                    "model": model.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "history": history,
                    "epoch": epoch + 1,
                    "indices": torch.from_numpy(indices),
                    "meta": meta or {},
                },
                checkpoint,
            )
    if friendly is not None:  # the run is finished: its noise is no longer needed
        friendly.remove()
    return history


def predict(
    model: Classifier,
    dataset: ImageDataset,
    indices: np.ndarray,
    device: torch.device,
    amp_dtype: torch.dtype | None,
    batch_size: int = 512,
    workers: int = 0,
) -> np.ndarray:
    """Logits (N, C) float32 in eval mode, no augmentation."""
    outputs = [np.zeros((0, model.num_classes), np.float32)]  # no rows: (0, C)
    outputs += [
        logits for _, logits in predict_batches(model, dataset, indices, device, amp_dtype, batch_size, workers)
    ]
    return np.concatenate(outputs)


@torch.no_grad()  # also around each resumption of the generator
def predict_batches(
    model: Classifier,
    dataset: ImageDataset,
    indices: np.ndarray,
    device: torch.device,
    amp_dtype: torch.dtype | None,
    batch_size: int = 512,
    workers: int = 0,
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(positions, logits float32) batch by batch in eval mode, no augmentation: a pass over every row that holds one
    batch of logits at a time (an (N, C) array is 5 GB at ImageNet's 1.28M x 1,000)."""
    model.to(device, memory_format=torch.channels_last).eval()
    for images, _, positions in iterate_batches(dataset, np.asarray(indices), batch_size, workers):
        with autocast(device, amp_dtype):
            logits = model(to_model_input(images, device)).float().cpu()
        yield positions.numpy(), logits.numpy()


def train_from_scratch(
    dataset: ImageDataset,
    model_name: str,
    recipe: TrainConfig,
    directory: Path,
    device: torch.device,
    amp_dtype: torch.dtype | None,
    seed: int = 0,
    workers: int = 0,
    progress: bool = True,
    desc: str = "train",
    after_epoch: EpochHook | None = None,
    extra_meta: dict[str, str] | None = None,
    indices: np.ndarray | None = None,
    world: World = World(),
) -> tuple[Classifier, dict[str, Any]]:
    """A fresh `model_name` (seeded, input-normalised on the data) trained on all of `dataset` (or its `indices`, whose
    choice `extra_meta` must name for a resume to tell them apart); resumes from
    directory/checkpoint.pt when the data, model, recipe and seed match; writes directory/model.pt (a state dict;
    rank 0 under torchrun)."""
    directory.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    model = create_model(model_name, dataset.num_classes, (3, *dataset.image_size))
    started = time.perf_counter()
    mean, std = channel_stats(dataset, seed=seed)
    model.set_normalization(mean, std)
    meta = {
        "fingerprint": dataset.fingerprint,
        "model": model_name,
        "train": json.dumps(recipe.identity(), sort_keys=True),
        "seed": str(seed),
    } | (extra_meta or {})
    history = train_model(
        model,
        dataset,
        np.arange(len(dataset)) if indices is None else indices,
        recipe,
        device,
        amp_dtype,
        checkpoint=directory / "checkpoint.pt",
        meta=meta,
        workers=workers,
        progress=progress,
        desc=desc,
        after_epoch=after_epoch,
        world=world,
    )
    if world.is_main:
        save_atomic(model.state_dict(), directory / "model.pt")
    info = {
        "name": model_name,
        "parameters": sum(p.numel() for p in model.parameters()),
        "trained_epochs": len(history),
        "history": history,
        "weights": str(directory / "model.pt"),
        "seconds": round(time.perf_counter() - started, 2),
    }
    return model, info
