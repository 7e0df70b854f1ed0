"""The adaptive attacker's feature anchor: zero on the clean images, and poisons crafted with it move their features
less than the plain attack's, on the surrogate that crafted them."""

import numpy as np
import pytest
import torch

from attacks import attack_options, choose_setup, craft
from attacks.adaptive import DensityEvasion, FeatureAnchor
from attacks.base import PoisonSet
from attacks.crafting import CHOICES
from attacks.experiment import arm_data
from attacks.smoke import CPU
from sanitize.density import robust_z
from sanitize.errors import SanitizeError


def test_the_anchor_is_zero_on_the_clean_images_and_grows_with_the_feature_change(split, tiny_victim):
    train, _ = split
    surrogate = tiny_victim(train, seed=100).eval()
    clean = train.load_batch(np.arange(8))[0].float().div(255)
    anchor = FeatureAnchor([surrogate], clean, None)
    with torch.no_grad():
        assert float(anchor(clean[2:6], slice(2, 6))) == pytest.approx(0.0, abs=1e-7)
        small, large = (float(anchor((clean + s).clamp(0, 1), slice(None))) for s in (0.02, 0.2))
    assert 0 < small < large


def test_anchored_poisons_move_their_features_less_than_the_plain_attacks(split, tiny_victim):
    train, test = split
    surrogate = tiny_victim(train, seed=100).eval()
    setup = choose_setup(1, train, test, budget=0.02)
    positions = np.asarray(setup.poison_indices)
    clean = train.load_batch(positions)[0]
    moved = {}
    for weight in (0.0, 10.0):
        options = attack_options("gradient-matching", iterations=20, restarts=1, augment=False, anchor=weight)
        target = test.load_image(setup.target_index)
        poisons = craft("gradient-matching", [surrogate], train, target, setup, 32, options, CPU, progress=False)
        with torch.no_grad():
            before = surrogate.features(clean.float() / 255)
            after = surrogate.features(poisons.apply(clean).float() / 255)
        moved[weight] = float(((after - before).pow(2).sum(1) / before.pow(2).sum(1)).mean())
    assert moved[10.0] < 0.5 * moved[0.0]


def _scan_rule_z(surrogate, train, setup, poisoned):
    """The default scan's isolation z of each poison in the surrogate's features (both scales, modified z)."""
    members = np.setdiff1d(np.flatnonzero(train.labels == setup.intended_class), setup.poison_indices)
    with torch.no_grad():
        clean = surrogate.features(train.load_batch(members)[0].float() / 255)
        features = torch.cat([clean, surrogate.features(poisoned.float() / 255)]).numpy()
    distances = np.sort(np.linalg.norm(features[:, None] - features[None], axis=2), axis=1)[:, 1:]
    ks = [10, round(0.5 * len(features))]
    z = np.max([robust_z(np.log(distances[:, k - 1] + 1e-12)) for k in ks], axis=0)
    return z[len(members) :]


@pytest.mark.parametrize("variant, scope", [("spread", "batch"), ("clump", "batch"), ("spread", "all")])
def test_evading_poisons_sit_lower_in_the_scans_isolation_rule_than_the_plain_attacks(
    split, tiny_victim, variant, scope
):
    train, test = split
    surrogate = tiny_victim(train, seed=100).eval()
    setup = choose_setup(1, train, test, budget=0.02)
    clean = train.load_batch(np.asarray(setup.poison_indices))[0]
    z = {}
    for weight in (0.0, 10.0):
        options = attack_options(
            "gradient-matching",
            iterations=20,
            restarts=1,
            augment=False,
            evade=weight,
            evade_variant=variant,
            evade_scope=scope,
        )
        target = test.load_image(setup.target_index)
        poisons = craft("gradient-matching", [surrogate], train, target, setup, 32, options, CPU, progress=False)
        z[weight] = float(np.mean(_scan_rule_z(surrogate, train, setup, poisons.apply(clean))))
    assert z[10.0] < z[0.0] - 0.5


