"""An ImageFolder directory (DATA/<class>/**/<image>), validated once and decoded lazily, batch by batch."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from sanitize.data.base import Skipped
from sanitize.data.encoded import IMAGE_EXTENSIONS, EncodedDataset, Entry, validated
from sanitize.distributed import World
from sanitize.errors import DataError
from sanitize.wording import plural


def unusable_name(name: str) -> str | None:
    """Why a file or folder name cannot be an id (ids are one per line in flagged.txt), or None."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return "its name is not valid UTF-8"
    if any(ord(c) < 32 or ord(c) == 127 for c in name):
        return "its name contains a control character (newline, tab, ...)"
    return None


def _walk(top: str, root: Path, skipped: list[Skipped]) -> tuple[list[str], list[str]]:
    """Image files under `top`, depth first in name order, without recursion (any depth) and without following
    directory symlinks (no loops, nothing outside DATA twice); what is left out and why goes to `skipped`. Paths stay
    the strings scandir gives (a Path object each would double the listing's memory at ImageNet's 1.28M files)."""
    files, ignored, stack = [], [], [top]
    while stack:
        folder = stack.pop()
        try:
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
        except OSError as error:
            skipped.append(
                Skipped(_rel(folder, root), _printable(folder), f"folder cannot be read: {error.strerror or error}")
            )
            continue
        subfolders = []
        for entry in entries:
            path = entry.path
            why = unusable_name(entry.name)
            try:
                if why is None and entry.is_dir(follow_symlinks=False):
                    subfolders.append(path)
                    continue
                if why is None and entry.is_symlink() and entry.is_dir():
                    why = "a symlink to a folder (not followed)"
                elif why is None and not entry.name.lower().endswith(IMAGE_EXTENSIONS):
                    ignored.append(_rel(path, root))
                    continue
                elif why is None and not stat.S_ISREG(entry.stat().st_mode):
                    why = "not a regular file"
            except OSError as error:  # a dangling symlink, a vanished file
                why = f"cannot be read: {error.strerror or error}"
            if why is None:
                files.append(path)
            else:
                skipped.append(Skipped(_rel(path, root), _printable(path), why))
        stack.extend(reversed(subfolders))
    return files, ignored


def _rel(path: str, root: Path) -> str:
    return _printable(os.path.relpath(path, root))


def _printable(path: str) -> str:
    """A path as text that encodes to UTF-8 (undecodable bytes as backslash escapes), for records of skipped files."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def _list_classes(root: Path) -> tuple[list[str], list[tuple[str, int]], list[str], list[Skipped]]:
    try:
        entries = sorted(os.scandir(root), key=lambda e: e.name)
    except OSError as error:
        raise DataError(f"cannot list {root}: {error}") from None
    skipped: list[Skipped] = []
    class_dirs = []
    for entry in entries:
        if entry.name.startswith(".") or not entry.is_dir(follow_symlinks=False):
            continue
        why = unusable_name(entry.name)
        if why:
            skipped.append(Skipped(_rel(entry.path, root), _printable(entry.path), f"class folder: {why}"))
        else:
            class_dirs.append(entry)
    classes = [entry.name for entry in class_dirs]
    files: list[tuple[str, int]] = []
    ignored: list[str] = []
    for label, entry in enumerate(class_dirs):
        found, others = _walk(entry.path, root, skipped)
        files.extend((path, label) for path in found)
        ignored.extend(others)
    return classes, files, ignored, skipped


def _entry(path: str, label: int, root: Path) -> Entry:
    """A file's entry: its id the path under DATA with / between parts; its shown path and its source one string."""
    return Entry(os.path.relpath(path, root).replace(os.sep, "/"), path, label, path)


def open_folder(
    root: Path,
    image_size: int | None = None,
    workers: int = 0,
    progress: bool = True,
    world: World = World(),
    validation: str = "full",
) -> FolderDataset:
    """List and validate an ImageFolder tree (`validation`: full decode or header, sanitize.data.encoded); unusable
    files are recorded in `skipped`, not raised. Under torchrun every rank reads every world_size-th file and all ranks
    share the results."""
    classes, files, ignored, skipped = _list_classes(root)
    if not classes:
        raise DataError(f"{root} has no class subfolders (expected DATA/<class>/<image>)")
    if not files:
        raise DataError(f"{root} has no image files ({', '.join(IMAGE_EXTENSIONS)})")
    notes = []
    if ignored:
        named = ", ".join(ignored[:5]) + (", ..." if len(ignored) > 5 else "")
        notes.append(f"{plural(len(ignored), 'file')} without an image extension ignored: {named}")
    entries = [_entry(path, label, root) for path, label in files]
    return validated(
        root,
        "folder",
        FolderDataset,
        classes,
        entries,
        skipped,
        notes,
        image_size,
        workers,
        progress,
        world,
        validation,
    )


class FolderDataset(EncodedDataset):
    """An ImageFolder tree: each example decoded from its file."""
