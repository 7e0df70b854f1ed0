"""Exclusive file locks for the work that shards of one evaluation can share (a defended arm plans its undefended
twin, two keys' runs may scan or craft the same set, every shard appends to one results file): the second process
to come waits for the first and then finds the work done, instead of doing it again beside it and racing on its
checkpoint."""

from __future__ import annotations

import contextlib
import fcntl
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import IO


@contextlib.contextmanager
def exclusive(path: Path, waiting: str | None = None) -> Iterator[IO[str]]:
    """Hold an exclusive lock on `path` (opened for appending, created if missing; POSIX flock, so the lock goes with
    a process that dies) and yield the open file. With `waiting`, say it on stderr when another process holds it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", encoding="utf-8") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if waiting:
                print(f"note: waiting for another process: {waiting}", file=sys.stderr)
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield handle
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
