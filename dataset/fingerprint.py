"""A cheap fingerprint of what loading a folder would read, so a host's cache can tell when the
images or captions on disk changed under an unchanged folder name."""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Union

from .errors import DatasetError
from .image_folder import caption_file, list_image_files


def folder_fingerprint(folder: Union[str, Path]) -> str:
    """Hex digest that changes when the images or captions ``load_image_set`` would read change.

    Covers the same files the loader picks (so notes, hidden files and subfolders do not count):
    each image's name, size and mtime (no image is read or decoded), and each caption's bytes
    (small, and read whole so that an edit within the filesystem's mtime granularity still
    counts). Never raises: a folder that cannot be listed gets a digest of the reason, and
    loading then reports the problem itself.
    """
    digest = hashlib.sha256()
    try:
        images = list_image_files(folder)
    except (DatasetError, OSError) as e:
        digest.update(f"unlistable: {e}".encode("utf-8", "replace"))
        return digest.hexdigest()
    for image in images:
        digest.update(repr((image.name, _stat_key(image), _caption_key(image))).encode("utf-8", "replace"))
    return digest.hexdigest()


def _stat_key(path: Path) -> tuple:
    """(size, mtime_ns) of ``path``; an error text if it vanished or cannot be read meanwhile."""
    try:
        st = path.stat()
    except OSError as e:
        return ("error", str(e))
    return (st.st_size, st.st_mtime_ns)


def _caption_key(image: Path) -> object:
    """Digest of the image's caption file, None without one, an error text if it is unreadable."""
    path = caption_file(image)
    try:
        if not path.is_file():
            return None
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError as e:
        return ("error", str(e))
