"""Checkpoints on the real tiny SD1.5 model, in-process: an interrupt in the middle of an
accumulated step resumes bit-exactly, and periodic checkpoints keep the newest few, each a file
ComfyUI's own LoRA loader reads completely."""
from __future__ import annotations

import dataclasses
import logging
import re

import pytest
import safetensors
import torch

import comfy.model_management
import comfy.sd

from loralab.adapters.files import load_adapter_file
from loralab.sampler import lora_training, train_state
from loralab.sampler.lora_training import ExistingAdapter, LoraTrainingRequest, release_patcher, train_lora
from loralab.sampler.run_outputs import CheckpointSettings, TrainingEvents
from loralab.sampler.train_sampler import TrainConfig
from loralab.sampler.training_set import TrainingSet


class Recorder(TrainingEvents):
    def __init__(self):
        self.checkpoints, self.finished_as = [], []

    def checkpoint(self, step, path, reason, message):
        self.checkpoints.append((step, path, reason, message))

    def finished(self, status):
        self.finished_as.append(status)


def _request(steps, checkpoints=None, existing=None, accumulate=1):
    return LoraTrainingRequest(
        config=TrainConfig(steps=steps, learning_rate=2e-3, seed=11, grad_accumulation_steps=accumulate),
        rank=4, alpha=4.0, training_dtype="fp32", gradient_checkpointing=False, existing=existing,
        checkpoints=checkpoints)


def _weights(network):
    return {n: p.detach().clone() for n, p in network.named_trainables()}


def _existing(path):
    tensors, metadata = load_adapter_file(path)
    return ExistingAdapter(tensors, metadata, train_state.load(train_state.state_path_for(path)), path.name)


@pytest.fixture
def interrupt_on_draw(monkeypatch):
    """Sets ComfyUI's interrupt flag (what POST /interrupt does) right after micro-batch number
    ``at`` is drawn, i.e. in the middle of an optimizer step when accumulating."""
    original = TrainingSet.draw
    plan = {"at": None, "draws": 0}

    def draw(self, batch_size, generator):
        out = original(self, batch_size, generator)
        plan["draws"] += 1
        if plan["draws"] == plan["at"]:
            comfy.model_management.interrupt_current_processing(True)
        return out

    def arm(at):
        plan.update(at=at, draws=0)

    monkeypatch.setattr(TrainingSet, "draw", draw)
    yield arm
    comfy.model_management.interrupt_current_processing(False)


def test_interrupt_mid_accumulated_step_resumes_bit_exactly(sd15, motif_training_inputs, tmp_path, interrupt_on_draw):
    model, _, _ = sd15
    latents, positive = motif_training_inputs
    latents, positive = latents[:2], positive[:2]  # two images: every step also starts a new epoch order
    whole = train_lora(model, latents, positive, _request(3, accumulate=2))

    events = Recorder()
    settings = CheckpointSettings(output_dir=str(tmp_path), prefix="loras/acc")
    interrupt_on_draw(3)  # step 2's first micro-batch: it advances the RNG and the data order
    with pytest.raises(comfy.model_management.InterruptProcessingException):
        train_lora(model, latents, positive, _request(3, settings, accumulate=2), events=events)
    interrupt_on_draw(None)
    assert events.finished_as == ["interrupted"]
    path = tmp_path / "loras" / "acc_step00001_interrupted.safetensors"
    assert [(s, p, r) for s, p, r, _ in events.checkpoints] == [(1, str(path), "interrupted")]
    message = events.checkpoints[0][3]
    assert str(path) in message and "existing_lora" in message and "set steps to 2" in message
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name, path.with_suffix(".trainstate").name]

    resumed = train_lora(model, latents, positive, _request(2, existing=_existing(path), accumulate=2))
    assert resumed.total_steps == 3
    a, b = _weights(whole.network), _weights(resumed.network)
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_interrupt_before_the_first_step_saves_nothing(sd15, motif_training_inputs, tmp_path, interrupt_on_draw,
                                                       caplog):
    model, _, _ = sd15
    latents, positive = motif_training_inputs
    events = Recorder()
    interrupt_on_draw(1)
    with caplog.at_level(logging.WARNING, logger="loralab"), \
            pytest.raises(comfy.model_management.InterruptProcessingException):
        train_lora(model, latents[:1], positive[:1], _request(2, CheckpointSettings(str(tmp_path), "loras/none"),
                                                              accumulate=2), events=events)
    assert events.checkpoints == [] and events.finished_as == ["interrupted"]
    assert "before the first step completed; no checkpoint saved" in caplog.text
    assert not (tmp_path / "loras").exists() or not list((tmp_path / "loras").iterdir())


