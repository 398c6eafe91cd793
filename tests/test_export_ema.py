"""The exported weights' EMA: the averages that train.ema_* promise, against a hand computation."""

import pytest
import torch
from torch import nn

from diffkd.config import TrainConfig
from diffkd.trainer import export_ema


def _averaged(train: TrainConfig, values: list[float]) -> float:
    """The EMA's shadow after the parameter has taken ``values``, one per optimiser step."""
    parameter = nn.Parameter(torch.zeros(()))
    ema = export_ema([parameter], train)
    for value in values:
        parameter.data.fill_(value)
        ema.step([parameter])
    return float(ema.shadow_params[0])


VALUES = [float(v) for v in range(1, 201)]


def test_power_one_and_inv_gamma_one_average_the_whole_run_uniformly():
    train = TrainConfig(ema_decay=0.9999, ema_warmup=True, ema_inv_gamma=1.0, ema_power=1.0)
    assert _averaged(train, VALUES) == pytest.approx(sum(VALUES) / len(VALUES), rel=1e-4)  # 100.5


def test_inv_gamma_two_weights_each_step_by_its_index():
    """EDM2's power-function profile with exponent 1: the decay at update n is (n - 1) / (n + 1), so
    n (n + 1) shadow_n = (n - 1) n shadow_(n-1) + 2 n v_n and the shadow is sum(t v_t) / sum(t)."""
    train = TrainConfig(ema_decay=0.9999, ema_warmup=True, ema_inv_gamma=2.0, ema_power=1.0)
    weights = range(1, len(VALUES) + 1)
    expected = sum(w * v for w, v in zip(weights, VALUES)) / sum(weights)
    assert _averaged(train, VALUES) == pytest.approx(expected, rel=1e-4)


def test_fixed_decay_keeps_diffusers_short_warm_up():
    """Without ema_warmup the decay is min(ema_decay, (1 + t) / (10 + t)): after 200 steps of a ramp the shadow
    trails the last value by about a tenth of the run, far from the run's mean."""
    shadow = _averaged(TrainConfig(ema_decay=0.999), VALUES)
    assert 175 < shadow < 190
