"""Exact attention through torch's fused kernel for training.

Without a GPU attention backend ComfyUI falls back to sub-quadratic or split attention, which
materialise the score matrix in chunks (baddbmm + softmax + bmm) and whose backward re-reads it.
torch's scaled_dot_product_attention computes the same attention with fused forward and backward
kernels on CPU and GPU. The override goes into the training clone's transformer_options only, so
sampling elsewhere in the graph keeps the user's choice, and an override the user already set wins.
"""
from __future__ import annotations

import logging

log = logging.getLogger("loralab")

OVERRIDE_KEY = "optimized_attention_override"


def _slow_fallbacks() -> tuple:
    from comfy.ldm.modules import attention
    return tuple(getattr(attention, n) for n in ("attention_basic", "attention_sub_quad", "attention_split")
                 if hasattr(attention, n))


def use_fused_attention(model_patcher) -> bool:
    """Routes the patcher's attention to torch SDPA when ComfyUI picked a chunked fallback.
    Returns True when the override was set."""
    from comfy.ldm.modules import attention
    if not hasattr(attention, "attention_pytorch") or attention.optimized_attention not in _slow_fallbacks():
        return False
    options = model_patcher.model_options.setdefault("transformer_options", {})
    if OVERRIDE_KEY in options:
        return False

    def fused(func, *args, **kwargs):
        return attention.attention_pytorch(*args, **kwargs)

    options[OVERRIDE_KEY] = fused
    log.info("LoRA Lab: training with torch scaled-dot-product attention instead of %s",
             attention.optimized_attention.__name__)
    return True
