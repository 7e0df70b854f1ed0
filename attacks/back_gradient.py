"""Back-gradient poisoning (Munoz-Gonzalez, Biggio, Demontis, Paudice, Wongrassamee, Lupu & Roli, AISec 2017), written
from the paper: poisoning points, each an image with a label the attacker chose, optimised by differentiating the
attacker's objective on a validation set through T steps of the learner's full-batch gradient-descent training.

The threat model differs from the rest of the package: the poisons are *added* training points that may carry wrong
labels (no eps ball, only the pixel range), the learner is known (perfect knowledge), and the goal is either
error-generic (raise the validation loss: the learner's error on every class) or error-specific (validation images of
class `source` classified as `destination`). Poisons start as clones of random training points with flipped labels (a
random other class; for the specific goal, images of `source` labelled `destination`), which is also the label-flip
control the evaluation compares against. Deviations from the paper: the hypergradient comes from autograd through the
unrolled steps (the paper reverses them to save memory, which these learners do not need), and all poisons move
together under Adam, projected onto [0, 1] after every step, instead of one point at a time with a line search.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from sanitize.errors import SanitizeError

GOALS = ("generic", "specific")


@dataclass
class BackGradientOptions:
    learner: str = "logistic"  # one of LEARNERS
    goal: str = "generic"  # one of GOALS
    source: int = 8  # the specific goal: validation images of this class ...
    destination: int = 3  # ... classified as this one (the paper's MNIST example: 8 as 3)
    iterations: int = 60  # the attacker's steps
    lr: float = 0.1  # Adam's rate on the pixels, in [0, 1] units
    seed: int = 0


@dataclass
class Learner:
    """A learner as the attack sees it: initial parameters, scores of inputs, its training loss and recipe (full-batch
    gradient descent for `steps` steps at `lr` with an L2 penalty `weight_decay`)."""

    init: Callable[[tuple[int, ...], int, torch.Generator], list[torch.Tensor]]
    scores: Callable[[list[torch.Tensor], torch.Tensor], torch.Tensor]
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    steps: int
    lr: float
    weight_decay: float = 1e-3


def _linear_init(shape, classes, generator):
    return [torch.zeros(math.prod(shape), classes), torch.zeros(classes)]


def _linear_scores(params, x):
    return x.flatten(1) @ params[0] + params[1]


def _adaline_loss(scores, labels):
    """Adaline's squared error against +-1 one-vs-all targets."""
    targets = F.one_hot(labels, scores.shape[1]).float() * 2 - 1
    return (scores - targets).pow(2).sum(1).mean() / 2


def _mlp_init(shape, classes, generator, hidden=10):
    dim = math.prod(shape)
    return [
        torch.randn(dim, hidden, generator=generator) / math.sqrt(dim),
        torch.zeros(hidden),
        torch.randn(hidden, classes, generator=generator) / math.sqrt(hidden),
        torch.zeros(classes),
    ]


def _mlp_scores(params, x):
    return torch.tanh(x.flatten(1) @ params[0] + params[1]) @ params[2] + params[3]


