"""Adapter files: atomic safetensors saves, loading with metadata, and output file names."""
from __future__ import annotations

import contextlib
import os
import re
import tempfile
from pathlib import Path

import safetensors
import safetensors.torch
import torch


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


TEMP_PREFIX = ".loralab_"


def name_max(folder: Path) -> int:
    """The longest file name, in bytes, the file system of ``folder`` (or its nearest existing
    parent) takes; 255 where it does not say."""
    for candidate in (folder, *folder.parents):
        if candidate.is_dir():
            try:
                return os.pathconf(candidate, "PC_NAME_MAX")
            except (OSError, ValueError, AttributeError):
                return 255
    return 255


def check_name_fits(folder: Path, name: str, what: str) -> None:
    """Raises ValueError naming ``what`` (the input that made ``name``) when the name is too long."""
    size, limit = len(name.encode("utf-8")), name_max(folder)
    if size > limit:
        raise ValueError(f"{what} makes the file name {size} bytes long, and this file system takes {limit}: "
                         f"use a shorter {what}")


@contextlib.contextmanager
def atomic_file(path: Path, overwrite: bool = True):
    """Yields a temp path beside ``path`` to write the whole file to; on success it becomes
    ``path``, on any error it is removed, so no reader ever sees half a file under that name.

    The result gets the mode a new file gets under the user's umask (mkstemp and safetensors make
    0600 files, which another user or service sharing the output folder could not read). With
    ``overwrite`` False an existing ``path`` is left untouched and FileExistsError raised: a hard
    link is an atomic create-if-absent; where the file system has none, check, then rename.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    # A short temp name: one built from ``path.name`` could pass the file system's name limit
    # where ``path`` itself does not.
    fd, tmp = tempfile.mkstemp(prefix=TEMP_PREFIX, suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_umask())
        if overwrite:
            os.replace(tmp, path)
            return
        try:
            os.link(tmp, path)
        except FileExistsError:
            raise
        except OSError:  # no hard links here (some FAT or network file systems)
            if path.exists():
                raise FileExistsError(f"{path} exists already") from None
            os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


def save_adapter_file(path: str | os.PathLike, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> Path:
    """Writes a .safetensors file atomically (see atomic_file): a crash or a bad tensor never
    leaves a half-written file under the final name."""
    path = Path(path)
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    meta = {str(k): str(v) for k, v in (metadata or {}).items()}
    with atomic_file(path) as tmp:
        safetensors.torch.save_file(tensors, tmp, metadata=meta)
    return path


def load_adapter_file(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and metadata of a .safetensors adapter file."""
    with safetensors.safe_open(str(path), framework="pt") as f:
        metadata = dict(f.metadata() or {})
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    return tensors, metadata


def next_lora_path(output_dir: str | os.PathLike, prefix: str, steps: int | None) -> Path:
    """``{prefix}_{steps}_steps_{counter:05}_.safetensors`` with the next free counter.

    ``prefix`` may contain sub-folders, but must stay inside ``output_dir``: anything else raises
    ValueError naming the prefix.
    """
    output_dir = Path(output_dir).resolve()
    if not prefix or prefix.strip() in (".", ""):
        raise ValueError("prefix is empty: give a file name prefix such as 'loras/my_lora'")
    if os.path.isabs(prefix) or "\x00" in prefix:
        raise ValueError(f"prefix '{prefix}' must be a relative path inside the output directory")
    target = (output_dir / prefix).resolve()
    if target == output_dir or output_dir not in target.parents:
        raise ValueError(f"prefix '{prefix}' points outside the output directory; use a relative name "
                         "such as 'loras/my_lora'")
    folder, base = target.parent, target.name
    blocking = next((p for p in (folder, *folder.parents) if p != output_dir and output_dir in p.parents
                     and p.exists() and not p.is_dir()), None)
    if blocking is not None:
        raise ValueError(f"prefix '{prefix}' needs the folder '{blocking.name}', but a file has that name; "
                         "use another folder in the prefix")
    stem = f"{base}_{steps}_steps" if steps is not None else base
    check_name_fits(folder, f"{stem}_99999_.safetensors", "prefix")
    pattern = re.compile(re.escape(stem) + r"_(\d{5})_\.safetensors$")
    counters = [int(m.group(1)) for p in (folder.iterdir() if folder.is_dir() else []) if (m := pattern.match(p.name))]
    counter = max(counters, default=0) + 1
    return folder / f"{stem}_{counter:05}_.safetensors"
