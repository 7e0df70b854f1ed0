"""Tar shards in the WebDataset layout: DATA is one .tar or a folder of them, each holding `key.jpg` (any image
extension) and `key.cls` (the class index as text) per example. Shards are listed member by member without
extracting anything or keeping the archive's member list (memory stays flat in the shard size); every image is then
validated like an ImageFolder's files, and later read straight from its offset in the shard. Ids are `shard/key`
(the shard's name less .tar); what cannot be used is a recorded skip."""

from __future__ import annotations

import os
import stat
import tarfile
from dataclasses import dataclass
from pathlib import Path

from sanitize.data.arrays import MAX_CLASSES
from sanitize.data.base import Skipped
from sanitize.data.encoded import IMAGE_EXTENSIONS, MAX_IMAGE_BYTES, EncodedDataset, Entry, skip_reason, validated
from sanitize.data.folder import unusable_name
from sanitize.distributed import World
from sanitize.errors import DataError
from sanitize.wording import plural

LABEL_EXTENSION = "cls"
MAX_LABEL_BYTES = 64


@dataclass(frozen=True)
class TarMember:
    """Where one member's bytes lie in its shard (picklable, so DataLoader workers read it themselves)."""

    shard: str
    offset: int
    size: int

    def read(self) -> bytes:
        if self.size > MAX_IMAGE_BYTES:
            raise ValueError(f"larger than {MAX_IMAGE_BYTES // 2**20} MiB")
        with open(self.shard, "rb") as handle:
            handle.seek(self.offset)
            data = handle.read(self.size)
        if len(data) != self.size:
            raise ValueError("the shard ends inside this member")
        return data


def is_shard_folder(path: Path) -> bool:
    """A folder with .tar files and no class subfolders."""
    try:
        entries = list(os.scandir(path))
    except OSError:
        return False
    has_tar = any(e.name.lower().endswith(".tar") for e in entries)
    return has_tar and not any(not e.name.startswith(".") and e.is_dir(follow_symlinks=False) for e in entries)


def split_key(name: str) -> tuple[str, str]:
    """WebDataset's naming: the key is the member's path up to the first dot of its file name; the rest, lower-cased,
    is the extension."""
    folder, _, base = name.rpartition("/")
    stem, _, extension = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), extension.lower()


def _list_shard(shard: Path, skipped: list[Skipped]) -> tuple[list[Entry], int]:
    """Every usable key of one shard, and how many other members were ignored."""
    images: dict[str, tarfile.TarInfo | str] = {}  # the member, or why the key has no usable one
    labels: dict[str, int | str] = {}  # the class index, or why the .cls member is not one
    order: list[str] = []
    ignored = 0
    name = shard.name[: -len(".tar")]
    try:
        with open(shard, "rb") as handle, tarfile.open(fileobj=handle, mode="r:") as archive:
            while (member := archive.next()) is not None:
                archive.members = []  # tarfile keeps every member it has read: not here
                key, extension = split_key(member.name)
                if extension == LABEL_EXTENSION:
                    labels[key] = _read_label(archive, member)
                elif "." + extension.rsplit(".", 1)[-1] in IMAGE_EXTENSIONS:
                    if key in images:
                        images[key] = "two image members under one key"
                    else:
                        images[key] = member if member.isreg() else "not a regular file in the shard"
                else:
                    ignored += 1
                    continue
                if len(order) < len(images.keys() | labels.keys()):
                    order.append(key)
    except (tarfile.TarError, OSError, EOFError, ValueError, UnicodeError) as error:
        skipped.append(Skipped(name, str(shard), f"shard cannot be read past this point: {skip_reason(error)}"))
    found, shard_path = [], str(shard)  # one string for every member's source, not one each
    for key in order:
        example_id, path = f"{name}/{key}", f"{shard}:{key}"
        image, label = images.get(key), labels.get(key)
        why = unusable_name(example_id)
        if why is None:
            if image is None:
                why = "no image member"
            elif isinstance(image, str):
                why = image
            elif label is None:
                why = f"no .{LABEL_EXTENSION} label member"
            elif isinstance(label, str):
                why = label
            elif image.size > MAX_IMAGE_BYTES:
                why = f"larger than {MAX_IMAGE_BYTES // 2**20} MiB"
        if why:
            skipped.append(Skipped(example_id, path, why))
        else:
            found.append(Entry(example_id, path, label, TarMember(shard_path, image.offset_data, image.size)))
    return found, ignored


def _read_label(archive: tarfile.TarFile, member: tarfile.TarInfo) -> int | str:
    """The class index in a .cls member, or why it is not one."""
    if not member.isreg() or member.size > MAX_LABEL_BYTES:
        return f"the .{LABEL_EXTENSION} member is not a short regular file"
    text = archive.extractfile(member).read().decode("ascii", "replace").strip()
    if not text.isdigit() or int(text) >= MAX_CLASSES:
        return f"the .{LABEL_EXTENSION} member holds {text[:20]!r}, not a class index below {MAX_CLASSES}"
    return int(text)


def open_shards(
    path: Path,
    image_size: int | None = None,
    workers: int = 0,
    progress: bool = True,
    world: World = World(),
    validation: str = "full",
) -> ShardDataset:
    """List and validate one shard or a folder of them (sorted by name; `validation` as for folders); classes are the
    indices 0..max label."""
    skipped: list[Skipped] = []
    if path.is_dir():
        shards = []
        for entry in sorted(os.scandir(path), key=lambda e: e.name):
            if not entry.name.lower().endswith(".tar"):
                continue
            why = unusable_name(entry.name)
            try:
                if why is None and not stat.S_ISREG(entry.stat().st_mode):
                    why = "not a regular file"
            except OSError as error:  # a dangling symlink, a vanished file
                why = f"cannot be read: {error.strerror or error}"
            if why:
                skipped.append(Skipped(entry.name, os.fsencode(entry.path).decode("utf-8", "backslashreplace"), why))
            else:
                shards.append(Path(entry.path))
    else:
        shards = [path]
    entries, ignored = [], 0
    for shard in shards:
        found, others = _list_shard(shard, skipped)
        entries.extend(found)
        ignored += others
    if not entries:
        raise DataError(f"{path} has no usable examples (key.jpg with key.cls in .tar shards)")
    classes = [str(c) for c in range(max(e.label for e in entries) + 1)]
    notes = [f"{plural(ignored, 'member')} neither an image nor a .cls label ignored"] if ignored else []
    return validated(
        path, "shards", ShardDataset, classes, entries, skipped, notes, image_size, workers, progress, world, validation
    )


class ShardDataset(EncodedDataset):
    """Tar shards: each example decoded from its member's bytes, read at their offset in the shard."""
