"""The adapter algorithms by name, and the options each accepts (keyword args to ``create``).

"dora" is LoRA with ``dora=True`` (its files are LoRA files with a ``dora_scale``), listed on its
own so a combo box can offer it; its ``from_state_dict`` defers to "lora", which reads both.
Order matters when loading: ``AdapterNetwork.from_state_dict`` takes the first algorithm whose
``from_state_dict`` accepts a layer's tensors; every algorithm only accepts its own key suffixes.
"""
from __future__ import annotations

from .boft import BOFTAdapter
from .glora import GLoRAAdapter
from .loha import LoHaAdapter
from .lokr import LoKrAdapter
from .lora import LoRAAdapter
from .oft import OFTAdapter


class DoRAAdapter(LoRAAdapter):
    """Creates LoRA adapters with DoRA's magnitude vector; loading is LoRA's job."""

    @classmethod
    def create(cls, spec, rank, alpha, **kwargs):
        return LoRAAdapter.create(spec, rank, alpha, dora=True, **kwargs)

    @classmethod
    def from_state_dict(cls, spec, tensors, *, dtype=None, device=None):
        return None


ALGORITHMS = {
    "lora": LoRAAdapter,
    "dora": DoRAAdapter,
    "loha": LoHaAdapter,
    "lokr": LoKrAdapter,
    "oft": OFTAdapter,
    "boft": BOFTAdapter,
    "glora": GLoRAAdapter,
}

# name -> {option: default}; ``rank`` / ``alpha`` are not options (OFT/BOFT: rank = block size,
# alpha unused, their ``constraint`` is what files call alpha).
ALGORITHM_OPTIONS: dict[str, dict[str, object]] = {
    "lora": {"dora": False},
    "dora": {},
    "loha": {},
    "lokr": {"factor": -1, "decompose_both": False, "full_matrix": False},
    "oft": {"block_size": 0, "constraint": 0.0},
    "boft": {"block_size": 0, "boft_m": 0, "constraint": 0.0, "rescale": False},
    "glora": {},
}
