"""Which layers of a diffusion model get an adapter.

Presets follow what kohya users know: by default the attention and feed-forward layers of the
transformer blocks (plus their 1x1 in/out projections), the layers a standard LoRA trains.
Names are the model's own module paths (e.g. ``input_blocks.1.1.transformer_blocks.0.attn1.to_q``).
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import torch

ATTENTION = re.compile(r"(^|\.)(attn\d*|attention|self_attn|cross_attn)\.(to_q|to_k|to_v|to_out\.0|q|k|v|o|qkv|proj)$")
FEED_FORWARD = re.compile(r"(^|\.)(ff|mlp|feed_forward)\.")
TRANSFORMER_PROJ = re.compile(r"(^|\.)(proj_in|proj_out)$")

PRESETS = ("attention", "attention+feed-forward", "all linear", "all linear+conv")
DEFAULT_PRESET = "attention+feed-forward"


@dataclass(frozen=True)
class Target:
    name: str  # module path inside the diffusion model
    module: torch.nn.Module


def _is_linear_like(module: torch.nn.Module) -> bool:
    """Linear layers, and 1x1 convs that act as per-pixel linear layers (SD1.5's proj_in/out)."""
    if isinstance(module, torch.nn.Linear):
        return True
    if isinstance(module, torch.nn.modules.conv._ConvNd):
        return all(k == 1 for k in module.kernel_size) and module.groups == 1
    return False


def _in_preset(name: str, module: torch.nn.Module, preset: str) -> bool:
    is_conv = isinstance(module, torch.nn.modules.conv._ConvNd)
    if preset == "all linear+conv":
        return isinstance(module, torch.nn.Linear) or (is_conv and module.groups == 1)
    if not _is_linear_like(module):
        return False
    if preset == "all linear":
        return True
    if ATTENTION.search(name):
        return True
    if preset == "attention+feed-forward":
        return bool(FEED_FORWARD.search(name) or TRANSFORMER_PROJ.search(name))
    return False


def _pattern(input_name: str, text: str) -> re.Pattern | None:
    """The compiled regular expression, or None when empty; the error names the input."""
    if not text:
        return None
    try:
        return re.compile(text)
    except re.error as e:
        raise ValueError(f"{input_name} '{text}' is not a valid regular expression ({e}); fix it or leave it "
                         "empty") from e


def select_targets(diffusion_model: torch.nn.Module, preset: str = DEFAULT_PRESET,
                   include: str = "", exclude: str = "") -> list[Target]:
    """Layers to adapt: the preset, narrowed by optional include/exclude regular expressions.

    Raises ValueError naming the preset or pattern and showing real module names when nothing
    matches, so users can fix a pattern without reading the model code.
    """
    if preset not in PRESETS:
        raise ValueError(f"target preset '{preset}' is unknown; choose one of {', '.join(PRESETS)}")
    include_re = _pattern("include_pattern", include)
    exclude_re = _pattern("exclude_pattern", exclude)
    targets = []
    for name, module in diffusion_model.named_modules():
        if not name or not _in_preset(name, module, preset):
            continue
        if include_re and not include_re.search(name):
            continue
        if exclude_re and exclude_re.search(name):
            continue
        targets.append(Target(name, module))
    if not targets:
        examples = [n for n, m in diffusion_model.named_modules() if _is_linear_like(m)][:6]
        raise ValueError(
            f"no layer matches target preset '{preset}' with include='{include}' exclude='{exclude}'. "
            f"Some real layer names: {', '.join(examples)}"
        )
    return targets
