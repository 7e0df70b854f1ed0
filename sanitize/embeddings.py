"""One streamed pass over the data: penultimate features, logits and the last-layer gradient, to memory-mapped files.

For example i with features f_i (D), logits z_i (C) and label y_i, the cross-entropy gradient of the last layer is
g_i (x) [f_i, 1] with g_i = softmax(z_i) - onehot(y_i): weight part g_i f_i^T, bias part g_i. Its norm and inner
products factorise (||G_i|| = ||g_i|| ||f~_i||, <G_i, G_j> = <g_i, g_j><f~_i, f~_j>), so it is only written out when
C x (D + 1) is small; otherwise it is sketched to m dimensions by s_i = (A g_i) * (B f~_i) / sqrt(m) with Gaussian A,
B, whose inner products are unbiased estimates of the true ones. No C x D vector per example is ever formed then.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from numpy.lib.format import open_memmap
from tqdm import tqdm

from sanitize.data import ImageDataset, iterate_batches, write_atomic
from sanitize.density import CHUNK_BYTES, row_chunks, softmax
from sanitize.distributed import World, barrier, broadcast_from_main
from sanitize.models import Classifier
from sanitize.training import ETA_BATCHES, autocast, to_model_input
from sanitize.wording import duration, plural

ARRAYS = ("features", "logits", "gradient")
DERIVED = "logit_gradient"  # computed from the logits on first use; removed when the pass is redone
SAVE_SECONDS = 60  # the pass saves its progress at least this often (and every 20,000 rows)


def last_layer_gradient_factors(
    features: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(g, f~): the per-example last-layer gradient is their outer product g (x) f~."""
    g = torch.softmax(logits.float(), dim=1) - F.one_hot(labels, logits.shape[1]).float()
    f_tilde = torch.cat([features.float(), torch.ones_like(features[:, :1], dtype=torch.float32)], dim=1)
    return g, f_tilde


class GradientEmbedder:
    """Maps (g, f~) to a vector whose Euclidean geometry is the last-layer gradient's (exactly, or sketched)."""

    def __init__(self, num_classes: int, feature_dim: int, sketch_dim: int, exact_max: int, seed: int = 0):
        self.full_dim = num_classes * (feature_dim + 1)
        self.exact = self.full_dim <= exact_max
        self.dim = self.full_dim if self.exact else sketch_dim
        if not self.exact:
            generator = torch.Generator().manual_seed(seed)
            self.a = torch.randn(sketch_dim, num_classes, generator=generator)
            self.b = torch.randn(sketch_dim, feature_dim + 1, generator=generator)

    def __call__(self, g: torch.Tensor, f_tilde: torch.Tensor) -> torch.Tensor:
        if self.exact:
            return (g[:, :, None] * f_tilde[:, None, :]).flatten(1)
        a, b = self.a.to(g.device), self.b.to(g.device)
        return (g @ a.T) * (f_tilde @ b.T) / math.sqrt(self.dim)


