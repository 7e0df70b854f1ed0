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
