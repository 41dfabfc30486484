"""The learning-rate schedule of every stage (training/stages/networks.py ``set_lr``): warm-up, then constant or
a cosine to ``min_lr`` at the stage's last update."""

import math

import pytest
import torch

from sd35_flash.training.config import ConfigError, OptimConfig, config_from_dict
from sd35_flash.training.stages.networks import set_lr


def lrs(config: OptimConfig, total: int | None) -> list[float]:
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.0)
    out = [set_lr(optimizer, config, step, total) for step in range(10)]
    assert optimizer.param_groups[0]["lr"] == out[-1]
    return out


def test_constant_after_the_warm_up():
    assert lrs(OptimConfig(lr=1.0, warmup_steps=4), 10) == [0.25, 0.5, 0.75] + [1.0] * 7


def test_cosine_runs_from_lr_to_min_lr_at_the_last_update():
    values = lrs(OptimConfig(lr=1.0, warmup_steps=2, schedule="cosine", min_lr=0.1), 10)
    assert values[:2] == [0.5, 1.0]  # the warm-up reaches lr; the cosine starts there
    assert values[-1] == pytest.approx(0.1)
    assert values[2:] == sorted(values[2:], reverse=True)
    middle = 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 3 / 7))  # update 5 of the 8 after the warm-up
    assert values[5] == pytest.approx(middle)


def test_cosine_without_a_total_is_constant():
    assert lrs(OptimConfig(lr=1.0, schedule="cosine"), None) == [1.0] * 10


def test_a_bad_schedule_is_named():
    with pytest.raises(ConfigError, match="teacher.optim.schedule"):
        config_from_dict({"teacher": {"optim": {"schedule": "linear"}}})
    with pytest.raises(ConfigError, match="dmd.optim.min_lr"):
        config_from_dict({"dmd": {"optim": {"min_lr": -1.0}}})
