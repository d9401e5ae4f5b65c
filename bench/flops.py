"""FLOPs of a piece of work (torch's FlopCounterMode) and the machine's measured matmul peak.

FlopCounterMode counts the FLOPs of matmuls, convolutions and attention kernels as dispatched
(with the pack's formulas for the CPU flash-attention kernels and oneDNN's linear, which torch's
registry leaves out), so it counts what actually ran: the recomputation of gradient checkpointing,
and a weight wrapper's ``W + up @ down`` on every forward, are included. Elementwise work (norms,
activations, the optimizer) is not counted; it is small next to the convolutions here.
"""
from __future__ import annotations

import time

import torch


class FlopCount:
    """Context manager: ``with FlopCount() as fc: work()`` then ``fc.total``."""

    def __init__(self):
        from loralab.sampler.flop_formulas import flop_counter_mode  # the pack, imported by workload
        self.mode = flop_counter_mode()
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


def _matmul_kernels(dtype: torch.dtype, device: str) -> dict:
    """The matmul kernels training can run: torch's mm and, on a CPU with oneDNN, oneDNN's linear
    (which frozen layers use where it is faster; torch's fp32 mm goes to MKL)."""
    kernels = {"torch.mm": torch.mm}
    if device == "cpu" and torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise"):
        from devkit.pack import import_pack
        import_pack()  # needs no running ComfyUI
        from loralab.adapters.cpu_kernels import onednn_linear
        kernels["oneDNN linear"] = lambda a, b: onednn_linear(a, b.t())
    return kernels


def matmul_peak(dtype: torch.dtype = torch.float32, sizes=(1024, 2048, 3072, 4096), repeats: int = 8,
                device: str = "cpu", budget_s: float = 45.0) -> dict:
    """Best achieved FLOP/s of a square matmul over a few sizes and the matmul kernels training
    can use (best of ``repeats`` each).

    This is a measured, attainable peak on this machine with this torch build, not the
    datasheet number; the fraction of it that training reaches is the report's "of peak".
    Once ``budget_s`` is spent the larger sizes are left out (bf16 on a CPU without bf16
    instructions is emulated, and one 4096-size product takes minutes there).
    """
    best = {"flops_per_s": 0.0, "size": 0, "kernel": ""}
    g = torch.Generator(device="cpu").manual_seed(0)
    started = time.perf_counter()
    kernels = _matmul_kernels(dtype, device)
    for n in sizes:
        if best["size"] and time.perf_counter() - started > budget_s:
            break
        a = torch.randn(n, n, generator=g).to(device, dtype)
        b = torch.randn(n, n, generator=g).to(device, dtype)
        for kernel, matmul in kernels.items():
            matmul(a, b)  # warm-up: thread pool, packing buffers
            for _ in range(repeats):
                start = time.perf_counter()
                matmul(a, b)
                if device != "cpu":
                    torch.cuda.synchronize()
                seconds = time.perf_counter() - start
                rate = 2.0 * n ** 3 / seconds
                if rate > best["flops_per_s"]:
                    best = {"flops_per_s": rate, "size": n, "kernel": kernel}
                if time.perf_counter() - started > budget_s:
                    break
    return {"dtype": str(dtype).replace("torch.", ""), "threads": torch.get_num_threads(), **best}
