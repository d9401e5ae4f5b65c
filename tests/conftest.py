"""Test setup: the pack is importable as the package ``loralab`` (as ComfyUI imports it, by
path, with relative imports inside), and ComfyUI itself is on sys.path."""
from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from devkit.comfy_path import add_comfyui_to_sys_path  # noqa: E402

add_comfyui_to_sys_path()


from devkit.pack import import_pack  # noqa: E402

import_pack()
