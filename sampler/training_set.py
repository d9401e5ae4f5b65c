"""Latents and their conditioning, prepared once on the device, and batch drawing.

Latents of equal shape form a bucket (a batch must share one shape). Each bucket's latents and
per-item model conditioning are stacked once; a batch is an index into those stacks, so no step
re-stacks the data. Order is epoch-style: every image is seen once before any repeats.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

import comfy.conds


class TrainingSetError(ValueError):
    """Bad latents/positive inputs; the message names the input and what to do."""


@dataclass
class Bucket:
    latents: torch.Tensor  # [n, C, H, W] processed latents on the device
    conds: dict[str, object]  # name -> stacked tensor [n, ...], or a constant (CONDConstant)
    order: list[int] = field(default_factory=list)

    def __len__(self):
        return self.latents.shape[0]

    def select(self, index: torch.Tensor) -> tuple[torch.Tensor, dict[str, object]]:
        """Latents and conditioning of the items at ``index`` (a 1-D tensor of positions)."""
        index = index.to(self.latents.device)
        conds = {k: (v.index_select(0, index) if isinstance(v, torch.Tensor) and v.shape[0] == len(self) else v)
                 for k, v in self.conds.items()}
        return self.latents.index_select(0, index), conds


def flatten_latents(latents) -> list[torch.Tensor]:
    """LATENT input(s) -> list of single latents [1, C, H, W]."""
    if isinstance(latents, dict):
        latents = [latents]
    items: list[torch.Tensor] = []
    for entry in latents:
        samples = entry["samples"] if isinstance(entry, dict) else entry
        if samples.ndim == 3:
            samples = samples[None]
        items.extend(s[None] for s in samples)
    return items


def flatten_conditioning(positive) -> list[tuple[torch.Tensor, dict]]:
    """CONDITIONING input(s) -> list of (cross_attn, extras) pairs."""
    if positive and isinstance(positive[0], (list, tuple)) and len(positive[0]) == 2 and isinstance(positive[0][0], torch.Tensor):
        positive = [positive]
    pairs = []
    for cond in positive:
        for cross_attn, extras in cond:
            pairs.append((cross_attn, extras))
    return pairs


def _model_conds(model, cross_attn, extras, latent, device) -> dict[str, object]:
    """ComfyUI's per-model conditioning objects for one item (as its samplers build them)."""
    params = dict(extras)
    params.pop("model_conds", None)
    params.update(cross_attn=cross_attn, device=device, noise=latent, prompt_type="positive")
    params.setdefault("width", latent.shape[-1] * 8)
    params.setdefault("height", latent.shape[-2] * 8)
    conds = model.extra_conds(**params)
    return {k: v.process_cond(batch_size=1, device=device, area=None) for k, v in conds.items()}


def _stack_conds(per_item: list[dict[str, object]]) -> dict[str, object]:
    out = {}
    for name in per_item[0]:
        objs = [item[name] for item in per_item]
        first = objs[0]
        if isinstance(first, comfy.conds.CONDConstant):
            out[name] = first.cond
            continue
        if not all(first.can_concat(o) for o in objs[1:]):
            raise TrainingSetError(
                f"the positive conditionings cannot be batched together ('{name}' shapes differ too much); "
                "use shorter captions of similar length or batch_size 1")
        out[name] = first.concat(objs[1:])
    return out


class TrainingSet:
    """All training items, bucketed by latent shape, ready on ``device``."""

    def __init__(self, model, latents, positive, device, dtype=torch.float32):
        items = flatten_latents(latents)
        pairs = flatten_conditioning(positive)
        if not items:
            raise TrainingSetError("latents is empty: connect a VAE Encode of at least one image")
        if len(pairs) == 1 and len(items) > 1:
            pairs = pairs * len(items)
        elif len(pairs) != len(items):
            raise TrainingSetError(
                f"positive has {len(pairs)} conditionings but latents has {len(items)} images: give one "
                "positive per image (e.g. encode each caption) or a single positive for all")
        by_shape: dict[tuple, list[int]] = {}
        for i, latent in enumerate(items):
            by_shape.setdefault(tuple(latent.shape), []).append(i)
        self.buckets: list[Bucket] = []
        for indices in by_shape.values():
            lat = torch.cat([items[i] for i in indices]).to(device=device, dtype=torch.float32)
            lat = model.process_latent_in(lat).to(dtype)
            conds = [_model_conds(model, pairs[i][0], pairs[i][1], lat[j:j + 1], device)
                     for j, i in enumerate(indices)]
            self.buckets.append(Bucket(lat, _stack_conds(conds)))
        self.size = len(items)

    @property
    def shapes(self) -> list[tuple[int, ...]]:
        return [tuple(b.latents.shape[1:]) for b in self.buckets]

    def draw(self, batch_size: int, generator: torch.Generator) -> tuple[torch.Tensor, dict[str, object]]:
        """Next batch: a bucket chosen in proportion to its size, then its next shuffled items."""
        weights = torch.tensor([len(b) for b in self.buckets], dtype=torch.float64)
        bucket = self.buckets[int(torch.multinomial(weights, 1, generator=generator))] if len(self.buckets) > 1 else self.buckets[0]
        take = min(batch_size, len(bucket))
        if len(bucket.order) < take:
            fresh = torch.randperm(len(bucket), generator=generator).tolist()
            pending = set(bucket.order)
            # A batch that spans two epochs must not hold an image twice: the new epoch's copies of
            # the images still pending from the last one go to its end.
            bucket.order += [i for i in fresh if i not in pending] + [i for i in fresh if i in pending]
        index, bucket.order = bucket.order[:take], bucket.order[take:]
        return bucket.select(torch.tensor(index))
