"""The fine-tune's learning-rate schedules: `lr_factor` against the formula written out, the optimizer that
`make_optimizer` builds, and the checks of `TrainConfig`."""

from __future__ import annotations

import re

import pytest
import torch

from tp_loraprune.train import TrainConfig, lr_factor, make_optimizer


def _reference(step: int, total: int, warmup: int, schedule: str, decay: int) -> float:
    """The schedules as a user would describe them, one branch per phase."""
    if step < warmup:
        peak_share = (step + 1) / warmup
    else:
        peak_share = 1.0
    if schedule == "linear":
        return peak_share * (1 - step / total) + 1e-3
    if step < total - decay:  # wsd: stable
        return peak_share + 1e-3
    return peak_share * (total - step) / decay + 1e-3  # wsd: decay


@pytest.mark.parametrize("schedule", ["linear", "wsd"])
@pytest.mark.parametrize("total, warmup, decay", [(100, 3, 10), (40, 1, 40), (12, 4, 5)])
def test_lr_factor_is_the_written_out_schedule(schedule, total, warmup, decay):
    for step in range(total + 1):
        expected = _reference(step, total, warmup, schedule, decay)
        assert lr_factor(step, total, warmup, schedule, decay) == pytest.approx(expected), step


def test_wsd_holds_the_peak_until_the_decay_and_ends_at_the_floor():
    factors = [lr_factor(s, 100, 3, "wsd", 10) for s in range(101)]
    assert factors[3:90] == [pytest.approx(1.001)] * 87
    assert factors[90] == pytest.approx(1.001) and factors[95] == pytest.approx(0.501)
    assert factors[100] == pytest.approx(1e-3)
    linear = [lr_factor(s, 100, 3, "linear", 10) for s in range(101)]
    assert sum(factors) > 1.8 * sum(linear)  # the point of it: about twice the learning-rate mass


@pytest.mark.parametrize("schedule, decay_ratio", [("linear", 0.1), ("wsd", 0.1), ("wsd", 0.3)])
def test_make_optimizer_follows_the_schedule(schedule, decay_ratio):
    model = torch.nn.Linear(4, 4)
    train = TrainConfig(lr=1e-2, lr_schedule=schedule, decay_ratio=decay_ratio)
    optimizer, scheduler = make_optimizer(model, train, total_steps=20)
    decay = round(decay_ratio * 20)
    for step in range(20):
        assert optimizer.param_groups[0]["lr"] == pytest.approx(1e-2 * lr_factor(step, 20, 1, schedule, decay))
        optimizer.step()
        scheduler.step()


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"lr_schedule": "cosine"}, "`lr_schedule` must be one of ('linear', 'wsd'), got 'cosine'"),
        ({"decay_ratio": 0.0}, "`decay_ratio` is the fraction"),
        ({"lr_schedule": "wsd", "decay_ratio": 0.99}, "1 - warmup_ratio = 0.97]; got 0.99"),
    ],
)
def test_train_config_refuses_a_bad_schedule(kwargs, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        TrainConfig(**kwargs)


def test_decay_ratio_only_bounds_the_warmup_under_wsd():
    TrainConfig(warmup_ratio=0.95)  # linear: the decay ratio is not used, so the default does not get in the way
    with pytest.raises(ValueError, match=re.escape("1 - warmup_ratio = 0.05]; got 0.1")):
        TrainConfig(warmup_ratio=0.95, lr_schedule="wsd")
