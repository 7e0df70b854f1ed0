"""Models trained again from scratch on the data with the current poisons while crafting: the surrogates of
`retrain_every` (Sleeper Agent's re-training) and the evasion's proxies of `evade_space=proxy`. What they were last
trained on is part of a restart's saved moment, so a killed craft resumes against the same models (the evaluation's
model cache gives them back without training them again)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch


class RefreshedModels:
    """`train_on(deltas, iteration)` gives models trained on the data with these integer deltas; `deltas_of` turns the
    perturbation into them. Trained at every `every`-th step (0: never again); `initial` is what is used before the
    first training (None: train at the first step)."""

    def __init__(
        self, train_on: Callable, deltas_of: Callable, every: int, initial: Sequence[torch.nn.Module] | None = None
    ) -> None:
        self.train_on, self.deltas_of, self.every, self.initial = train_on, deltas_of, every, initial
        self.models = initial
        self.deltas: torch.Tensor | None = None
        self.iteration = 0

    def at(self, iteration: int, perturbation) -> Sequence[torch.nn.Module]:
        """The models for this step: trained again when it is due."""
        due = self.every and iteration % self.every == 0 and iteration != self.iteration
        if self.models is None or due:
            self.deltas, self.iteration = self.deltas_of(perturbation).cpu(), iteration
            self.models = self.train_on(self.deltas, iteration)
        return self.models

    def state_dict(self) -> dict:
        return {"deltas": self.deltas, "iteration": self.iteration}

    def load_state_dict(self, state: dict) -> None:
        """Back to the models of a saved moment: `initial`, or trained (or loaded) again on its deltas."""
        self.deltas, self.iteration = state["deltas"], state["iteration"]
        self.models = self.initial if self.deltas is None else self.train_on(self.deltas, self.iteration)
