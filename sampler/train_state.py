"""Resumable training state: optimizer moments, the RNG, the data order, the step and (fp16) the
loss scale.

Saved beside an adapter file as ``<name>.trainstate`` (safetensors content; an extension that
ComfyUI's LoRA lists do not show), so the ``.safetensors`` stays a plain adapter every tool reads.
Parameters are matched by stable names (``<layer>:<param>``), never by position, so a file whose
keys come back in another order still restores exactly.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import safetensors
import torch

from ..adapters.files import save_adapter_file

STATE_SUFFIX = ".trainstate"


def state_path_for(adapter_path: str | os.PathLike) -> Path:
    """``foo.safetensors`` -> ``foo.trainstate``."""
    path = Path(adapter_path)
    return path.with_suffix(STATE_SUFFIX)


def capture(optimizer: torch.optim.Optimizer, names: list[str], generator: torch.Generator,
            orders: list[list[int]], step: int, fingerprint: dict,
            loss_scale: dict | None = None) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors + metadata describing where training stands."""
    sd = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {"rng": generator.get_state().clone()}
    scalars: dict[str, dict[str, float]] = {}
    for index, entries in sd["state"].items():
        for key, value in entries.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optim/{names[index]}/{key}"] = value.detach().cpu().clone()
            else:
                scalars.setdefault(names[index], {})[key] = value
    groups = [{k: v for k, v in g.items() if k != "params"} for g in sd["param_groups"]]
    metadata = {"step": str(step), "names": json.dumps(names), "param_groups": json.dumps(groups),
                "scalars": json.dumps(scalars), "orders": json.dumps(orders), "fingerprint": json.dumps(fingerprint)}
    if loss_scale is not None:
        metadata["loss_scale"] = json.dumps(loss_scale)
    return tensors, metadata


def save(path: str | os.PathLike, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> Path:
    return save_adapter_file(path, tensors, metadata)


def load(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]] | None:
    path = Path(path)
    if not path.is_file():
        return None
    with safetensors.safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})


def restore(state: tuple[dict[str, torch.Tensor], dict[str, str]], optimizer: torch.optim.Optimizer,
            names: list[str], generator: torch.Generator) -> tuple[int, list[list[int]], dict | None]:
    """Loads optimizer moments and the RNG; returns (step, data orders, loss scale state or None).
    Raises ValueError when the state belongs to a different set of parameters."""
    tensors, metadata = state
    saved_names = json.loads(metadata["names"])
    if sorted(saved_names) != sorted(names):
        raise ValueError("the training state does not match this adapter's parameters")
    scalars = json.loads(metadata.get("scalars", "{}"))
    by_name = {}
    for key, value in tensors.items():
        if key.startswith("optim/"):
            name, entry = key[len("optim/"):].rsplit("/", 1)
            by_name.setdefault(name, {})[entry] = value
    for name, entries in scalars.items():
        by_name.setdefault(name, {}).update(entries)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    for name, param in zip(names, params):  # a sidecar of another run with the same layer names
        for entry, value in by_name.get(name, {}).items():
            if isinstance(value, torch.Tensor) and value.ndim > 0 and value.shape != param.shape:
                raise ValueError(f"its '{entry}' of {name} has shape {tuple(value.shape)}, the parameter "
                                 f"{tuple(param.shape)}")
    sd = optimizer.state_dict()
    sd["state"] = {i: by_name[n] for i, n in enumerate(names) if n in by_name}
    for group, saved in zip(sd["param_groups"], json.loads(metadata["param_groups"])):
        group.update({k: v for k, v in saved.items() if k not in ("lr",)})
    optimizer.load_state_dict(sd)
    generator.set_state(tensors["rng"])
    loss_scale = metadata.get("loss_scale")
    return int(metadata["step"]), json.loads(metadata.get("orders", "[]")), json.loads(loss_scale) if loss_scale else None
