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
