"""Checkpoint files of a run: names, where they may go, keep-last pruning that deletes only what the
run wrote, and the writer SaveLoRA shares (adapter + .trainstate sidecar)."""
from __future__ import annotations

import pytest
import safetensors
import torch

from loralab.adapters.metadata import LoraStateDict
from loralab.sampler import train_state
from loralab.sampler.run_checkpoints import RunCheckpoints, checkpoint_location, save_lora
from loralab.sampler.run_outputs import CheckpointSettings


def _lora(step: int) -> LoraStateDict:
    """A small LORA_MODEL value with a real optimizer state after ``step`` AdamW steps."""
    up = torch.nn.Parameter(torch.full((3, 2), float(step)))
    optimizer = torch.optim.AdamW([up], lr=0.1)
    for _ in range(step):
        up.grad = torch.ones_like(up)
        optimizer.step()
    lora = LoraStateDict({"diffusion_model.layer.lora_up.weight": up.detach().clone(),
                          "diffusion_model.layer.lora_down.weight": torch.ones(2, 4)}, {"ss_steps": str(step)})
    lora.train_state = train_state.capture(optimizer, ["layer:lora_up"], torch.Generator().manual_seed(step),
                                           [[1, 0]], step, {"optimizer": "AdamW"})
    return lora


def _state_step(path) -> int:
    with safetensors.safe_open(str(train_state.state_path_for(path)), "pt") as f:
        return int(f.metadata()["step"])


def test_keep_last_deletes_only_older_checkpoints_of_this_run(tmp_path):
    folder = tmp_path / "loras"
    folder.mkdir()
    foreign = [folder / "run_step00009.safetensors", folder / "run_step00009.trainstate", folder / "run.safetensors",
               folder / "run_step00002_copy.safetensors", folder / "other_step00001.safetensors"]
    for path in foreign:
        path.write_bytes(b"someone else's")
    run = RunCheckpoints(CheckpointSettings(str(tmp_path), "loras/run", every=2, keep_last=2, key_style="comfyui"))
    saved = []
    for step in range(1, 9):
        if run.due(step):
            saved.append(run.save_periodic(step, _lora(step))[0])
    assert [p.name for p in saved] == [f"run_step{s:05d}.safetensors" for s in (2, 4, 6, 8)]
    interrupted, message = run.save_interrupted(9, _lora(9), remaining=3)
    assert interrupted.name == "run_step00009_interrupted.safetensors"
    assert str(interrupted) in message and "set steps to 3" in message
    ours = sorted(p.name for p in folder.iterdir() if p not in foreign)
    assert ours == ["run_step00006.safetensors", "run_step00006.trainstate", "run_step00008.safetensors",
                    "run_step00008.trainstate", "run_step00009_interrupted.safetensors",
                    "run_step00009_interrupted.trainstate"]
    assert all(p.read_bytes() == b"someone else's" for p in foreign)
    for step, name in ((6, "run_step00006.safetensors"), (8, "run_step00008.safetensors"),
                       (9, "run_step00009_interrupted.safetensors")):
        assert _state_step(folder / name) == step
        with safetensors.safe_open(str(folder / name), "pt") as f:
            assert f.metadata()["ss_steps"] == str(step)
            assert torch.equal(f.get_tensor("diffusion_model.layer.lora_up.weight"),
                               _lora(step)["diffusion_model.layer.lora_up.weight"])
    assert not list(folder.glob(".*tmp"))


def test_due_counts_global_steps_and_zero_turns_periodic_saving_off(tmp_path):
    every3 = RunCheckpoints(CheckpointSettings(str(tmp_path), "loras/a", every=3))
    assert [s for s in range(0, 10) if every3.due(s)] == [3, 6, 9]
    off = RunCheckpoints(CheckpointSettings(str(tmp_path), "loras/a", every=0))
    assert not any(off.due(s) for s in range(0, 10))
    with pytest.raises(ValueError, match="keep_last must be at least 1"):
        RunCheckpoints(CheckpointSettings(str(tmp_path), "loras/a", every=2, keep_last=0))


@pytest.mark.parametrize("prefix", ["../up", "loras/../../up", "/tmp/abs", "", "."])
def test_prefix_must_stay_inside_the_output_directory(tmp_path, prefix):
    with pytest.raises(ValueError, match="checkpoint_prefix"):
        checkpoint_location(tmp_path / "output", prefix)


def test_prefix_with_folders_resolves_under_the_output_directory(tmp_path):
    folder, stem = checkpoint_location(tmp_path, "loras/runs/night")
    assert folder == (tmp_path / "loras" / "runs").resolve() and stem == "night"


def test_save_lora_writes_the_state_first_and_drops_a_stale_one(tmp_path):
    path = tmp_path / "x.safetensors"
    save_lora(path, _lora(3), "comfyui", steps=3)
    assert _state_step(path) == 3
    plain = LoraStateDict(dict(_lora(1)), {})  # e.g. from ComfyUI's native trainer: no training state
    save_lora(path, plain, "comfyui")
    assert not train_state.state_path_for(path).exists()  # it would have described another adapter
    with safetensors.safe_open(str(path), "pt") as f:
        assert f.metadata()["loralab_key_style"] == "comfyui"
    with pytest.raises(ValueError, match="key_style 'kohya' needs the layer names"):
        save_lora(tmp_path / "y.safetensors", _lora(1), "kohya")
    assert not (tmp_path / "y.safetensors").exists() and not (tmp_path / "y.trainstate").exists()