def softmax_minus_onehot(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """d CE / d logits for every example: the last-layer gradient's class factor, EPIC's gradient proxy."""
    p = softmax(logits)
    p[np.arange(len(p)), labels] -= 1.0
    return p.astype(np.float32)


def cross_entropy(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Per-example cross-entropy loss of the proxy, from its logits."""
    z = logits - logits.max(axis=1, keepdims=True)
    log_p = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    return -log_p[np.arange(len(labels)), labels]


@dataclass
class Embeddings:
    """Read-only views of a finished embedding pass (rows follow the dataset's positions)."""

    directory: Path
    features: np.ndarray
    logits: np.ndarray
    gradient: np.ndarray
    labels: np.ndarray
    meta: dict
    out_of_fold_logits: np.ndarray | None = None  # (N, C) from proxies that never saw the row (scan --proxy-folds)

    def logit_gradient(self, budget: int = CHUNK_BYTES) -> np.ndarray:
        """softmax - onehot (C), EPIC's gradient proxy, memory-mapped: written beside the logits a chunk of rows at a
        time on first use (an N x C array in memory is 5 GB on ImageNet) and read from there afterwards."""
        path = self.directory / f"{DERIVED}.npy"
        shape = (len(self.labels), self.logits.shape[1])
        if not _readable(path, shape):
            partial = path.with_name(f"{DERIVED}.{os.getpid()}.partial.npy")
            out = open_memmap(partial, mode="w+", dtype=np.float32, shape=shape)
            for rows in row_chunks(shape[0], shape[1] * 8, budget):  # softmax works in float64
                out[rows] = softmax_minus_onehot(np.asarray(self.logits[rows]), self.labels[rows])
            out.flush()
            del out
            os.replace(partial, path)  # a present file is a whole one
        return np.load(path, mmap_mode="r", allow_pickle=False)

    def space(self, name: str) -> np.ndarray:
        """The embedding the density step works in: gradient, features or logit_gradient."""
        if name == "gradient":
            return self.gradient
        if name == "features":
            return self.features
        return self.logit_gradient()

    def proxy_statistics(self, budget: int = CHUNK_BYTES) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Per example: the proxy's loss, its predicted class and that class's probability, read from the logits a
        chunk of rows at a time (no N x C copy: 5 GB on ImageNet)."""
        n = len(self.labels)
        loss, predicted, confidence = np.empty(n, np.float32), np.empty(n, np.int64), np.empty(n, np.float32)
        for rows in row_chunks(n, self.logits.shape[1] * 8, budget):  # softmax works in float64
            logits = np.asarray(self.logits[rows])
            probabilities = softmax(logits)
            loss[rows] = cross_entropy(logits, self.labels[rows])
            predicted[rows], confidence[rows] = probabilities.argmax(axis=1), probabilities.max(axis=1)
        return loss, predicted, confidence

    def accuracy(self, budget: int = CHUNK_BYTES) -> float:
        """The proxy's accuracy on these rows, a chunk at a time (argmax over a whole memory map copies it)."""
        chunks = row_chunks(len(self.labels), self.logits.shape[1] * 4, budget)
        correct = sum(int((self.logits[rows].argmax(axis=1) == self.labels[rows]).sum()) for rows in chunks)
        return correct / len(self.labels)

    def rows(self, keep: np.ndarray, directory: Path, budget: int = CHUNK_BYTES) -> Embeddings:
        """The rows at `keep` (positions, ascending) as memory-mapped copies in `directory`, written a chunk of rows at
        a time (no N x D copy in memory): what the detector sees once examples left the data after this pass."""
        directory.mkdir(parents=True, exist_ok=True)
        for name in ARRAYS:
            source = getattr(self, name)
            copy = open_memmap(
                directory / f"{name}.npy", mode="w+", dtype=np.float32, shape=(len(keep), source.shape[1])
            )
            for rows in row_chunks(len(keep), source.shape[1] * 4, budget):
                copy[rows] = source[keep[rows]]
            copy.flush()
            del copy
        write_atomic(directory / "meta.json", json.dumps(self.meta | {"rows": len(keep)}, indent=1))
        kept = load_embeddings(directory, self.labels[keep])
        if self.out_of_fold_logits is not None:
            kept.out_of_fold_logits = self.out_of_fold_logits[keep]
        return kept


def load_embeddings(directory: Path, labels: np.ndarray) -> Embeddings:
    meta = json.loads((directory / "meta.json").read_text())
    arrays = {name: np.load(directory / f"{name}.npy", mmap_mode="r", allow_pickle=False) for name in ARRAYS}
    return Embeddings(directory=directory, labels=labels, meta=meta, **arrays)


def read_json(path: Path) -> Any:
    """A JSON file's content, or None when it is missing or damaged (resume state that is redone, not a crash)."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _readable(path: Path, shape: tuple[int, int]) -> bool:
    """Whether `path` is a float32 .npy array of `shape` (a damaged one is rewritten)."""
    try:
        array = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError, EOFError):
        return False
    return array.shape == shape and array.dtype == np.float32


@torch.no_grad()
def compute_embeddings(
    model: Classifier,
    dataset: ImageDataset,
    directory: Path,
    device: torch.device,
    amp_dtype: torch.dtype | None,
    sketch_dim: int = 1024,
    exact_gradient_max: int = 8192,
    batch_size: int = 512,
    workers: int = 0,
    seed: int = 0,
    signature: str = "",
    progress: bool = True,
    world: World = World(),
) -> Embeddings:
    """Run the pass, writing rows as they come; a pass with the same `signature` resumes where it stopped. Under
    torchrun rank 0 creates the files and every rank fills its contiguous share of the rows (and keeps its own
    progress file)."""
    directory.mkdir(parents=True, exist_ok=True)
    embedder = GradientEmbedder(model.num_classes, model.feature_dim, sketch_dim, exact_gradient_max, seed)
    n = len(dataset)
    meta = {
        "signature": signature,
        "rows": n,
        "feature_dim": model.feature_dim,
        "num_classes": model.num_classes,
        "gradient": "exact" if embedder.exact else "sketch",
        "gradient_dim": embedder.dim,
        "sketch_seed": seed,
    }
    meta_path = directory / "meta.json"
    progress_path = directory / (
        "progress.json" if not world.distributed else f"progress-{world.rank}-of-{world.world_size}.json"
    )
    shapes = {"features": (n, model.feature_dim), "logits": (n, model.num_classes), "gradient": (n, embedder.dim)}
    same_pass = None
    if world.is_main:
        same_pass = read_json(meta_path) == meta and all(
            _readable(directory / f"{name}.npy", shapes[name]) for name in ARRAYS
        )
        if not same_pass:
            for stale in [*directory.glob("progress*.json"), *directory.glob(f"{DERIVED}*.npy")]:
                stale.unlink()
            for name, shape in shapes.items():
                open_memmap(directory / f"{name}.npy", mode="w+", dtype=np.float32, shape=shape).flush()
            write_atomic(meta_path, json.dumps(meta, indent=1))
    same_pass = broadcast_from_main(same_pass, world)  # after rank 0 made the files: no rank opens them before
    lo, hi = world.row_range(n)
    done = (read_json(progress_path) or {}).get("rows_done") if same_pass else None
    start = done if isinstance(done, int) and lo <= done <= hi else lo  # damaged or foreign progress: from the start
    if progress and lo < start < hi:
        print(f"resuming the embedding pass at row {start:,} of {hi:,}", file=sys.stderr)
    arrays = {name: open_memmap(directory / f"{name}.npy", mode="r+") for name in ARRAYS}
    model.to(device, memory_format=torch.channels_last).eval()
    rows = np.arange(start, hi)
    bar = tqdm(total=hi - lo, initial=start - lo, desc="embed", unit="img", disable=not progress)
    checkpoint_every, saved = max(1, 20_000 // batch_size), time.monotonic()
    started = time.perf_counter()
    for step, (images, labels, positions) in enumerate(iterate_batches(dataset, rows, batch_size, workers), 1):
        if step == ETA_BATCHES + 1 and progress and world.is_main:  # its rough length, before it is under way
            total = (time.perf_counter() - started) / ETA_BATCHES * -(-len(rows) // batch_size)
            tqdm.write(f"embed: about {duration(total)} for {plural(len(rows), 'image')}", sys.stderr)
        with autocast(device, amp_dtype):
            features = model.features(to_model_input(images, device))
            logits = model.head(features)
        labels = labels.to(device)
        g, f_tilde = last_layer_gradient_factors(features, logits, labels)
        first, end = int(positions[0]), int(positions[-1]) + 1
        arrays["features"][first:end] = features.float().cpu().numpy()
        arrays["logits"][first:end] = logits.float().cpu().numpy()
        arrays["gradient"][first:end] = embedder(g, f_tilde).cpu().numpy()
        bar.update(end - first)
        if step % checkpoint_every == 0 or end == hi or time.monotonic() - saved > SAVE_SECONDS:
            for array in arrays.values():
                array.flush()
            write_atomic(progress_path, json.dumps({"rows_done": end}))
            saved = time.monotonic()
    bar.close()
    del arrays
    barrier(world)  # every share is written
    return load_embeddings(directory, dataset.labels)
