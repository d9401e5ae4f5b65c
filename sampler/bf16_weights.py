"""Frozen fp32 base weights held as bf16 for a bf16 training run, inside their own storage.

Under bf16 autocast a frozen fp32 weight is cast again by every call that uses it (the forward, a
checkpointed piece's recompute and the backward): about 2.5 casts of the whole model per step, all
of it repeated work, as the weights never change. Keeping a bf16 copy would add half the model's
size to training memory. Instead, for the run, each weight's own
storage is rearranged: its first half holds the bf16 rounding of every value, its second half the
16 low bits that rounding dropped, and the layer's ``weight`` becomes a bf16 view of the first
half. Nothing is added to memory, nothing is cast per step, and on release every fp32 value is
put back bit for bit.

The rounding is to nearest with ties away from zero, so that (bf16, dropped bits) -> fp32 is one
to one; torch's cast rounds ties to even. The two differ only where the dropped bits are exactly
0x8000, one value in 65536, by one bf16 unit.

Only layers whose every reader takes the weight in the compute dtype are held: the frozen-layer
path and adapters that work from the layer's output. Adapters that read the base weight in their
own dtype (DoRA's column norms, GLoRA's weight product) keep their layer's fp32 weight, as do
layers ComfyUI patches on the fly (weight functions) or streams from another device.
"""
from __future__ import annotations

import contextlib

import torch

_ROUND = 0x8000  # half of the dropped 16 bits: adding it before the shift rounds to nearest
_CHUNK = 1 << 20  # elements rounded at a time, so the temporaries stay a few MB


def split_to_bf16(weight: torch.Tensor) -> torch.Tensor:
    """Rearranges a contiguous fp32 ``weight`` in place and returns the bf16 view of its values.

    Bytes [0, 2n) of the storage become the rounded bf16 values, bytes [2n, 4n) the low 16 bits of
    each fp32 value; ``join_from_bf16`` undoes it exactly."""
    bits = weight.view(-1).view(torch.int32)
    n = bits.numel()
    low = bits.to(torch.int16)  # the dropped bits (wrapping: bit 15 lands on the sign)
    high = torch.empty(n, dtype=torch.int16, device=weight.device)
    for start in range(0, n, _CHUNK):
        part = bits[start:start + _CHUNK] + _ROUND  # the float's bit pattern rounds like its magnitude
        high[start:start + _CHUNK] = part.bitwise_right_shift_(16).to(torch.int16)
    halves = bits.view(torch.int16)
    halves[:n] = high
    halves[n:] = low
    return halves[:n].view(torch.bfloat16).view(weight.shape)


def join_from_bf16(weight: torch.Tensor) -> None:
    """Puts back the fp32 values of a ``weight`` that ``split_to_bf16`` rearranged."""
    bits = weight.view(-1).view(torch.int32)
    n = bits.numel()
    halves = bits.view(torch.int16)
    high, low = halves[:n].clone(), halves[n:].clone()  # writing the fp32 rows overwrites both halves
    for start in range(0, n, _CHUNK):
        dropped = low[start:start + _CHUNK].to(torch.int32).bitwise_and_(0xFFFF)
        # the bf16 value was rounded up (its pattern is one more than the truncated one) exactly
        # when the dropped bits are at least half
        truncated = high[start:start + _CHUNK].to(torch.int32) - (dropped >= _ROUND).to(torch.int32)
        bits[start:start + _CHUNK] = truncated.bitwise_left_shift_(16).bitwise_or_(dropped)


def _shared_storages(model: torch.nn.Module) -> set[int]:
    """Storages that more than one parameter entry of ``model`` points at (tied weights): holding
    one of them would leave the others reading rearranged bytes."""
    seen, shared = set(), set()
    for _, param in model.named_parameters(remove_duplicate=False):
        key = param.untyped_storage().data_ptr()
        (shared if key in seen else seen).add(key)
    return shared


def _holdable(module: torch.nn.Module, device: torch.device, shared: set[int]) -> bool:
    weight = getattr(module, "weight", None)
    return (isinstance(weight, torch.nn.Parameter) and weight.dtype == torch.float32 and not weight.requires_grad
            and weight.device == device and weight.is_contiguous() and weight.storage_offset() == 0
            and weight.untyped_storage().nbytes() == 4 * weight.numel()
            and weight.untyped_storage().data_ptr() not in shared
            and not getattr(module, "weight_function", None) and not getattr(module, "bias_function", None))


class Bf16Weights:
    """Holds the fp32 weights of ``layers`` as bf16 (see the module docstring) from ``hold`` to
    ``release``. Layers whose weight cannot be held safely (another dtype or device, shared,
    patched on the fly) are left as they are."""

    def __init__(self, model: torch.nn.Module, layers: list[torch.nn.Module], device: torch.device):
        self.model, self.layers, self.device = model, layers, device
        self.held: list[tuple[torch.nn.Module, torch.nn.Parameter]] = []

    def hold(self) -> int:
        """Holds every layer it can; returns how many."""
        if self.held:
            return len(self.held)
        shared = _shared_storages(self.model)
        with torch.no_grad():
            for module in self.layers:
                if _holdable(module, self.device, shared):
                    original = module.weight
                    module.weight = torch.nn.Parameter(split_to_bf16(original), requires_grad=False)
                    self.held.append((module, original))
        return len(self.held)

    def release(self) -> None:
        """Gives every held layer its fp32 weight back, bit for bit."""
        with torch.no_grad():
            while self.held:
                module, original = self.held.pop()
                join_from_bf16(original)
                module.weight = original

    @contextlib.contextmanager
    def released(self):
        """fp32 weights for a while (a preview sample, which may unload and reload the model)."""
        was_held = bool(self.held)
        self.release()
        try:
            yield
        finally:
            if was_held:
                self.hold()
