"""Training through blocks that modify, in place, tensors that autograd saved for the backward.

ComfyUI writes its models for inference, where adding to a tensor in place saves a copy. Flux's
blocks (ComfyUI 0.3.75, comfy/ldm/flux/layers.py) do ``img += ...`` on the hidden states they
were given, and autograd refuses the backward when something it saved was changed since:

- gradient checkpointing keeps each checkpointed piece's inputs to run the piece again in the
  backward; a piece that adds to its own input changes them (``InputCopies``);
- a LayerNorm (or RMSNorm) keeps its input for its backward; ``img_norm1(img)`` followed by
  ``img += ...`` changes it (``attach_norm_guard``).

Both fixes give the block a copy of what it modifies, and only where the model shows that it does.
Version counters tell: every in-place op on a tensor bumps its counter. A piece's or norm's first
training forward learns which tensors were modified: the measuring forward of gradient
checkpointing when there is one (it is never back-propagated, so it runs on the tensors themselves,
see ``observing``), else the first step, which runs on copies of every candidate until it knows.
From then on only those tensors are copied: one copy of a piece's input and one of each such
norm's input on Flux; nothing at all on an SD UNet, whose blocks never do this.
"""
from __future__ import annotations

import contextlib
import contextvars

import torch
from comfy.patcher_extension import PatcherInjection

GUARD_KEY = "loralab_norm_guard"
# Norms that keep their input for the backward (torch.nn.RMSNorm from torch 2.4 on)
NORMS = tuple(n for n in (torch.nn.LayerNorm, getattr(torch.nn, "RMSNorm", None)) if n is not None)
CONTAINERS = (torch.nn.ModuleList, torch.nn.Sequential, torch.nn.ModuleDict)

# True inside a forward that is never back-propagated: modified tensors do no harm there.
_OBSERVING: contextvars.ContextVar[bool] = contextvars.ContextVar("loralab_observing", default=False)


@contextlib.contextmanager
def observing():
    """Marks a forward that is never back-propagated (gradient checkpointing's measuring forward):
    the guards learn from it which tensors the model modifies, without copying any."""
    token = _OBSERVING.set(True)
    try:
        yield
    finally:
        _OBSERVING.reset(token)


def _tensors(args: tuple, kwargs: dict) -> dict:
    """The tensor arguments by position or keyword."""
    found = {i: a for i, a in enumerate(args) if isinstance(a, torch.Tensor)}
    found.update((k, v) for k, v in kwargs.items() if isinstance(v, torch.Tensor))
    return found


def _with_copies(args: tuple, kwargs: dict, keys) -> tuple[list, dict, dict]:
    """``args`` and ``kwargs`` with the tensors under ``keys`` replaced by copies, and the copies by
    key. A tensor passed twice gets one copy, so the arguments alias as before."""
    args, kwargs = list(args), dict(kwargs)
    made, copies = {}, {}
    for key, value in _tensors(args, kwargs).items():
        if key not in keys:
            continue
        copy = made.get(id(value))
        if copy is None:
            copy = made[id(value)] = value.clone()
        if isinstance(key, int):
            args[key] = copy
        else:
            kwargs[key] = copy
        copies[key] = copy
    return args, kwargs, copies


class InputCopies:
    """Which tensor arguments each checkpointed piece modifies in place (by position or keyword),
    learnt from its first training call, and the piece's forward on copies of exactly those."""

    def __init__(self):
        self.modified: dict[str, frozenset] = {}

    def observe(self, name: str, forward, args: tuple, kwargs: dict):
        """``forward(*args, **kwargs)`` in a forward that is never back-propagated, learning which
        arguments it modifies from their version counters."""
        tensors = _tensors(args, kwargs)
        versions = {key: t._version for key, t in tensors.items()}
        out = forward(*args, **kwargs)
        if name not in self.modified:
            self.modified[name] = frozenset(k for k, t in tensors.items() if t._version != versions[k])
        return out

    def wrap(self, name: str, forward):
        """``forward`` as a checkpoint should run it: unchanged for a piece known to modify none of its
        inputs, else on copies of those it modifies (of every tensor input, until that is known), so
        the inputs the checkpoint keeps for the recompute stay as they were."""
        known = self.modified.get(name)
        if known is not None and not known:
            return forward

        def run(*args, **kwargs):
            args, kwargs, copies = _with_copies(args, kwargs, known if known is not None else _tensors(args, kwargs))
            out = forward(*args, **kwargs)
            if known is None:
                self.modified[name] = frozenset(k for k, copy in copies.items() if copy._version > 0)
            return out
        return run


