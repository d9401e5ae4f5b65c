"""Choosing a compute dtype the device runs fast.

On CPUs without bf16 hardware (no AVX512-BF16 / AMX) bf16 matmuls are emulated and run tens of
times slower than fp32, which is why ComfyUI's native trainer (bf16 by default) crawls on such
machines. "auto" picks bf16 only where it is fast.
"""
from __future__ import annotations

import functools
import logging

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
DTYPE_CHOICES = ("auto", "bf16", "fp16", "fp32")

log = logging.getLogger("loralab")


@functools.lru_cache(maxsize=1)
def cpu_has_fast_bf16() -> bool:
    """True when /proc/cpuinfo lists bf16 instructions (AVX512-BF16 or AMX-BF16)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            flags = f.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_training_dtype(choice: str, device: torch.device) -> tuple[torch.dtype, str]:
    """The dtype to compute in, and a one-line reason for the log."""
    if choice not in DTYPE_CHOICES:
        raise ValueError(f"training_dtype '{choice}' is unknown; choose one of {', '.join(DTYPE_CHOICES)}")
    if choice != "auto":
        dtype = DTYPES[choice]
        if dtype == torch.bfloat16 and device.type == "cpu" and not cpu_has_fast_bf16():
            return dtype, ("bf16 as requested, but this CPU has no bf16 instructions: expect it to run "
                           "tens of times slower than fp32 (training_dtype 'auto' would pick fp32)")
        return dtype, f"{choice} as requested"
    if device.type == "cuda":
        if torch.cuda.is_bf16_supported():
            return torch.bfloat16, "auto: the GPU supports bf16"
        return torch.float16, "auto: the GPU has no bf16, using fp16 with loss scaling"
    if device.type == "cpu":
        if cpu_has_fast_bf16():
            return torch.bfloat16, "auto: this CPU has bf16 instructions"
        return torch.float32, "auto: this CPU has no bf16 instructions (bf16 would be emulated, ~40x slower)"
    return torch.float32, f"auto: fp32 on {device.type}"


def resolve_lora_dtype(choice: str, training_dtype: torch.dtype) -> torch.dtype:
    """Adapter storage dtype; 'auto' keeps fp32 master weights whatever the compute dtype."""
    if choice == "auto":
        return torch.float32
    if choice not in DTYPES:
        raise ValueError(f"lora_dtype '{choice}' is unknown; choose one of auto, {', '.join(DTYPES)}")
    return DTYPES[choice]