def test_periodic_checkpoints_keep_the_newest_and_load_in_comfyui(sd15, motif_training_inputs, tmp_path, caplog):
    model, _, _ = sd15
    latents, positive = motif_training_inputs
    folder = tmp_path / "loras"
    folder.mkdir()
    others = [folder / "per_step00010.safetensors", folder / "per_final.safetensors", folder / "per_step00002.txt"]
    for other in others:  # files of an earlier run or of the user: never deleted
        other.write_bytes(b"not ours")
    events = Recorder()
    settings = CheckpointSettings(output_dir=str(tmp_path), prefix="loras/per", every=2, keep_last=2)
    result = train_lora(model, latents[:2], positive[:2], _request(7, settings), events=events)
    assert [(s, r) for s, _, r, _ in events.checkpoints] == [(2, "periodic"), (4, "periodic"), (6, "periodic")]
    ours = sorted(p.name for p in folder.iterdir() if p not in others)
    assert ours == ["per_step00004.safetensors", "per_step00004.trainstate",
                    "per_step00006.safetensors", "per_step00006.trainstate"]
    assert all(o.read_bytes() == b"not ours" for o in others)

    for path in sorted(folder.glob("per_step0000[46].safetensors")):
        step = int(re.search(r"step(\d{5})", path.name).group(1))
        with safetensors.safe_open(str(path.with_suffix(".trainstate")), "pt") as f:
            assert int(f.metadata()["step"]) == step
        tensors, metadata = load_adapter_file(path)
        assert metadata["ss_steps"] == str(step)
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            patched, _ = comfy.sd.load_lora_for_models(model, None, tensors, 1.0, 0)
        assert "lora key not loaded" not in caplog.text
        layers = {k.split(".")[0] for k in tensors if k.endswith(".lora_down.weight")}
        assert len(patched.patches) == len(layers) == len(result.network)
        release_patcher(patched)
    # a periodic checkpoint resumes exactly too: step 6 + 1 more step = the 7-step run
    resumed = train_lora(model, latents[:2], positive[:2], _request(1, existing=_existing(folder / "per_step00006.safetensors")))
    a, b = _weights(result.network), _weights(resumed.network)
    assert all(torch.equal(a[n], b[n]) for n in a)


def _scheduled(steps, checkpoints=None, existing=None, **config):
    request = _request(steps, checkpoints, existing)
    settings = {"lr_scheduler": "cosine", "lr_warmup_steps": 2, "max_grad_norm": 0.05, **config}
    request.config = dataclasses.replace(request.config, **settings)
    return request


def test_a_scheduled_clipped_run_resumes_along_the_same_curve_bit_exactly(sd15, motif_training_inputs, tmp_path,
                                                                          interrupt_on_draw):
    model, _, _ = sd15
    latents, positive = motif_training_inputs
    latents, positive = latents[:2], positive[:2]
    lrs = []
    whole = train_lora(model, latents, positive, _scheduled(5), on_step=lambda r: lrs.append(r.lr))
    # 2 warmup steps (half, then full rate), then a cosine over the 3 steps left: 1, 0.75, 0.25
    assert lrs == pytest.approx([2e-3 * f for f in (0.5, 1.0, 1.0, 0.75, 0.25)])
    assert whole.lora.metadata["ss_lr_scheduler"] == "cosine" and whole.lora.metadata["ss_max_grad_norm"] == "0.05"

    settings = CheckpointSettings(output_dir=str(tmp_path), prefix="loras/sched")
    interrupt_on_draw(3)  # in step 3: steps 1 and 2 are done
    with pytest.raises(comfy.model_management.InterruptProcessingException):
        train_lora(model, latents, positive, _scheduled(5, settings))
    interrupt_on_draw(None)
    path = tmp_path / "loras" / "sched_step00002_interrupted.safetensors"
    resumed_lrs = []
    resumed = train_lora(model, latents, positive, _scheduled(3, existing=_existing(path)),
                         on_step=lambda r: resumed_lrs.append(r.lr))
    assert resumed_lrs == lrs[2:]
    a, b = _weights(whole.network), _weights(resumed.network)
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_max_grad_norm_clips_the_whole_adapter_gradient(sd15, motif_training_inputs):
    """SGD at rate 1 moves the weights by exactly the gradient: after clipping, its norm."""
    model, _, _ = sd15
    latents, positive = motif_training_inputs
    request = _scheduled(1, optimizer="SGD", learning_rate=1.0, max_grad_norm=1e-4, lr_scheduler="constant",
                         lr_warmup_steps=0)
    initial = lora_training._new_network(model.model, request, dtype=torch.float32, device=torch.device("cpu"))
    result = train_lora(model, latents[:1], positive[:1], request)
    before, after = _weights(initial), _weights(result.network)
    moved = torch.sqrt(sum(((after[n] - before[n]).double() ** 2).sum() for n in before))
    assert float(moved) == pytest.approx(1e-4, rel=1e-3)
