"""The scan's seed when none is given: drawn per scan from the operating system's randomness, so that an attacker
who imitates the scan's proxy (its recipe and its documented defaults) cannot imitate its seed too. An attacker
whose proxies trained with the scan's seed passed the gate where one with seeds of its own was caught
(reports/adaptive-attack). The seed is kept in OUT so that a killed scan resumes with the same proxy, and recorded
in the summary, so that `--seed N` repeats a scan."""

from __future__ import annotations

import secrets
from pathlib import Path

from sanitize.distributed import World, broadcast_from_main

SEED_FILE = "proxy-seed.txt"
SEED_RANGE = 2**31  # what every generator the scan seeds takes


def scan_seed(given: int | None, out: Path, world: World) -> int:
    """`given`, or the seed kept in OUT by an earlier run of this scan, or a new draw kept there (by the main process;
    every process gets the main one's)."""
    if given is not None:
        return given
    seed = None
    if world.is_main:
        seed = kept_seed(out / SEED_FILE)
        if seed is None:
            seed = drawn_seed()
            (out / SEED_FILE).write_text(f"{seed}\n")
    return broadcast_from_main(seed, world)


def drawn_seed() -> int:
    """A new seed from the operating system's randomness."""
    return secrets.randbelow(SEED_RANGE)


def kept_seed(path: Path) -> int | None:
    """The seed an earlier run kept at `path`; None when there is none or it is not one (a new draw replaces it)."""
    try:
        text = path.read_text().strip()
    except (OSError, UnicodeDecodeError):
        return None
    return int(text) if text.isdigit() and int(text) < SEED_RANGE else None