def _owner(diffusion_model: torch.nn.Module, name: str) -> str:
    """The block a layer belongs to: its nearest ancestor that is not a plain container."""
    parts = name.split(".")[:-1]
    while parts and isinstance(diffusion_model.get_submodule(".".join(parts)), CONTAINERS):
        parts.pop()
    return ".".join(parts)


class NormGuard:
    """The norm layers of one diffusion model whose input the model modifies in place after they
    normalised it. Until a training forward has shown which, every norm is watched: its input's
    version is noted when it runs and compared when the block holding it returns (the block is
    where it gets added to), and it normalises a copy unless the forward is only observed. The
    norms found unmodified get their own forward back at the end of that forward."""

    def __init__(self, diffusion_model: torch.nn.Module):
        self.owners = {name: _owner(diffusion_model, name) for name, module in diffusion_model.named_modules()
                       if isinstance(module, NORMS)}
        self.modified: set[str] | None = None  # None: not learnt yet
        self._found: set[str] = set()
        self._watched = 0  # norm calls noted in the forward being learnt from
        self._pending: dict[str, list] = {}  # block -> [(norm, its input, the input's version then)]
        self._hooks: list = []

    def guarded(self) -> list[str]:
        """The norms whose forward the guard replaces."""
        return list(self.owners) if self.modified is None else sorted(self.modified)

    def forward_of(self, name: str, module: torch.nn.Module):
        own = type(module).forward

        def forward(x, *args, **kwargs):
            if not torch.is_grad_enabled() or not isinstance(x, torch.Tensor):
                return own(module, x, *args, **kwargs)
            if self.modified is None:
                self._watched += 1
                self._pending.setdefault(self.owners[name], []).append((name, x, x._version))
                if _OBSERVING.get():
                    return own(module, x, *args, **kwargs)
            return own(module, x.clone(), *args, **kwargs)
        return forward

    def _check(self, block: str) -> None:
        for name, x, version in self._pending.pop(block, ()):
            if x._version != version:
                self._found.add(name)

    def start_learning(self, diffusion_model: torch.nn.Module) -> None:
        """Hooks the blocks holding norms, and the model's end, for the next training forward."""
        if self.modified is not None or self._hooks:
            return
        self._found, self._watched = set(), 0
        for block in set(self.owners.values()) - {""}:
            self._hooks.append(diffusion_model.get_submodule(block).register_forward_hook(
                lambda *_, block=block: self._check(block)))
        self._hooks.append(diffusion_model.register_forward_hook(lambda *_: self._finish(diffusion_model)))

    def stop_learning(self) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()
        self._pending.clear()

    def _finish(self, diffusion_model: torch.nn.Module) -> None:
        if not self._watched:
            return  # a forward without grad: nothing learnt yet
        for block in list(self._pending):
            self._check(block)
        self.stop_learning()
        self.modified = set(self._found)
        for name in self.owners:
            if name not in self.modified:
                diffusion_model.get_submodule(name).__dict__.pop("forward", None)


def attach_norm_guard(model_patcher) -> NormGuard:
    """Guards the diffusion model's norms while the patcher is loaded (see NormGuard); returns the
    guard. Only the training clone gets it: the model users sample with never runs backward."""
    guard = NormGuard(model_patcher.model.diffusion_model)
    if not guard.owners:
        return guard

    def inject(mp):
        dm = mp.model.diffusion_model
        for name in guard.guarded():
            module = dm.get_submodule(name)
            module.forward = guard.forward_of(name, module)
        guard.start_learning(dm)

    def eject(mp):
        dm = mp.model.diffusion_model
        guard.stop_learning()
        for name in guard.owners:
            dm.get_submodule(name).__dict__.pop("forward", None)

    model_patcher.set_injections(GUARD_KEY, [PatcherInjection(inject=inject, eject=eject)])
    return guard
