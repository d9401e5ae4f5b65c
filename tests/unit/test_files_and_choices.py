"""Output naming and atomic saves, dtype choice, bucket sizes, optimizer/loss choices."""
import os
from pathlib import Path

import pytest
import safetensors
import torch

from loralab.adapters.files import atomic_file, load_adapter_file, next_lora_path, save_adapter_file
from loralab.dataset.buckets import bucket_resolution
from loralab.sampler import dtypes
from loralab.sampler.objective import loss_function
from loralab.sampler.optimizers import make_optimizer


def test_next_lora_path_counts_up_per_prefix_and_steps(tmp_path):
    first = next_lora_path(tmp_path, "loras/my", 100)
    assert first == tmp_path / "loras" / "my_100_steps_00001_.safetensors"
    first.parent.mkdir(parents=True)
    first.write_bytes(b"x")
    (tmp_path / "loras" / "my_100_steps_00007_.safetensors").write_bytes(b"x")
    (tmp_path / "loras" / "other_100_steps_00009_.safetensors").write_bytes(b"x")
    assert next_lora_path(tmp_path, "loras/my", 100).name == "my_100_steps_00008_.safetensors"
    assert next_lora_path(tmp_path, "loras/my", 5).name == "my_5_steps_00001_.safetensors"
    assert next_lora_path(tmp_path, "loras/my", None).name == "my_00001_.safetensors"


@pytest.mark.parametrize("prefix", ["../escape", "loras/../../escape", "/abs/path", "", "."])
def test_prefix_that_leaves_the_output_directory_is_refused(tmp_path, prefix):
    with pytest.raises(ValueError, match="prefix"):
        next_lora_path(tmp_path / "out", prefix, 1)


def test_save_is_atomic_and_keeps_metadata(tmp_path):
    path = tmp_path / "a.safetensors"
    save_adapter_file(path, {"w": torch.ones(2, 2)}, {"ss_steps": 3})
    tensors, meta = load_adapter_file(path)
    assert torch.equal(tensors["w"], torch.ones(2, 2)) and meta == {"ss_steps": "3"}
    with pytest.raises(Exception):  # a non-tensor value fails inside the writer
        save_adapter_file(path, {"w": "not a tensor"}, {})
    assert [p.name for p in tmp_path.iterdir()] == ["a.safetensors"]  # no temp file, old file intact
    with safetensors.safe_open(str(path), "pt") as f:
        assert f.metadata() == {"ss_steps": "3"}


