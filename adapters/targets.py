"""Which layers of a diffusion model get an adapter.

Presets follow what kohya users know: by default the attention and feed-forward layers of the
transformer blocks (plus their 1x1 in/out projections), the layers a standard LoRA trains.
Names are the model's own module paths (e.g. ``input_blocks.1.1.transformer_blocks.0.attn1.to_q``).

- "attention": the q/k/v/out projections of every attention (``attn1.to_q``, SD3's ``attn.qkv``,
  Flux's ``img_attn.qkv`` / ``txt_attn.proj``);
- "attention+feed-forward" (the default): those, the feed-forward layers (``ff.net.*``, SD3's
  ``mlp.fc1``, Flux's ``img_mlp.0`` / ``txt_mlp.2``) and a UNet transformer's ``proj_in``/``proj_out``.
  On a DiT, the embedders and in/out layers around the blocks (``t_embedder``, ``y_embedder``,
  ``time_in``, ``vector_in``, ``guidance_in``, ``img_in``, ``txt_in``, ``final_layer`` ...) are left
  out of both presets, even where their layers are named ``mlp``: kohya-style sets train the blocks;
- "all linear", "all linear+conv": every such layer, embedders and modulation layers included.

Flux's single-stream blocks fuse attention and feed-forward into two layers: ``linear1`` computes
q, k, v and the MLP's input in one product, ``linear2`` the attention's output projection and the
MLP's output in one. An adapter cannot take half a layer, so both count as attention and join the
"attention" preset too: without them it would train 19 of Flux's 57 blocks. The blocks'
modulation layers (``img_mod.lin``, ``modulation.lin``, SD3's ``adaLN_modulation``) are neither
attention nor feed-forward and come only with the "all linear" presets.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import torch

# "img_attn", "self_attn", "cross_attn" ...: an attention module, maybe with a stream or kind prefix
ATTENTION = re.compile(r"(^|\.)(\w+_)?(attn\d*|attention)\.(to_q|to_k|to_v|to_out\.0|q|k|v|o|qkv|proj)$")
FUSED_ATTENTION = re.compile(r"(^|\.)single_blocks\.\d+\.linear[12]$")  # Flux: attention and MLP in one layer
FEED_FORWARD = re.compile(r"(^|\.)(\w+_)?(ff|mlp|feed_forward)\.")  # "img_mlp.0", "ff.net.2", "mlp.fc1"
TRANSFORMER_PROJ = re.compile(r"\.(proj_in|proj_out)$")  # inside a block: a top-level proj_out is an output layer
# Top-level modules of a DiT that embed its inputs or make its output: not part of any block.
OUTSIDE_BLOCKS = re.compile(r"^(\w*emb\w*|\w+_in|final_layer|norm_out)(\.|$)")

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
    if OUTSIDE_BLOCKS.match(name):
        return False
    if ATTENTION.search(name) or FUSED_ATTENTION.search(name):
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