def _convnet_init(shape, classes, generator, width=8):
    channels, height, width_px = shape

    def conv(cin, cout):
        return torch.randn(cout, cin, 3, 3, generator=generator) * math.sqrt(2 / (9 * cin))

    flat = 2 * width * (height // 4) * (width_px // 4)
    return [
        conv(channels, width),
        torch.zeros(width),
        conv(width, 2 * width),
        torch.zeros(2 * width),
        torch.randn(flat, classes, generator=generator) / math.sqrt(flat),
        torch.zeros(classes),
    ]


def _convnet_scores(params, x):
    """Two conv-ReLU-maxpool blocks and a linear layer: a small convnet without batch norm."""
    h = F.max_pool2d(F.relu(F.conv2d(x, params[0], params[1], padding=1)), 2)
    h = F.max_pool2d(F.relu(F.conv2d(h, params[2], params[3], padding=1)), 2)
    return h.flatten(1) @ params[4] + params[5]


# recipes that bring each learner near convergence on the project's digits split (reports/back-gradient)
LEARNERS = {
    "logistic": Learner(_linear_init, _linear_scores, F.cross_entropy, steps=100, lr=1.0),
    "adaline": Learner(_linear_init, _linear_scores, _adaline_loss, steps=100, lr=0.06),
    "mlp": Learner(_mlp_init, _mlp_scores, F.cross_entropy, steps=200, lr=0.5),
    "convnet": Learner(_convnet_init, _convnet_scores, F.cross_entropy, steps=200, lr=0.5),
}


def get_learner(name: str) -> Learner:
    if name not in LEARNERS:
        raise SanitizeError(f"unknown learner {name!r}; choose from {', '.join(LEARNERS)}")
    return LEARNERS[name]


def train(
    learner: Learner, x: torch.Tensor, y: torch.Tensor, params: list[torch.Tensor], differentiable: bool = False
) -> list[torch.Tensor]:
    """The learner's training from `params`: full-batch gradient descent on its loss plus the L2 penalty. With
    `differentiable`, the returned parameters keep the graph of every step (gradients reach `x`)."""
    params = [p.detach().to(x.dtype).clone().requires_grad_(True) for p in params]
    with torch.enable_grad():
        for _ in range(learner.steps):
            penalty = sum(p.pow(2).sum() for p in params) * learner.weight_decay / 2
            loss = learner.loss(learner.scores(params, x), y) + penalty
            grads = torch.autograd.grad(loss, params, create_graph=differentiable)
            params = [p - learner.lr * g for p, g in zip(params, grads)]
            if not differentiable:
                params = [p.detach().requires_grad_(True) for p in params]
    return params if differentiable else [p.detach() for p in params]


def objective(
    learner: Learner, params: list[torch.Tensor], x_val: torch.Tensor, y_val: torch.Tensor, options
) -> torch.Tensor:
    """What the attacker minimises: minus the validation loss (generic), or the loss of the validation images of
    `source` labelled `destination` (specific)."""
    if options.goal == "generic":
        return -learner.loss(learner.scores(params, x_val), y_val)
    chosen = y_val == options.source
    wanted = torch.full((int(chosen.sum()),), options.destination, dtype=torch.long)
    return learner.loss(learner.scores(params, x_val[chosen]), wanted)


@dataclass
class PoisonPoints:
    """Added training points: uint8 images (P, C, H, W) and their labels, the label-flip start they were optimised
    from, and the attacker's objective along the way."""

    images: torch.Tensor
    labels: torch.Tensor
    start_images: torch.Tensor
    history: list[float]


def start_points(count: int, x: torch.Tensor, y: torch.Tensor, classes: int, options, generator) -> tuple:
    """Clones of random training points with flipped labels (the label-flip control)."""
    if options.goal == "specific":
        pool = torch.nonzero(y == options.source).flatten()
        labels = torch.full((count,), options.destination, dtype=torch.long)
    else:
        pool = torch.arange(len(y))
        labels = None
    if len(pool) == 0:
        raise SanitizeError(f"no training image of class {options.source} to start the poisons from")
    chosen = pool[torch.randint(len(pool), (count,), generator=generator)]
    if labels is None:
        labels = (y[chosen] + torch.randint(1, classes, (count,), generator=generator)) % classes
    return x[chosen].clone(), labels


def craft_back_gradient(
    x: torch.Tensor,
    y: torch.Tensor,
    x_val: torch.Tensor,
    y_val: torch.Tensor,
    count: int,
    classes: int,
    options: BackGradientOptions,
) -> PoisonPoints:
    """`count` poison points against the learner trained on (x, y) plus them; x in [0, 1], (N, C, H, W)."""
    if options.goal not in GOALS:
        raise SanitizeError(f"goal must be one of {', '.join(GOALS)}, not {options.goal!r}")
    if options.goal == "specific" and not (0 <= options.source < classes and 0 <= options.destination < classes):
        raise SanitizeError(f"source and destination must be classes 0..{classes - 1}")
    if count < 1 or options.iterations < 0:
        raise SanitizeError("back-gradient needs at least one poison and iterations >= 0")
    learner = get_learner(options.learner)
    generator = torch.Generator().manual_seed(options.seed)
    start, labels = start_points(count, x, y, classes, options, generator)
    initial = learner.init(tuple(x.shape[1:]), classes, generator)
    poisons = start.clone().requires_grad_(True)
    optimizer = torch.optim.Adam([poisons], lr=options.lr)
    best, best_value, history = start.clone(), float("inf"), []
    for _ in range(options.iterations + 1):
        params = train(learner, torch.cat([x, poisons]), torch.cat([y, labels]), initial, differentiable=True)
        value = objective(learner, params, x_val, y_val, options)
        history.append(float(value.detach()))
        if history[-1] < best_value:  # the points this step evaluated, before it moves them
            best_value, best = history[-1], poisons.detach().clone()
        optimizer.zero_grad()
        value.backward()
        optimizer.step()
        with torch.no_grad():
            poisons.clamp_(0, 1)
    return PoisonPoints(to_uint8(best), labels, to_uint8(start), history)


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    return (images.detach() * 255).round().clamp(0, 255).to(torch.uint8)


def predict(learner: Learner, params: list[torch.Tensor], x: torch.Tensor) -> np.ndarray:
    with torch.no_grad():
        return learner.scores(params, x).argmax(1).numpy()
