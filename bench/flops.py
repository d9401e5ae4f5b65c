"""FLOPs of a piece of work (torch's FlopCounterMode) and the machine's measured matmul peak.

FlopCounterMode counts the FLOPs of matmuls, convolutions and attention kernels as dispatched, so
it counts what actually ran: the recomputation of gradient checkpointing, and a weight wrapper's
``W + up @ down`` on every forward, are included. Elementwise work (norms, activations, the
optimizer) is not counted; it is small next to the convolutions here.
"""
from __future__ import annotations

import time

import torch
from torch.utils import flop_counter


def _cpu_sdpa_mapping() -> dict:
    """Formulas for the CPU flash-attention kernels that torch's registry leaves out (it covers the
    CUDA kernels), so an SDPA-based attention on CPU is not counted as zero."""
    mapping = {}  # FlopCounterMode hands the formulas shapes in place of tensors
    aten = torch.ops.aten
    fwd = getattr(aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    bwd = getattr(aten, "_scaled_dot_product_flash_attention_for_cpu_backward", None)
    if fwd is not None:
        def sdpa_cpu(query, key, value, *args, out_shape=None, **kwargs):
            return flop_counter.sdpa_flop_count(query, key, value)
        mapping[fwd] = sdpa_cpu
    if bwd is not None:
        def sdpa_cpu_backward(grad_out, query, key, value, *args, out_shape=None, **kwargs):
            return flop_counter.sdpa_backward_flop_count(grad_out, query, key, value)
        mapping[bwd] = sdpa_cpu_backward
    return mapping


class FlopCount:
    """Context manager: ``with FlopCount() as fc: work()`` then ``fc.total``."""

    def __init__(self):
        self.mode = flop_counter.FlopCounterMode(display=False, custom_mapping=_cpu_sdpa_mapping())
        self.total = 0

    def __enter__(self) -> "FlopCount":
        self.mode.__enter__()
        return self

    def __exit__(self, *exc):
        self.mode.__exit__(*exc)
        self.total = int(self.mode.get_total_flops())
        return False

    def by_operator(self) -> dict[str, int]:
        """FLOPs per aten operator over the whole run (for the JSON)."""
        counts = self.mode.get_flop_counts().get("Global", {})
        return {str(op): int(n) for op, n in counts.items()}


def matmul_peak(dtype: torch.dtype = torch.float32, sizes=(1024, 2048, 3072, 4096), repeats: int = 8,
                device: str = "cpu", budget_s: float = 45.0) -> dict:
    """Best achieved FLOP/s of square ``torch.mm`` over a few sizes (best of ``repeats`` each).

    This is a measured, attainable peak on this machine with this torch build, not the
    datasheet number; the fraction of it that training reaches is the report's "of peak".
    Once ``budget_s`` is spent the larger sizes are left out (bf16 on a CPU without bf16
    instructions is emulated, and one 4096-size product takes minutes there).
    """
    best = {"flops_per_s": 0.0, "size": 0}
    g = torch.Generator(device="cpu").manual_seed(0)
    started = time.perf_counter()
    for n in sizes:
        if best["size"] and time.perf_counter() - started > budget_s:
            break
        a = torch.randn(n, n, generator=g).to(device, dtype)
        b = torch.randn(n, n, generator=g).to(device, dtype)
        torch.mm(a, b)  # warm-up: thread pool, packing buffers
        for _ in range(repeats):
            start = time.perf_counter()
            torch.mm(a, b)
            if device != "cpu":
                torch.cuda.synchronize()
            seconds = time.perf_counter() - start
            rate = 2.0 * n ** 3 / seconds
            if rate > best["flops_per_s"]:
                best = {"flops_per_s": rate, "size": n}
            if time.perf_counter() - started > budget_s:
                break
    return {"dtype": str(dtype).replace("torch.", ""), "threads": torch.get_num_threads(), **best}
