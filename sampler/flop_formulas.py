"""FLOP formulas for the kernels training runs that torch's FlopCounterMode does not know.

torch's registry covers aten's matmuls, convolutions and the CUDA attention kernels. Training on a
CPU also runs oneDNN's linear (frozen layers, see frozen_layers) and the CPU flash-attention
kernels, which it would count as zero. Keys are operator packets, as FlopCounterMode looks them up.
"""
from __future__ import annotations

import math

import torch
from torch.utils import flop_counter


def extra_flop_formulas() -> dict:
    """``custom_mapping`` for FlopCounterMode: each formula gets shapes in place of tensors."""
    mapping = {}
    aten = torch.ops.aten
    sdpa_forward = getattr(aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    sdpa_backward = getattr(aten, "_scaled_dot_product_flash_attention_for_cpu_backward", None)
    if sdpa_forward is not None:
        def sdpa_cpu(query, key, value, *args, out_shape=None, **kwargs):
            return flop_counter.sdpa_flop_count(query, key, value)
        mapping[sdpa_forward] = sdpa_cpu
    if sdpa_backward is not None:
        def sdpa_cpu_backward(grad_out, query, key, value, *args, out_shape=None, **kwargs):
            return flop_counter.sdpa_backward_flop_count(grad_out, query, key, value)
        mapping[sdpa_backward] = sdpa_cpu_backward
    linear = getattr(torch.ops.mkldnn, "_linear_pointwise", None) if hasattr(torch.ops, "mkldnn") else None
    if linear is not None:
        def onednn_linear(x, weight, *args, out_shape=None, **kwargs):
            return 2 * math.prod(x[:-1]) * x[-1] * weight[0]
        mapping[linear] = onednn_linear
    return mapping


def flop_counter_mode() -> flop_counter.FlopCounterMode:
    """A FlopCounterMode that also counts the kernels above."""
    return flop_counter.FlopCounterMode(display=False, custom_mapping=extra_flop_formulas())
