import dataclasses
import json

import numpy as np
import pytest
import torch

from attacks import attack_options, choose_setup, craft, load_poisons, read_manifest, save_poisons, write_poisoned
from attacks.base import random_shift_flip
from attacks.carriers import poison_pull, pull_carriers
from attacks.crafting import parameter_gradient
from sanitize.data import open_dataset
from sanitize.data.digits import write_image_folder
from sanitize.errors import SanitizeError

CPU = torch.device("cpu")
EPS = 32  # the smoke scale: a tiny net on 16 px digits needs a larger ball than CIFAR's 16 to show an effect in seconds


@pytest.fixture(scope="module")
def crafted(split, tiny_victim):
    train, test = split
    surrogate = tiny_victim(train, seed=100)
    setup = choose_setup(1, train, test, budget=0.1)
    config = attack_options("gradient-matching", iterations=60, restarts=2, batch_size=64, augment=False, seed=0)
    target = test.load_image(setup.target_index)
    poisons = craft("gradient-matching", [surrogate], train, target, setup, EPS, config, device=CPU, progress=False)
    return train, test, setup, poisons


def test_setup_is_deterministic_and_draws_from_the_intended_class(split):
    train, test = split
    a, b, c = (choose_setup(k, train, test, 0.02) for k in (5, 5, 6))
    assert a == b and a != c
    assert a.target_class != a.intended_class and test.labels[a.target_index] == a.target_class
    assert len(a.poison_indices) == 30 and (train.labels[list(a.poison_indices)] == a.intended_class).all()
    with pytest.raises(SanitizeError, match="budget"):
        choose_setup(5, train, test, 0.5)


def test_alignment_loss_decreases_and_restarts_are_recorded(crafted):
    *_, poisons = crafted
    history = poisons.metadata["loss_history_best"]
    assert len(history) == 60 and len(poisons.metadata["final_loss_per_restart"]) == 2
    assert np.mean(history[-5:]) < np.mean(history[:5]) - 0.05
    assert min(poisons.metadata["final_loss_per_restart"]) == history[-1]


def test_perturbations_stay_in_eps_and_pixel_range(crafted):
    train, _, setup, poisons = crafted
    clean = train.load_batch(list(setup.poison_indices))[0]
    poisoned = poisons.apply(clean)
    change = poisoned.to(torch.int16) - clean.to(torch.int16)
    assert change.abs().max() <= EPS and change.abs().max() >= EPS // 2
    assert poisons.deltas.dtype == torch.int16


def test_npz_and_folder_copies_round_trip_bit_exactly(tmp_path, crafted):
    train, _, setup, poisons = crafted
    expected = poisons.apply(train.load_batch(list(setup.poison_indices))[0])
    write_poisoned(train, poisons, tmp_path / "npz")
    back = open_dataset(tmp_path / "npz" / "data.npz")
    positions = list(setup.poison_indices)
    assert torch.equal(back.load_batch(positions)[0], expected)
    np.testing.assert_array_equal(back.labels, train.labels)
    others = np.setdiff1d(np.arange(len(train)), positions)
    np.testing.assert_array_equal(back.images[others], train.images[others])
    record = read_manifest(tmp_path / "npz")
    assert (
        record["poison_ids"] == [str(p) for p in positions]
        and record["eps"] == EPS
        and record["intended_class"] == setup.intended_class
    )

    folder = tmp_path / "source"
    ids = write_image_folder(folder, train.images, train.labels, [str(c) for c in range(10)])
    source = open_dataset(folder, progress=False)
    # the same poisons, addressed by the folder's positions (it is ordered by class, then file name)
    folder_positions = tuple(source.ids.index(ids[p]) for p in positions)
    folder_poisons = dataclasses.replace(poisons, setup=dataclasses.replace(setup, poison_indices=folder_positions))
    before = {p.name: p.read_bytes() for p in folder.rglob("*.png")}
    write_poisoned(source, folder_poisons, tmp_path / "folder")
    assert {p.name: p.read_bytes() for p in folder.rglob("*.png")} == before  # the source is untouched
    copy = open_dataset(tmp_path / "folder" / "data", progress=False)
    record = read_manifest(tmp_path / "folder")
    by_id = {id_: i for i, id_ in enumerate(copy.ids)}
    assert torch.equal(copy.load_batch([by_id[i] for i in record["poison_ids"]])[0], expected)


