"""Exact attention through torch's fused kernel for training.

Without a GPU attention backend ComfyUI falls back to sub-quadratic or split attention, which
materialise the score matrix in chunks (baddbmm + softmax + bmm) and whose backward re-reads it.
torch's CPU flash-attention kernels compute the same attention with fused forward and backward
kernels. Training calls them through ``_CpuFlashAttention``, whose output and log-sum-exp a
checkpointed piece keeps for its recompute where they are worth keeping (recompute_reuse): over a
long sequence they are a few MiB for the costliest part of a transformer block's recompute. The
override goes into the training clone's transformer_options only, so sampling elsewhere in the
graph keeps the user's choice, and an override the user already set wins.
"""
from __future__ import annotations

import logging

import torch

from .recompute_reuse import reuse_in_recompute

log = logging.getLogger("loralab")

OVERRIDE_KEY = "optimized_attention_override"


def _slow_fallbacks() -> tuple:
    from comfy.ldm.modules import attention
    return tuple(getattr(attention, n) for n in ("attention_basic", "attention_sub_quad", "attention_split")
                 if hasattr(attention, n))


def use_fused_attention(model_patcher) -> bool:
    """Routes the patcher's attention to torch's fused kernels when ComfyUI picked a chunked fallback.
    Returns True when the override was set."""
    from comfy.ldm.modules import attention
    if not hasattr(attention, "attention_pytorch") or attention.optimized_attention not in _slow_fallbacks():
        return False
    options = model_patcher.model_options.setdefault("transformer_options", {})
    if OVERRIDE_KEY in options:
        return False

    def fused(func, *args, **kwargs):
        return training_attention(*args, **kwargs)

    options[OVERRIDE_KEY] = fused
    log.info("LoRA Lab: training with torch's fused attention kernels (flash attention on the CPU) instead of %s",
             attention.optimized_attention.__name__)
    return True


def _flash_forward(q, k, v):
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, False)


class _CpuFlashAttention(torch.autograd.Function):
    """softmax(q k^T / sqrt(d)) v on torch's CPU flash kernels, [batch, heads, tokens, dim]."""

    @staticmethod
    def forward(ctx, q, k, v):
        flops = 4 * q.shape[0] * q.shape[1] * q.shape[2] * k.shape[2] * q.shape[3]
        nbytes = q.numel() * q.element_size() + q.shape[0] * q.shape[1] * q.shape[2] * 4  # output, log-sum-exp
        out, lse = reuse_in_recompute(lambda: _flash_forward(q, k, v), flops, nbytes)
        ctx.save_for_backward(q, k, v, out, lse)
        return out

    @staticmethod
    def backward(ctx, grad):
        q, k, v, out, lse = ctx.saved_tensors
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            grad.contiguous(), q, k, v, out, lse, 0.0, False)


def _cpu_flash_applies(q, k, v, mask) -> bool:
    aten = torch.ops.aten
    return (mask is None and q.device.type == "cpu" and q.dtype == k.dtype == v.dtype
            and q.dtype in (torch.float32, torch.bfloat16, torch.float16)
            and hasattr(aten, "_scaled_dot_product_flash_attention_for_cpu")
            and hasattr(aten, "_scaled_dot_product_flash_attention_for_cpu_backward"))


def training_attention(q, k, v, heads, mask=None, attn_precision=None, skip_reshape=False, skip_output_reshape=False,
                       **kwargs):
    """ComfyUI's attention signature, computed by ``_CpuFlashAttention`` on the CPU, by ComfyUI's
    torch-SDPA attention elsewhere or with a mask."""
    from comfy.ldm.modules import attention
    if not _cpu_flash_applies(q, k, v, mask):
        return attention.attention_pytorch(q, k, v, heads, mask=mask, attn_precision=attn_precision,
                                           skip_reshape=skip_reshape, skip_output_reshape=skip_output_reshape, **kwargs)
    if skip_reshape:
        b, _, _, dim_head = q.shape
    else:
        b, _, inner = q.shape
        dim_head = inner // heads
        q, k, v = (t.view(b, -1, heads, dim_head).transpose(1, 2) for t in (q, k, v))
    out = _CpuFlashAttention.apply(q, k, v)
    if not skip_output_reshape:
        out = out.transpose(1, 2).reshape(b, -1, heads * dim_head)
    return out
