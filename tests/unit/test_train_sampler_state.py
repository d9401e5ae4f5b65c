"""TrainSampler's resumable state on a stand-in model: fp16 runs save and restore their loss scale,
a state made on other images continues with a fresh order instead of failing, and a batch that
spans two epochs never holds an image twice."""
from __future__ import annotations

import logging
from types import SimpleNamespace

import torch

from loralab.sampler.train_sampler import TrainConfig, TrainSampler
from loralab.sampler.training_set import Bucket, TrainingSet


def _training_set(*bucket_sizes: int) -> TrainingSet:
    data = TrainingSet.__new__(TrainingSet)  # buckets of distinct latents; no model needed to draw
    data.buckets = [Bucket(torch.arange(n, dtype=torch.float32).view(n, 1, 1, 1), {}) for n in bucket_sizes]
    data.size = sum(bucket_sizes)
    return data


def _sampler(data: TrainingSet, dtype=torch.float32, batch_size=1) -> TrainSampler:
    patcher = SimpleNamespace(load_device=torch.device("cpu"))
    weight = torch.nn.Parameter(torch.zeros(3))
    config = TrainConfig(compute_dtype=dtype, batch_size=batch_size, optimizer="SGD")
    return TrainSampler(patcher, [("layer:lora_up", weight)], data, config)


def test_fp16_state_carries_the_loss_scale_and_a_resumed_sampler_continues_from_it():
    first = _sampler(_training_set(4), torch.float16)
    first.scaler.scale, first.scaler.clean_steps = 1024.0, 7
    state = first.capture_state({})
    resumed = _sampler(_training_set(4), torch.float16)
    resumed.restore_state(state)
    assert (resumed.scaler.scale, resumed.scaler.clean_steps) == (1024.0, 7)
    assert "loss_scale" not in _sampler(_training_set(4)).capture_state({})[1]  # fp32: nothing to scale


def test_a_state_made_on_more_images_continues_with_a_fresh_order(caplog):
    first = _sampler(_training_set(10))
    first.data.buckets[0].order = [9, 7, 8]  # what is left of the epoch, on a 10-image set
    state = first.capture_state({})
    resumed = _sampler(_training_set(5))
    with caplog.at_level(logging.WARNING, logger="loralab"):
        resumed.restore_state(state)
    assert resumed.data.buckets[0].order == [] and "fresh image order" in caplog.text
    for _ in range(6):  # draws work on the 5-image set
        latents, _ = resumed.data.draw(1, resumed.generator)
        assert 0 <= int(latents.flatten()[0]) < 5

    same = _sampler(_training_set(10))
    same.restore_state(state)
    assert same.data.buckets[0].order == [9, 7, 8]  # the same images: the saved order goes on


def test_a_batch_spanning_two_epochs_holds_each_image_once():
    data = _training_set(3)
    generator = torch.Generator().manual_seed(0)
    seen_per_epoch = []
    for _ in range(300):
        latents, _ = data.draw(2, generator)
        items = [int(v) for v in latents.flatten()]
        assert len(set(items)) == 2, items
        seen_per_epoch += items
    for start in range(0, 300 - 3, 3):  # every three draws of the stream cover the three images
        assert sorted(seen_per_epoch[start:start + 3]) == [0, 1, 2]
