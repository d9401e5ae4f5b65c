"""Learning-rate schedules: warmup, then the named decay, as a function of the global step."""
import math

import pytest

from loralab.sampler.schedules import SCHEDULERS, check_schedule, lr_factor


def test_constant_is_one_everywhere_and_warmup_ramps_up_to_it():
    assert [lr_factor(s, 10) for s in range(10)] == [1.0] * 10
    assert [lr_factor(s, 10, "constant", warmup=4) for s in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]


def test_linear_and_cosine_decay_over_the_steps_after_warmup():
    # 2 warmup steps, then 8 steps of decay: the k-th of them (0-based) is at progress k/8
    linear = [lr_factor(s, 10, "linear", warmup=2) for s in range(10)]
    assert linear[:2] == [0.5, 1.0]
    assert linear[2:] == pytest.approx([1 - k / 8 for k in range(8)])
    cosine = [lr_factor(s, 10, "cosine", warmup=2) for s in range(2, 10)]
    assert cosine == pytest.approx([(1 + math.cos(math.pi * k / 8)) / 2 for k in range(8)])
    assert cosine[4] == pytest.approx(0.5) and 0 < cosine[-1] < 0.05  # half way: half the rate; never 0


def test_restarts_and_polynomial():
    restarts = [lr_factor(s, 8, "cosine_with_restarts", cycles=2) for s in range(8)]
    assert restarts[0] == restarts[4] == 1.0  # each of the two cycles starts at the full rate
    assert restarts[2] == pytest.approx(0.5) and restarts[3] < restarts[2]
    assert lr_factor(5, 10, "polynomial", power=2.0) == pytest.approx(0.25)
    assert lr_factor(5, 10, "polynomial", power=1.0) == pytest.approx(lr_factor(5, 10, "linear"))


@pytest.mark.parametrize("kind", SCHEDULERS)
def test_a_run_resumed_at_any_step_follows_the_same_curve(kind):
    whole = [lr_factor(s, 12, kind, warmup=3, cycles=2, power=2.0) for s in range(12)]
    assert all(0 < f <= 1 for f in whole)  # no step trains at rate 0
    resumed = [lr_factor(s, 12, kind, warmup=3, cycles=2, power=2.0) for s in range(5, 12)]
    assert resumed == whole[5:]


@pytest.mark.parametrize("args,name", [(("nope", 0, 1, 1.0), "lr_scheduler"), (("cosine", -1, 1, 1.0), "lr_warmup_steps"),
                                       (("cosine", 0, 0, 1.0), "lr_scheduler_num_cycles"),
                                       (("polynomial", 0, 1, 0.0), "lr_scheduler_power")])
def test_bad_settings_name_their_input(args, name):
    with pytest.raises(ValueError, match=name):
        check_schedule(*args)