def test_auto_dtype_avoids_emulated_bf16_on_cpu(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.setattr(dtypes, "cpu_has_fast_bf16", lambda: False)
    dtype, reason = dtypes.resolve_training_dtype("auto", cpu)
    assert dtype == torch.float32 and "no bf16" in reason
    dtype, reason = dtypes.resolve_training_dtype("bf16", cpu)
    assert dtype == torch.bfloat16 and "slower" in reason  # honoured, with a warning in the log line
    monkeypatch.setattr(dtypes, "cpu_has_fast_bf16", lambda: True)
    assert dtypes.resolve_training_dtype("auto", cpu)[0] == torch.bfloat16
    assert dtypes.resolve_lora_dtype("auto", torch.bfloat16) == torch.float32  # fp32 master weights
    with pytest.raises(ValueError, match="training_dtype"):
        dtypes.resolve_training_dtype("fp8", cpu)


@pytest.mark.parametrize("size,expected", [((512, 512), (512, 512)), ((1024, 512), (704, 320)),
                                           ((300, 900), (320, 768))])
def test_bucket_keeps_aspect_within_area(size, expected):
    w, h = bucket_resolution(*size, 512, 512)
    assert (w, h) == expected
    assert w % 64 == 0 and h % 64 == 0 and w * h <= 512 * 512


def test_unknown_optimizer_and_loss_are_named():
    with pytest.raises(ValueError, match="optimizer 'Lion'"):
        make_optimizer("Lion", [torch.nn.Parameter(torch.zeros(1))], 1e-3)
    with pytest.raises(ValueError, match="loss_function 'Foo'"):
        loss_function("Foo")
    assert loss_function("Huber") is torch.nn.functional.huber_loss


def test_saved_files_get_the_mode_of_a_new_file_under_the_umask_not_0600(tmp_path):
    """mkstemp and safetensors create 0600 files: a LoRA saved by a server running as one user
    (or in a container) would be unreadable to everyone else sharing the output folder."""
    old = os.umask(0o022)
    try:
        lora = save_adapter_file(tmp_path / "a.safetensors", {"w": torch.zeros(2)}, {"k": "v"})
        with atomic_file(tmp_path / "b.png", overwrite=False) as tmp:
            Path(tmp).write_bytes(b"png")
    finally:
        os.umask(old)
    assert oct(lora.stat().st_mode & 0o777) == oct(0o644)
    assert oct((tmp_path / "b.png").stat().st_mode & 0o777) == oct(0o644)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.safetensors", "b.png"]  # no temp files left


class _Lora(dict):
    """A LORA_MODEL value with a resumable state, as Train LoRA returns it."""
    metadata: dict = {}
    kohya_names = None
    train_state = ({"rng": torch.zeros(4, dtype=torch.uint8)}, {"fingerprint": "{}", "step": "1"})


@pytest.mark.parametrize("prefix", ["loras/" + "m" * 300, "loras/" + "\u5b66" * 80],  # 300 bytes; 240 + suffix
                         ids=["ascii", "cjk"])
def test_a_prefix_that_makes_too_long_a_file_name_is_refused_by_name(tmp_path, prefix):
    with pytest.raises(ValueError, match="use a shorter prefix"):
        next_lora_path(tmp_path, prefix, 1)


def test_the_longest_name_the_file_system_takes_saves_with_its_sidecar(tmp_path):
    from loralab.sampler import train_state
    from loralab.sampler.run_checkpoints import save_lora
    path = next_lora_path(tmp_path, "l" * 215, 1)  # 242 bytes: the temp file beside it must be shorter
    save_lora(path, _Lora({"diffusion_model.x.lora_up.weight": torch.zeros(2, 2)}), "comfyui", 1)
    assert path.is_file() and train_state.state_path_for(path).is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([path.name, train_state.state_path_for(path).name])


def test_a_failed_adapter_write_leaves_no_sidecar(tmp_path, monkeypatch):
    from loralab.sampler import run_checkpoints, train_state

    def fail(*args, **kwargs):
        raise OSError("disk full")
    monkeypatch.setattr(run_checkpoints, "save_adapter_file", fail)
    path = tmp_path / "a.safetensors"
    with pytest.raises(OSError, match="disk full"):
        run_checkpoints.save_lora(path, _Lora({"diffusion_model.x.lora_up.weight": torch.zeros(2, 2)}), "comfyui", 1)
    assert list(tmp_path.iterdir()) == []


def test_a_checkpoint_prefix_too_long_for_its_interrupted_name_fails_before_training(tmp_path):
    from loralab.sampler.run_checkpoints import checkpoint_location
    checkpoint_location(tmp_path, "c" * 200)  # fits every name a run writes
    with pytest.raises(ValueError, match="use a shorter checkpoint_prefix"):
        checkpoint_location(tmp_path, "c" * 225)  # its _step99999_interrupted name would not


def test_a_prefix_through_an_existing_file_is_refused_by_name(tmp_path):
    (tmp_path / "loras").write_text("a file, not a folder")
    with pytest.raises(ValueError, match="prefix 'loras/my' needs the folder 'loras'"):
        next_lora_path(tmp_path, "loras/my", 1)


def test_the_loss_plot_saves_under_the_longest_name(tmp_path):
    from loralab.report.loss_plot import render_loss_plot
    path = render_loss_plot([1.0, 0.5], tmp_path / ("p" * 230 + "_00001_.png"))
    assert path.is_file() and list(tmp_path.iterdir()) == [path]
