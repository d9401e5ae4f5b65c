"""Latents and their conditioning, prepared once on the device, and batch drawing.

Items whose latents and conditioning tensors have equal shapes form a bucket (a batch must share
them): images of another size, or captions that encode to another token count, go to another
bucket, so nothing is padded and no join can fail. Each bucket's latents and per-item model
conditioning are stacked once, on the device; a batch is an index into those stacks, so no step
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


def _shape_of(value):
    """The shape of a conditioning value: a tensor's, or a list's tensors' shapes."""
    if isinstance(value, torch.Tensor):
        return tuple(value.shape)
    if isinstance(value, (list, tuple)):
        return tuple(_shape_of(v) for v in value)
    return None


def _stacks_with(first: dict[str, object], item: dict[str, object]) -> bool:
    """Whether ``item``'s conditioning stacks with ``first``'s as it is: the same names, equal
    tensor shapes and equal constants. ComfyUI's own join would pad cross-attention to a common
    length, or refuse (SD3's and Flux's T5 tokens); grouping by shape needs neither."""
    if item.keys() != first.keys():
        return False
    for name, obj in first.items():
        other = item[name]
        if type(other) is not type(obj):
            return False
        if isinstance(obj, comfy.conds.CONDConstant):
            if not obj.can_concat(other):
                return False
        elif _shape_of(obj.cond) != _shape_of(other.cond):
            return False
    return True


def _group_by_conditioning(conds: list[dict[str, object]]) -> list[list[int]]:
    """Positions of ``conds`` in groups that stack (``_stacks_with``), in first-seen order."""
    groups: list[list[int]] = []
    for j, item in enumerate(conds):
        for group in groups:
            if _stacks_with(conds[group[0]], item):
                group.append(j)
                break
        else:
            groups.append([j])
    return groups


def _on_device(value, device):
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, list):
        return [_on_device(v, device) for v in value]
    return value


def _stack_conds(per_item: list[dict[str, object]], device) -> dict[str, object]:
    """One group's conditioning stacked along the batch, on the training device (ComfyUI's text
    encoders leave it on theirs): moved once here rather than at every step."""
    out = {}
    for name, first in per_item[0].items():
        if isinstance(first, comfy.conds.CONDConstant):
            out[name] = first.cond
        else:
            out[name] = _on_device(first.concat([item[name] for item in per_item[1:]]), device)
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
            for group in _group_by_conditioning(conds):
                self.buckets.append(Bucket(lat[group], _stack_conds([conds[j] for j in group], device)))
        self.size = len(items)

    @property
    def shapes(self) -> list[tuple[int, ...]]:
        """The distinct latent shapes, in first-seen order (captions can split one size in two)."""
        return list(dict.fromkeys(tuple(b.latents.shape[1:]) for b in self.buckets))

    def draw(self, batch_size: int, generator: torch.Generator) -> tuple[torch.Tensor, dict[str, object]]:
        """Next batch, drawn so that an epoch shows every image once, whatever the buckets.

        A bucket is chosen in proportion to the batches it has left in the epoch, so small buckets
        are not drawn more or less often than their images' share. A bucket's last batch of the
        epoch may be short while other buckets still have images; the next epoch starts for every
        bucket at once, and the batch that ends an epoch is filled from the next one, never with an
        image twice.
        """
        if not any(b.order for b in self.buckets):
            for b in self.buckets:
                b.order = torch.randperm(len(b), generator=generator).tolist()
        if len(self.buckets) > 1:
            weights = torch.tensor([-(-len(b.order) // min(batch_size, len(b))) for b in self.buckets],
                                   dtype=torch.float64)
            bucket = self.buckets[int(torch.multinomial(weights, 1, generator=generator))]
        else:
            bucket = self.buckets[0]
        take = min(batch_size, len(bucket))
        if len(bucket.order) < take:
            if any(b.order for b in self.buckets if b is not bucket):
                take = len(bucket.order)  # the others finish this epoch first
            else:
                self._next_epoch(bucket, generator)
        index, bucket.order = bucket.order[:take], bucket.order[take:]
        return bucket.select(torch.tensor(index))

    def _next_epoch(self, ending: "Bucket", generator: torch.Generator) -> None:
        """A fresh order for every bucket; ``ending``'s is appended to what it has left."""
        for b in self.buckets:
            fresh = torch.randperm(len(b), generator=generator).tolist()
            if b is not ending:
                b.order = fresh
                continue
            pending = set(b.order)
            # The batch that spans two epochs must not hold an image twice: the new epoch's copies
            # of the images still pending from the last one go to its end.
            b.order += [i for i in fresh if i not in pending] + [i for i in fresh if i in pending]
