"""Words for messages a user reads."""


def plural(count: int, noun: str) -> str:
    """'1 file', '2 files', '1 class', '3 classes'."""
    return f"{count} {noun}" if count == 1 else f"{count} {noun}{'es' if noun.endswith('s') else 's'}"
