"""Importing the pack as the package ``loralab`` (the way ComfyUI imports it: by path, with
relative imports inside), for tests, benchmarks and tools that run outside ComfyUI."""
from __future__ import annotations

import importlib.util
import sys

from .comfy_host import PACK_DIR


def import_pack(name: str = "loralab"):
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, PACK_DIR / "__init__.py",
                                                  submodule_search_locations=[str(PACK_DIR)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module
