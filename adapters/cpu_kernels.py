"""fp32 matmuls on the CPU through oneDNN, and a LoRA forward/backward built on them.

torch sends fp32 matmuls on the CPU to MKL. On some CPUs (AMD's among them) oneDNN's fp32
kernels, which torch already uses for convolutions, run layer-sized products faster: 1.05-1.9x on
the SD1.5 UNet's attention and feed-forward products on the benchmark's AMD EPYC, about 10% of a
training step. Which kernel is faster is measured once per process (``onednn_matmul_is_faster``).

``low_rank_add_fp32`` computes ``base + coefficient * (up @ down) x`` for a Linear or a pointwise
(1x1) conv with a hand-written backward: every product runs on oneDNN in the orientation where
it reads its large operand once, and nothing full-size is written but the output.
"""
from __future__ import annotations

import functools
import logging
import time

import torch
from torch.utils._python_dispatch import _disable_current_modes

from .conv_taps import ConvTaps

log = logging.getLogger("loralab")


def onednn_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ weight.T + bias`` on oneDNN; ``weight`` [out, in] may be a transposed view."""
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


def _onednn_linear_add(x: torch.Tensor, weight: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """``other + x @ weight.T`` in one oneDNN call (the sum is fused into the product's write)."""
    return torch.ops.mkldnn._linear_pointwise.binary(x, other, weight, None, "add")


def best_times(*fns, repeats: int) -> list[float]:
    """The best wall time of each of ``fns`` over ``repeats`` calls, the calls taken in turns: a
    moment when another process holds a core slows both sides, not one, so the choice a kernel
    probe makes from these times does not depend on when that moment came."""
    for fn in fns:
        fn()
    best = [float("inf")] * len(fns)
    for _ in range(repeats):
        for i, fn in enumerate(fns):
            start = time.perf_counter()
            fn()
            best[i] = min(best[i], time.perf_counter() - start)
    return best


# Products (rows, in, out) of an SD1.5 UNet's attention and feed-forward layers at 256 px: the
# kernels differ by shape (oneDNN's lead here runs from 5% on one to 90% on another), so the choice
# is made on a set of them rather than on one.
PROBE_PRODUCTS = ((1024, 320, 320), (1024, 320, 1280), (256, 640, 640), (64, 1280, 1280))


def _probe_product_times(rows: int, inner: int, out: int, generator: torch.Generator) -> tuple[float, float]:
    """Best (torch default, oneDNN) seconds of one layer's forward (x @ W.T) plus its input
    gradient (grad @ W); raises RuntimeError if oneDNN's result differs."""
    x, grad = torch.randn(rows, inner, generator=generator), torch.randn(rows, out, generator=generator)
    w = torch.randn(out, inner, generator=generator)
    for a, b in ((x, w), (grad, w.t())):
        if not torch.allclose(onednn_linear(a, b), torch.nn.functional.linear(a, b), rtol=1e-4, atol=1e-3):
            raise RuntimeError("oneDNN's linear gives a different result")
    forward = best_times(lambda: torch.nn.functional.linear(x, w), lambda: onednn_linear(x, w), repeats=5)
    backward = best_times(lambda: torch.nn.functional.linear(grad, w.t()), lambda: onednn_linear(grad, w.t()),
                          repeats=5)
    return forward[0] + backward[0], forward[1] + backward[1]


@functools.lru_cache(maxsize=1)
def onednn_matmul_is_faster() -> bool:
    """True when oneDNN's fp32 linear beats torch's default by 5% or more over ``PROBE_PRODUCTS``,
    each timed forward and backward (and gives the same results). Measured once per process, in
    about a third of a second."""
    if not torch.backends.mkldnn.is_available() or not hasattr(torch.ops.mkldnn, "_linear_pointwise"):
        return False
    generator = torch.Generator().manual_seed(0)
    try:  # outside any active dispatch mode (a FLOP counter, a memory plan): the probe is not step work
        with _disable_current_modes(), torch.no_grad():
            times = [_probe_product_times(*shape, generator) for shape in PROBE_PRODUCTS]
    except RuntimeError:
        return False
    default, onednn = sum(t[0] for t in times), sum(t[1] for t in times)
    faster = onednn < 0.95 * default
    log.info("LoRA Lab: fp32 matmul kernel: %s (oneDNN %.1f ms, default %.1f ms over %d layer-sized products, "
             "forward and backward)", "oneDNN" if faster else "torch default", onednn * 1e3, default * 1e3,
             len(PROBE_PRODUCTS))
    return faster


def use_onednn(*tensors: torch.Tensor) -> bool:
    """Whether fp32 CPU tensors like these should go through oneDNN."""
    return (all(t.device.type == "cpu" and t.dtype == torch.float32 for t in tensors)
            and not torch.is_autocast_enabled("cpu") and onednn_matmul_is_faster())


class _LowRankAdd(torch.autograd.Function):
    """``base + coefficient * (up @ down) x`` as 2-D products. Rows layout (a Linear): x [M, K],
    base [M, N], positions are rows. Columns layout (one image of a conv, channels first): x [K, P],
    base [N, P], positions are columns; a pointwise conv's ``down`` is [r, K], a k x k conv's is
    stacked per tap ([k*k*r, K], see conv_taps) and ``taps`` sums the shifted products."""

    @staticmethod
    def forward(ctx, base, x, up, down, coefficient: float, columns: bool, taps: ConvTaps | None):
        if columns:
            h = onednn_linear(down, x.t())  # down @ x: [r, P] ([k*k*r, P] with taps)
            if taps is not None:
                h = taps.gather(h)
            out = _onednn_linear_add(up * coefficient, h.t(), base)
        else:
            h = onednn_linear(x, down)  # x @ down.T: [M, r]
            out = _onednn_linear_add(h, up * coefficient, base)
        ctx.save_for_backward(x, h, up, down)
        ctx.coefficient, ctx.columns, ctx.taps = coefficient, columns, taps
        return out

    @staticmethod
    def backward(ctx, grad):
        x, h, up, down = ctx.saved_tensors
        c, want_x = ctx.coefficient, ctx.needs_input_grad[1]
        if ctx.columns:
            grad_h = onednn_linear((up * c).t().contiguous(), grad.t())  # (c up).T @ grad: [r, P]
            grad_up = onednn_linear(grad, h) * c  # grad @ h.T: [N, r]
            if ctx.taps is not None:
                grad_h = ctx.taps.scatter(grad_h)  # the gradient of every tap's product
            grad_down = onednn_linear(grad_h, x)  # grad_h @ x.T: [r, K]
            grad_x = onednn_linear(down.t().contiguous(), grad_h.t()) if want_x else None  # [K, P]
        else:
            grad_h = onednn_linear(grad, (up * c).t())  # grad @ (c up): [M, r]
            grad_up = (onednn_linear(h.t().contiguous(), grad.t()).t() * c).contiguous()  # (h.T @ grad).T: [N, r]
            grad_down = onednn_linear(grad_h.t().contiguous(), x.t())  # grad_h.T @ x: [r, K]
            grad_x = onednn_linear(grad_h, down.t()) if want_x else None  # [M, K]
        return grad, grad_x, grad_up, grad_down, None, None, None


def low_rank_add_fp32(base_out: torch.Tensor, x: torch.Tensor, up: torch.Tensor, down: torch.Tensor,
                      coefficient: float, conv: bool, taps: ConvTaps | None = None) -> torch.Tensor:
    """``base_out + coefficient * (up @ down) x`` for fp32 CPU tensors (see ``use_onednn``).

    ``up`` [out, r] and ``down`` [r, in * k*k] are the 2-D factors; ``x`` and ``base_out`` are the
    layer's input and output: [..., in] / [..., out] for a Linear, [B, in, ...] / [B, out, ...] for a
    conv: a pointwise one, or a k x k one described by ``taps``."""
    up, down = up.reshape(up.shape[0], -1), down.reshape(down.shape[0], -1)
    if not conv:
        out = _LowRankAdd.apply(base_out.reshape(-1, up.shape[0]), x.reshape(-1, down.shape[1]), up, down,
                                coefficient, False, None)
        return out.view(base_out.shape)
    if taps is not None:
        down = taps.stacked_weight(down)
    batch = x.shape[0]
    images = [_LowRankAdd.apply(base_out[i].reshape(up.shape[0], -1), x[i].reshape(down.shape[1], -1),
                                up, down, coefficient, True, taps) for i in range(batch)]
    return torch.stack(images).view(base_out.shape) if batch > 1 else images[0].view(base_out.shape)
