"""What every registered attack must do, checked for each (as timm tests every registered model): integer deltas
inside eps and the pixel range, poisons only at the key's positions in the intended class, labels and the source data
untouched, the same poisons for the same key on one machine, and a killed craft resuming to the same poisons."""

import dataclasses
import json

import numpy as np
import pytest
import torch

from attacks import attack_options, choose_setup, craft, get_attack, list_attacks, write_poisoned
from attacks.base import load_poisons, save_poisons
from attacks.crafting import CraftingOptions
from attacks.recolor import recolor
from attacks.registry import SURROGATE_KINDS
from sanitize.config import TrainConfig
from sanitize.data import open_dataset
from sanitize.models import create_model
from sanitize.training import channel_stats, train_model

CPU = torch.device("cpu")
EPS = 16


@pytest.fixture(scope="module")
def world(tmp_path_factory, digits16):
    """Digits written as an npz (the source the contract checks stays untouched), a test set, a tiny surrogate."""
    x, y = digits16
    root = tmp_path_factory.mktemp("contract")
    np.savez(root / "train.npz", x=x[:600], y=y[:600])
    np.savez(root / "test.npz", x=x[1500:], y=y[1500:])
    train, test = open_dataset(root / "train.npz"), open_dataset(root / "test.npz")
    torch.manual_seed(0)
    model = create_model("tiny", 10, (3, 16, 16), width=16)
    model.set_normalization(*channel_stats(train))
    train_model(model, train, np.arange(len(train)), TrainConfig(epochs=2, batch_size=64), CPU, None, progress=False)
    return root, train, test, model


def surrogates_for(kind: str, model):
    """The surrogate(s) an attack of this kind crafts against, built from the tiny model."""
    if kind in ("model", "feature_extractor"):  # a classifier's features() is its feature extractor
        return [model]
    raise NotImplementedError(f"the contract tests have no surrogate of kind {kind!r} yet: add one here")


# an attack's own options made small enough for a test (the loop's are set for all below)
SMALL = {"metapoison": {"ensemble": 2, "span_epochs": 1.0, "advance_epochs": 0.1, "clean_batch": 32}}


def _craft(name, world, checkpoint=None, save_every=600.0, **extra):
    root, train, test, model = world
    setup = choose_setup(3, train, test, budget=0.03)
    options = attack_options(name, iterations=3, restarts=2, batch_size=8, seed=0, **SMALL.get(name, {}) | extra)
    target = test.load_image(setup.target_index)
    poisons = craft(
        name,
        surrogates_for(get_attack(name).surrogate, model),
        train,
        target,
        setup,
        EPS,
        options,
        device=CPU,
        progress=False,
        checkpoint=checkpoint,
        save_every=save_every,
    )
    return setup, options, poisons


@pytest.mark.parametrize("name", list_attacks())
def test_attack_declares_its_options_surrogate_and_loss(name):
    attack = get_attack(name)
    assert dataclasses.is_dataclass(attack.Options) and issubclass(attack.Options, CraftingOptions)
    assert attack.surrogate in SURROGATE_KINDS and attack.__doc__
    assert attack_options(name) == attack.Options()  # every option has a default


@pytest.mark.parametrize("name", list_attacks())
def test_poisons_are_integer_deltas_in_eps_at_the_keys_positions_and_the_source_is_untouched(tmp_path, world, name):
    root, train, _, _ = world
    source = (root / "train.npz").read_bytes()
    setup, _, poisons = _craft(name, world)
    positions = np.asarray(setup.poison_indices)
    assert (train.labels[positions] == setup.intended_class).all()
    assert poisons.deltas.dtype == torch.int16 and poisons.deltas.shape == (len(positions), 3, 16, 16)
    assert int(poisons.deltas.abs().max()) <= EPS and int(poisons.deltas.abs().max()) > 0
    clean = train.load_batch(positions)[0].to(torch.int16)
    assert int((clean + poisons.deltas).min()) >= 0 and int((clean + poisons.deltas).max()) <= 255
    write_poisoned(train, poisons, tmp_path / "poisoned")
    copy = open_dataset(tmp_path / "poisoned" / "data.npz")
    np.testing.assert_array_equal(copy.labels, train.labels)
    changed = np.flatnonzero((copy.images != train.images).any(axis=(1, 2, 3)))
    assert set(changed) <= set(positions.tolist()) and len(changed) > 0
    assert (root / "train.npz").read_bytes() == source


