"""Durable writes and file checksums, shared by the feature-cache store and training checkpoints.

`fsync_path` flushes a file, or a folder's entries (so a rename is on disk), and `file_record` gives the size and
SHA-256 that a cache's metadata or a checkpoint's manifest records for each file it wrote.
"""

from __future__ import annotations

import hashlib
import os


def fsync_path(path: str) -> None:
    """Flush a file's (or a folder's: its entries, i.e. renames) writes to disk."""
    try:
        descriptor = os.open(path, os.O_RDONLY)
    except OSError:  # Windows cannot open a folder; the files in it were synced
        if os.path.isdir(path):
            return
        raise
    try:
        os.fsync(descriptor)
    except OSError:  # some file systems refuse fsync on a folder
        if not os.path.isdir(path):
            raise
    finally:
        os.close(descriptor)


def file_record(path: str) -> dict:
    """Size and SHA-256 of a file, read in 8 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(8 * 2**20), b""):
            digest.update(chunk)
    return {"size": os.path.getsize(path), "sha256": digest.hexdigest()}
