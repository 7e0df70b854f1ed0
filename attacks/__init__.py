"""Attacks that craft real poisons: against from-scratch training, and against transfer (attacks.transfer).

One registry (attacks.registry: `register_attack`, `list_attacks`), one crafting loop (attacks.crafting), one file
per attack; the evaluation (attacks.evaluate) trains victims on what they craft.
"""

from __future__ import annotations

from attacks import bullseye, gradient_matching, metapoison, poison_frogs  # noqa: F401  (registers the attacks)
from attacks.base import PoisonSet, PoisonSetup, choose_setup, load_poisons, save_poisons, write_poisoned
from attacks.crafting import craft
from attacks.registry import attack_options, get_attack, list_attacks, parse_option, register_attack
from sanitize.manifest import read_manifest

__all__ = [
    "PoisonSet",
    "PoisonSetup",
    "attack_options",
    "choose_setup",
    "craft",
    "get_attack",
    "list_attacks",
    "load_poisons",
    "parse_option",
    "read_manifest",
    "register_attack",
    "save_poisons",
    "write_poisoned",
]