@pytest.mark.parametrize("name", list_attacks())
def test_crafting_is_deterministic_and_a_killed_craft_resumes_to_the_same_poisons(tmp_path, world, name, monkeypatch):
    _, _, straight = _craft(name, world)
    _, _, again = _craft(name, world)
    assert torch.equal(straight.deltas, again.deltas)
    attack, calls = get_attack(name), []
    real_loss = attack.loss

    def counted(self, *args, **kwargs):
        calls.append(1)
        if dying and len(calls) == per_restart + 2:
            raise KeyboardInterrupt
        return real_loss(self, *args, **kwargs)

    setup, options, _ = _craft(name, world)
    per_restart = options.iterations * -(-len(setup.poison_indices) // options.batch_size)
    monkeypatch.setattr(attack, "loss", counted)
    dying = True
    with pytest.raises(KeyboardInterrupt):
        _craft(name, world, tmp_path / "partial.pt")
    assert torch.load(tmp_path / "partial.pt", weights_only=True)["restarts_done"] == 1
    calls.clear()
    dying = False
    _, _, resumed = _craft(name, world, tmp_path / "partial.pt")
    assert len(calls) == per_restart  # the second restart only
    assert torch.equal(resumed.deltas, straight.deltas)
    assert resumed.metadata["final_loss_per_restart"] == pytest.approx(straight.metadata["final_loss_per_restart"])


@pytest.mark.parametrize("name", list_attacks())
def test_a_craft_killed_in_the_middle_of_a_restart_resumes_from_its_last_iteration_to_the_same_poisons(
    tmp_path, world, name, monkeypatch
):
    """A restart is saved as it goes (here after every iteration): a resumed craft runs only the iterations left,
    with the attack's moving state (MetaPoison's members) as it was."""
    _, _, straight = _craft(name, world)
    attack, calls = get_attack(name), []
    real_loss = attack.loss

    def counted(self, *args, **kwargs):
        calls.append(1)
        if dying and len(calls) == per_restart + 2 * batches + 1:  # the second restart's third iteration
            raise KeyboardInterrupt
        return real_loss(self, *args, **kwargs)

    setup, options, _ = _craft(name, world)
    batches = -(-len(setup.poison_indices) // options.batch_size)
    per_restart = options.iterations * batches
    monkeypatch.setattr(attack, "loss", counted)
    dying = True
    with pytest.raises(KeyboardInterrupt):
        _craft(name, world, tmp_path / "partial.pt", save_every=0.0)
    saved = torch.load(tmp_path / "partial.pt", weights_only=True)
    assert saved["restarts_done"] == 1 and len(saved["within"]["history"]) == 2
    calls.clear()
    dying = False
    _, _, resumed = _craft(name, world, tmp_path / "partial.pt", save_every=0.0)
    assert len(calls) == batches  # the last iteration only
    assert torch.equal(resumed.deltas, straight.deltas)
    assert resumed.metadata["final_loss_per_restart"] == pytest.approx(straight.metadata["final_loss_per_restart"])


@pytest.mark.parametrize("name", list_attacks())
def test_with_recolor_the_additive_part_stays_in_eps_of_the_recoloured_image_and_the_colour_maps_are_kept(
    tmp_path, world, name
):
    root, train, _, _ = world
    setup, options, poisons = _craft(name, world, tmp_path / "craft.pt", recolor=True, recolor_grid=4)
    _, _, from_checkpoint = _craft(name, world, tmp_path / "craft.pt", recolor=True, recolor_grid=4)
    assert torch.equal(from_checkpoint.colour, poisons.colour) and torch.equal(from_checkpoint.deltas, poisons.deltas)
    assert poisons.colour.shape == (len(setup.poison_indices), 3, 4, 4, 4)
    assert float(poisons.colour.abs().max()) <= options.recolor_bound + 1e-6 and poisons.colour.abs().max() > 0
    clean = train.load_batch(np.asarray(setup.poison_indices))[0]
    recoloured = (recolor(clean.float() / 255, poisons.colour) * 255).round()
    additive = clean.to(torch.int16) + poisons.deltas - recoloured
    assert float(additive.abs().max()) <= EPS + 1  # + 1: the recoloured image is rounded once, with the sum
    save_poisons(poisons, tmp_path / "poisons.npz")
    loaded = load_poisons(tmp_path / "poisons.npz", setup)
    assert torch.equal(loaded.colour, poisons.colour) and torch.equal(loaded.deltas, poisons.deltas)
    manifest = write_poisoned(train, poisons, tmp_path / "poisoned")
    record = json.loads((manifest / "poison_manifest.json").read_text())
    assert record["recolor"]["grid"] == 4 and record["largest_pixel_change"] == int(poisons.deltas.abs().max())
