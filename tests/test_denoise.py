"""The teacher-training loss of ``denoise`` (Ho et al. 2020; v-prediction, Salimans & Ho 2022 eq. 31) against a
hand computation for each prediction type, fast: a stub student with a known output, the schedule's alphas_cumprod
from diffusers, and plain arithmetic."""

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from diffkd.config import parse_config
from diffkd.io import LoadedPipeline
from diffkd.methods.denoise import DenoisingTraining
from diffkd.models import Denoiser
from tests.conftest import make_scheduler


class StubNet(nn.Module):
    """output = 0.5 * z - t / 2000: known at every (z, t)."""

    def forward(self, z, t, **_):
        return SimpleNamespace(sample=0.5 * z - t.float().reshape(-1, 1, 1, 1) / 2000)


def denoise_method(kind: str) -> DenoisingTraining:
    scheduler = make_scheduler(kind)
    net = StubNet()
    template = LoadedPipeline("new", SimpleNamespace(unet=net, scheduler=scheduler),
                              Denoiser(net, scheduler.alphas_cumprod, kind))
    config = parse_config({"method": {"name": "denoise", "prediction_type": kind}, "train": {"device": "cpu"},
                           "run_eval": False})
    return DenoisingTraining(config, template, net)


@pytest.mark.parametrize("kind", ["epsilon", "v_prediction", "sample"])
def test_denoise_loss_regresses_the_parameterisations_own_target(kind):
    method = denoise_method(kind)
    abar = make_scheduler(kind).alphas_cumprod
    x = torch.linspace(-1, 1, 24).reshape(6, 1, 2, 2)
    draws = torch.Generator().manual_seed(5)
    t = torch.randint(0, 1000, (6,), generator=draws)  # the method draws t, then eps, from its generator
    eps = torch.randn(x.shape, generator=draws)
    a, s = abar[t].sqrt().reshape(-1, 1, 1, 1), (1 - abar[t]).sqrt().reshape(-1, 1, 1, 1)
    z = a * x + s * eps
    target = {"epsilon": eps, "v_prediction": a * eps - s * x, "sample": x}[kind]
    expected = (0.5 * z - t.float().reshape(-1, 1, 1, 1) / 2000 - target).pow(2).mean()
    loss = method.loss("student", {"x0": x}, torch.Generator().manual_seed(5)).terms["denoise"]
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-7)


def test_the_three_targets_differ_on_this_batch():
    """Guards the test above: on its batch, regressing one parameterisation's target onto another's changes the
    loss."""
    x = torch.linspace(-1, 1, 24).reshape(6, 1, 2, 2)
    losses = [denoise_method(kind).loss("student", {"x0": x}, torch.Generator().manual_seed(5)).total.item()
              for kind in ("epsilon", "v_prediction", "sample")]
    assert min(abs(a - b) for a, b in zip(losses, losses[1:] + losses[:1])) > 1e-2, losses