def test_a_saved_poison_set_loads_back_exactly_and_a_wrong_or_damaged_one_is_a_clear_error(tmp_path, crafted):
    _, _, setup, poisons = crafted
    save_poisons(poisons, tmp_path / "p.npz")
    back = load_poisons(tmp_path / "p.npz", setup)
    assert (
        torch.equal(back.deltas, poisons.deltas)
        and back.eps == poisons.eps
        and back.metadata == json.loads(json.dumps(poisons.metadata))
        and back.method == poisons.method
    )
    other = dataclasses.replace(setup, poison_indices=tuple(i + 1 for i in setup.poison_indices))
    with pytest.raises(SanitizeError, match="other positions"):
        load_poisons(tmp_path / "p.npz", other)
    too_big = dataclasses.replace(poisons, deltas=poisons.deltas * 0 + int(EPS) + 1)
    save_poisons(too_big, tmp_path / "big.npz")
    with pytest.raises(SanitizeError, match="larger than its eps"):
        load_poisons(tmp_path / "big.npz", setup)
    (tmp_path / "cut.npz").write_bytes((tmp_path / "p.npz").read_bytes()[:100])
    with pytest.raises(SanitizeError, match="not a poison set"):
        load_poisons(tmp_path / "cut.npz", setup)


def test_bad_manifest_is_a_clear_error(tmp_path):
    (tmp_path / "poison_manifest.json").write_text(json.dumps({"method": "x"}))
    with pytest.raises(SanitizeError, match="not a poison manifest"):
        read_manifest(tmp_path)
    (tmp_path / "poison_manifest.json").write_text("{truncated")
    with pytest.raises(SanitizeError, match="cannot read"):
        read_manifest(tmp_path)


def test_differentiable_augmentation_shifts_flips_and_passes_gradients():
    x = torch.zeros(2, 3, 8, 8)
    x[:, :, 2, 3] = 1.0
    x.requires_grad_(True)
    y = random_shift_flip(x, max_shift=0, generator=torch.Generator().manual_seed(1))
    flipped = y[:, 0, 2].argmax(dim=1).tolist()
    assert set(flipped) <= {3, 4} and y.sum().item() == pytest.approx(6.0, abs=1e-4)
    y.sum().backward()
    assert x.grad.abs().sum() > 0


def test_crafted_poisons_move_victims_towards_the_intended_class_more_than_random_noise(crafted, noise_margins):
    train, test, setup, poisons = crafted
    margins = noise_margins(train, test, setup, poisons, EPS)
    assert margins["crafted"] > margins["random"] + 1.0, margins


def test_pull_splits_the_aligned_gradient_and_crafting_concentrates_it_in_few_carriers(crafted, tiny_victim):
    train, test, setup, poisons = crafted
    surrogate = tiny_victim(train, seed=100).eval()  # the fixture's surrogate, retrained deterministically
    positions = np.asarray(setup.poison_indices)
    clean = torch.from_numpy(train.images[positions]).permute(0, 3, 1, 2)
    labels = torch.from_numpy(train.labels[positions]).long()
    signs = torch.randint(0, 2, clean.shape, generator=torch.Generator().manual_seed(0)).to(torch.int16) * 2 - 1
    variants = {
        "clean": clean,
        "crafted": poisons.apply(clean),
        "random": (clean.to(torch.int16) + EPS * signs).clamp(0, 255).to(torch.uint8),
    }
    target = test.load_image(setup.target_index)
    flat = lambda grads: torch.cat([g.flatten() for g in grads])  # noqa: E731
    target_grad = flat(
        parameter_gradient(surrogate, target.float().div(255)[None], torch.tensor([setup.intended_class]), False, None)
    )
    direction = target_grad / target_grad.norm()
    cosine, carriers = {}, {}
    for name, images in variants.items():
        pull = poison_pull(surrogate, images, labels, target, setup.intended_class)
        batch_grad = flat(parameter_gradient(surrogate, images.float().div(255), labels, False, None))
        # per-poison pulls add up to the poison batch's gradient along the target's: the quantity the attack aligns
        assert pull.sum() == pytest.approx(len(pull) * float(batch_grad @ direction), rel=1e-4)
        cosine[name] = float(batch_grad @ direction / batch_grad.norm())
        mask = pull_carriers(pull)
        assert pull[mask].sum() >= 0.5 * pull.sum() > pull[mask].sum() - pull[mask].min()  # half, and no fewer would do
        carriers[name] = int(mask.sum())
    assert cosine["crafted"] > max(cosine["clean"], cosine["random"]) + 0.1, cosine
    assert carriers["crafted"] < min(carriers["clean"], carriers["random"]), carriers
