"""Models trained again on the current poisons while crafting (attacks.refresh): trained when due, and back after a
resume; a craft that re-trains its surrogates, killed in the middle of a restart, resumes against the same surrogates
to the same poisons."""

import pytest
import torch

from attacks import attack_options, choose_setup, craft, get_attack
from attacks.base import PoisonSet
from attacks.experiment import arm_data
from attacks.refresh import RefreshedModels
from attacks.smoke import CPU


def test_models_train_when_due_and_come_back_after_a_resume():
    trained = []

    def train_on(deltas, iteration):
        trained.append((int(deltas.sum()), iteration))
        return [torch.nn.Linear(2, 2)]

    now = {"deltas": torch.zeros(3, dtype=torch.int16)}

    def run(models, steps):
        for iteration in steps:
            now["deltas"] = torch.full((3,), iteration, dtype=torch.int16)
            models.at(iteration, None)

    proxies = RefreshedModels(train_on, lambda _: now["deltas"].clone(), 10)
    run(proxies, range(25))
    assert trained == [(0, 0), (30, 10), (60, 20)]
    resumed = RefreshedModels(train_on, lambda _: pytest.fail("a resume trains on the saved deltas"), 10)
    resumed.load_state_dict(proxies.state_dict())
    assert trained[-1] == (60, 20) and resumed.at(25, None) is resumed.models
    trained.clear()
    run(RefreshedModels(train_on, lambda _: now["deltas"].clone(), 0), range(25))
    assert trained == [(0, 0)]  # every 0: once, at the first step
    trained.clear()
    initial = [torch.nn.Linear(2, 2)]
    surrogates = RefreshedModels(train_on, lambda _: now["deltas"].clone(), 10, initial=initial)
    run(surrogates, range(15))
    assert trained == [(30, 10)] and surrogates.at(15, None) is not initial
    before = RefreshedModels(train_on, None, 10, initial=initial)
    before.load_state_dict({"deltas": None, "iteration": 0})
    assert before.at(5, None) is initial and trained == [(30, 10)]  # saved before any re-training: the initial models


@pytest.mark.parametrize(
    "models, options",
    [
        ("retrain", {"retrain_every": 2}),
        ("proxies", {"evade": 1.0, "evade_space": "proxy", "evade_refresh": 2}),
    ],
)
def test_a_craft_that_refreshes_models_killed_midway_resumes_against_the_same_models_to_the_same_poisons(
    tmp_path, split, tiny_victim, monkeypatch, models, options
):
    """Re-trained surrogates (retrain_every) and the evasion's proxies (evade_space=proxy) alike."""
    train, test = split
    surrogate = tiny_victim(train, seed=100).eval()
    setup = choose_setup(1, train, test, budget=0.02)
    trained = []

    def train_on(deltas, iteration):
        trained.append(iteration)
        data = arm_data(train, "undefended", PoisonSet(setup, 32, deltas, "gradient-matching"), setup, 32)
        return [tiny_victim(data, seed=300 + iteration)]

    def run(checkpoint=None):
        crafting = attack_options("gradient-matching", iterations=5, restarts=1, augment=False, **options)
        target = test.load_image(setup.target_index)
        return craft(
            "gradient-matching", [surrogate], train, target, setup, 32, crafting, CPU, progress=False,
            checkpoint=checkpoint, save_every=0.0, **{models: train_on},
        )  # fmt: skip

    straight = run()
    assert trained == ([2, 4] if models == "retrain" else [0, 2, 4])
    attack, steps = get_attack("gradient-matching"), []
    real_loss = attack.loss

    def dying(self, *args, **kwargs):
        steps.append(1)
        if len(steps) == 4:  # the fourth iteration (one batch a step), after the training at the third
            raise KeyboardInterrupt
        return real_loss(self, *args, **kwargs)

    monkeypatch.setattr(attack, "loss", dying)
    trained.clear()
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "partial.pt")
    saved = torch.load(tmp_path / "partial.pt", weights_only=True)["within"]
    assert saved["surrogates" if models == "retrain" else "evade_proxies"]["iteration"] == 2
    monkeypatch.setattr(attack, "loss", real_loss)
    trained.clear()
    resumed = run(tmp_path / "partial.pt")
    assert trained == [2, 4]  # the saved moment's models again (a cache would load them), then the ones due
    assert torch.equal(resumed.deltas, straight.deltas)
