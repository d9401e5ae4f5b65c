"""TrainSampler's resumable state on a stand-in model: fp16 runs save and restore their loss scale,
a state made on other images continues with a fresh order instead of failing, a batch that
spans two epochs never holds an image twice, and an epoch shows every image once across buckets."""
from __future__ import annotations

import logging
from types import SimpleNamespace

import pytest
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


def _distinct_buckets(*bucket_sizes: int) -> TrainingSet:
    """Buckets whose latents number the images 0..n-1 across all buckets."""
    data = TrainingSet.__new__(TrainingSet)
    data.buckets, start = [], 0
    for n in bucket_sizes:
        data.buckets.append(Bucket(torch.arange(start, start + n, dtype=torch.float32).view(n, 1, 1, 1), {}))
        start += n
    data.size = start
    return data


@pytest.mark.parametrize("batch_size", [1, 2, 4])
def test_every_epoch_shows_each_image_once_across_buckets(batch_size):
    """With buckets of 3, 2 and 1 images, each run of six images drawn is the whole set: no image
    repeats and none is skipped before the epoch ends, whichever bucket a batch comes from."""
    for seed in range(20):
        data, generator, stream = _distinct_buckets(3, 2, 1), torch.Generator().manual_seed(seed), []
        while len(stream) < 60:
            items = [int(v) for v in data.draw(batch_size, generator)[0].flatten()]
            assert len(set(items)) == len(items), items
            stream += items
        for start in range(0, 60, 6):
            assert sorted(stream[start:start + 6]) == list(range(6)), (seed, batch_size, stream[:start + 6])


def test_images_of_a_bucket_smaller_than_the_batch_are_drawn_as_often_as_the_others():
    data, generator, counts = _distinct_buckets(8, 2), torch.Generator().manual_seed(0), torch.zeros(10)
    for _ in range(300):
        for v in data.draw(4, generator)[0].flatten():
            counts[int(v)] += 1
    assert counts.max() - counts.min() <= 1, counts  # whole epochs, plus the one that is under way


def _adamw_sampler(size: int) -> TrainSampler:
    """A sampler whose one parameter has AdamW moments (one step taken)."""
    weight = torch.nn.Parameter(torch.zeros(size))
    patcher = SimpleNamespace(load_device=torch.device("cpu"))
    sampler = TrainSampler(patcher, [("layer:lora_up", weight)], _training_set(4), TrainConfig(optimizer="AdamW"))
    weight.grad = torch.ones(size)
    sampler.optimizer.step()
    return sampler


def test_a_state_of_another_rank_under_the_same_names_is_refused_before_anything_loads():
    """A sidecar left beside a replaced file: same layer names, other shapes. Loading its moments
    would make the fused optimizer read out of bounds (a crash of the whole server)."""
    state = _adamw_sampler(3).capture_state({})
    other = _adamw_sampler(5)
    rng = other.generator.get_state()
    with pytest.raises(ValueError, match="shape"):
        other.restore_state(state)
    assert torch.equal(other.generator.get_state(), rng)
    assert other.optimizer.state_dict()["state"][0]["exp_avg"].shape == (5,)
