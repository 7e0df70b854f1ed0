"""Words for messages a user reads."""

import difflib


def plural(count: int, noun: str) -> str:
    """'1 file', '2 files', '1 class', '3 classes'."""
    return f"{count} {noun}" if count == 1 else f"{count} {noun}{'es' if noun.endswith('s') else 's'}"


def unknown(kind: str, name: str, choices: list[str]) -> str:
    """ "unknown model 'convnt' (did you mean convnet?); choose from ...": a typo gets the nearest name."""
    close = difflib.get_close_matches(name, choices, n=1)
    hint = f" (did you mean {close[0]}?)" if close else ""
    return f"unknown {kind} {name!r}{hint}; choose from {', '.join(choices)}"


def duration(seconds: float) -> str:
    """'40 s', '12 min', '3.5 h': a rough time a user reads."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def disk_size(count: int) -> str:
    """'12 MB', '15.7 GB': a size on disk a user reads."""
    return f"{count / 1e6:.0f} MB" if count < 1e9 else f"{count / 1e9:.1f} GB"