def test_spread_over_all_poisons_repels_the_poisons_of_other_batches(split, tiny_victim):
    train, test = split
    surrogate = tiny_victim(train, seed=100).eval()
    setup = choose_setup(1, train, test, budget=0.02)
    poisons = train.load_batch(np.asarray(setup.poison_indices))[0].float().div(255)
    half = len(poisons) // 2
    second = poisons[:half]
    penalties = {}
    with torch.no_grad():
        for scope, first in (("all", poisons[:half]), ("all", poisons[half : 2 * half]), ("batch", poisons[:half])):
            evasion = DensityEvasion([surrogate], train, setup, "spread", None, scope)
            evasion(first, slice(0, half))
            twins = bool((first == second).all())
            penalties[scope, twins] = float(evasion(second, slice(half, 2 * half)))
    # over all poisons, a poison whose twin (distance 0) sits in the batch before is pushed harder than one whose
    # batch before holds other poisons; over a batch only, the batch before does not count
    assert penalties["all", True] > penalties["all", False] + 0.1
    assert penalties["batch", True] < penalties["all", True] - 0.1


@pytest.mark.parametrize(
    "option",
    [
        {"evade_variant": "scatter"},
        {"evade_scope": "sideways"},
        {"evade_model": "resnet81"},
        {"evade_model": "scan+resnet81"},
    ],
)
def test_an_unknown_evasion_variant_scope_or_proxy_model_is_refused_before_crafting(split, tiny_victim, option):
    train, test = split
    setup = choose_setup(1, train, test, budget=0.02)
    options = attack_options("gradient-matching", iterations=1, restarts=1, evade=1.0, **option)
    with pytest.raises(SanitizeError, match=next(iter(option))):
        craft("gradient-matching", [tiny_victim(train, seed=100)], train, test.load_image(0), setup, 32, options, CPU)


def test_evading_in_the_proxy_space_needs_a_way_to_train_the_proxies(split):
    train, test = split
    setup = choose_setup(1, train, test, budget=0.02)
    options = attack_options("gradient-matching", iterations=2, restarts=1, evade=1.0, evade_space="proxy")
    with pytest.raises(SanitizeError, match="evade_space=proxy needs proxies"):
        craft("gradient-matching", [], train, test.load_image(setup.target_index), setup, 32, options, CPU)


def test_poisons_evading_proxies_trained_on_them_sit_lower_in_a_defenders_proxy_of_another_seed(split, tiny_victim):
    """The defender's proxy trains on the poisoned set with a seed the attacker does not know: evasion computed in
    proxies trained on the current poisons (evade_space=proxy) lowers the scan rule's z of the poisons there."""
    train, test = split
    surrogate = tiny_victim(train, seed=100).eval()
    setup = choose_setup(1, train, test, budget=0.02)
    clean = train.load_batch(np.asarray(setup.poison_indices))[0]

    def poisoned(deltas):
        return arm_data(train, "undefended", PoisonSet(setup, 32, deltas, "gradient-matching"), setup, 32)

    calls = []

    def proxies(deltas, iteration):
        calls.append(iteration)
        return [tiny_victim(poisoned(deltas), seed=300 + iteration)]

    z = {}
    for weight in (0.0, 10.0):
        options = attack_options(
            "gradient-matching", iterations=20, restarts=1, augment=False, evade=weight, evade_space="proxy"
        )
        target = test.load_image(setup.target_index)
        poisons = craft(
            "gradient-matching", [surrogate], train, target, setup, 32, options, CPU, progress=False, proxies=proxies
        )
        defender = tiny_victim(poisoned(poisons.deltas), seed=0).eval()
        z[weight] = float(np.mean(_scan_rule_z(defender, train, setup, poisons.apply(clean))))
    assert calls == [0]  # the plain attack trains none; evade_refresh 20 trains once in 20 steps
    assert z[10.0] < z[0.0] - 0.5


@pytest.mark.parametrize("name", sorted(CHOICES))
def test_an_option_outside_its_choices_is_a_one_line_error_before_crafting(split, name):
    train, test = split
    setup = choose_setup(1, train, test, budget=0.02)
    options = attack_options("gradient-matching", iterations=2, restarts=1, **{name: "neither"})
    with pytest.raises(SanitizeError, match=f"{name} must be .* or .*, not 'neither'"):
        craft("gradient-matching", [], train, test.load_image(setup.target_index), setup, 32, options, CPU)
