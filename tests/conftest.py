"""Test setup: the pack is importable as the package ``loralab`` (as ComfyUI imports it, by
path, with relative imports inside), and ComfyUI itself is on sys.path."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from devkit.comfy_path import add_comfyui_to_sys_path  # noqa: E402

add_comfyui_to_sys_path()


def _register_pack() -> None:
    if "loralab" in sys.modules:
        return
    spec = importlib.util.spec_from_file_location("loralab", ROOT / "__init__.py",
                                                  submodule_search_locations=[str(ROOT)])
    module = importlib.util.module_from_spec(spec)
    sys.modules["loralab"] = module
    spec.loader.exec_module(module)


_register_pack()
