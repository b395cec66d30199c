"""Files and folders that a reader sees whole or not at all, even when the writer is killed half-way.

Every write of something another process (or the next run) reads goes through here: a temporary name
beside the target, fsync, then one rename, which POSIX makes atomic within a filesystem.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path


def fsync(path: str | Path) -> None:
    """Flush a file's bytes (or a folder's entries, after a rename in it) to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomically(path: str | Path, write: Callable[[Path], None]) -> None:
    """Call `write(tmp)` on a temporary file beside `path`, fsync it, then rename it over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}-", dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        fsync(tmp)
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


def replace_folder(folder: str | Path, fill: Callable[[Path], None]) -> None:
    """Call `fill(staging)` on an empty folder beside `folder`, fsync what it wrote, then swap it in.

    A reader sees the old folder or the new one, never a mix (for an instant between two renames, neither);
    a writer killed while filling leaves only a hidden staging folder behind."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
    try:
        fill(staging)
        for path in staging.rglob("*"):
            if path.is_file():
                fsync(path)
        old = folder.with_name(f".{folder.name}.old-{staging.name}")
        if folder.exists():
            folder.rename(old)
        staging.rename(folder)
        fsync(folder.parent)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
