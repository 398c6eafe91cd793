"""The progressive-distillation loss (Salimans & Ho 2022, Alg. 2) against a hand computation, fast.

Teacher and student are stub networks with a known, t-dependent output, so every number of the loss (the grid
points, the teacher's two DDIM steps t -> t' -> t'', the one-step target x_tilde and the SNR weighting) is
recomputed here from the schedule's alphas_cumprod with plain arithmetic, not with ``diffkd.schedule``.
"""

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from diffkd.config import parse_config
from diffkd.io import LoadedPipeline
from diffkd.methods.progressive import ProgressiveDistillation
from diffkd.models import Denoiser
from tests.conftest import make_scheduler

# trailing grids for T = 1000 (Lin et al. 2023, Table 2), written out: the 4-step student's and the 8-step teacher's
GRID_4 = [999, 749, 499, 249, -1]
GRID_8 = [999, 874, 749, 624, 499, 374, 249, 124, -1]


class StubNet(nn.Module):
    """output = z * (scale + t / 1000) + shift: a network whose output depends on both z and t, so a step taken at
    the wrong t, or in the wrong order, changes the result."""

    def __init__(self, scale: float, shift: float):
        super().__init__()
        self.scale, self.shift = scale, shift

    def forward(self, z, t, **_):
        coef = self.scale + t.float().reshape(-1, 1, 1, 1) / 1000
        return SimpleNamespace(sample=z * coef + self.shift)


def alpha_sigma(abar: torch.Tensor, t: int) -> tuple[float, float]:
    a = 1.0 if t < 0 else float(abar[t])
    return a ** 0.5, (1 - a) ** 0.5


def x0_eps(out: torch.Tensor, z: torch.Tensor, a: float, s: float, kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Salimans & Ho eq. 31 and its eps / x counterparts, one sample at a time."""
    if kind == "epsilon":
        return (z - s * out) / a, out
    if kind == "v_prediction":
        return a * z - s * out, a * out + s * z
    return out, (z - a * out) / s


def hand_loss(x, eps, index, teacher, student, abar, teacher_kind, student_kind, weighting):
    losses = []
    for b in range(x.shape[0]):
        i = int(index[b])
        t, t1, t2 = GRID_4[i], GRID_8[2 * i + 1], GRID_8[2 * i + 2]
        assert t2 == GRID_4[i + 1]
        a_t, s_t = alpha_sigma(abar, t)
        z_t = a_t * x[b] + s_t * eps[b]
        z = z_t
        for u, w in ((t, t1), (t1, t2)):  # the teacher's two DDIM steps, in this order
            a_u, s_u = alpha_sigma(abar, u)
            out = teacher(z[None], torch.tensor([u])).sample[0]
            x_hat, e_hat = x0_eps(out, z, a_u, s_u, teacher_kind)
            x_hat = x_hat.clamp(-1, 1)  # the teacher's clip_sample, on x only (as DDIMScheduler.step)
            a_w, s_w = alpha_sigma(abar, w)
            z = a_w * x_hat + s_w * e_hat
        a_s, s_s = alpha_sigma(abar, t2)
        x_target = (z - s_s / s_t * z_t) / (a_s - s_s / s_t * a_t)
        out = student(z_t[None], torch.tensor([t])).sample[0]
        x_pred, _ = x0_eps(out, z_t, a_t, s_t, student_kind)
        snr = a_t ** 2 / s_t ** 2
        weight = {"snr_trunc": max(snr, 1.0), "snr": snr, "constant": 1.0, "min_snr": min(snr, 5.0)}[weighting]
        if teacher_kind == "epsilon":  # target_space auto: an eps teacher's rounds are measured where z_s lands
            weight = weight * (a_s - s_s * a_t / s_t) ** 2
        losses.append(weight * (x_pred - x_target).pow(2).mean())
    return torch.stack(losses).mean()


def progressive_method(teacher_kind: str, student_kind: str, weighting: str, **method):
    scheduler = make_scheduler(teacher_kind)
    teacher_net = StubNet(0.3, 0.1).requires_grad_(False)
    teacher = LoadedPipeline("stub", SimpleNamespace(unet=teacher_net, scheduler=scheduler),
                             Denoiser(teacher_net, scheduler.alphas_cumprod, teacher_kind, clip_sample=1.0))
    config = parse_config({"method": {"name": "progressive", "start_steps": 8, "final_steps": 4,
                                      "loss_weighting": weighting, "student_prediction_type": student_kind, **method},
                           "teacher": {"source": "stub"}, "train": {"device": "cpu"}, "run_eval": False})
    return ProgressiveDistillation(config, teacher, StubNet(-0.2, 0.05)), scheduler.alphas_cumprod


@pytest.mark.parametrize("teacher_kind", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("weighting", ["snr_trunc", "snr", "constant", "min_snr"])
def test_halving_loss_equals_the_hand_computation(teacher_kind, weighting):
    method, abar = progressive_method(teacher_kind, "v_prediction", weighting)
    torch.manual_seed(0)
    x = torch.rand(16, 1, 2, 2) * 2 - 1
    draws = torch.Generator().manual_seed(7)
    index = torch.randint(0, 4, (16,), generator=draws)  # the method draws i, then eps, from its generator
    eps = torch.randn(x.shape, generator=draws)
    assert set(index.tolist()) == {0, 1, 2, 3}  # every student step, the clean end point included
    loss = method.loss("student", {"x0": x}, torch.Generator().manual_seed(7)).terms["distill"]
    expected = hand_loss(x, eps, index, method.round_teacher.unet, method.student, abar, teacher_kind,
                         "v_prediction", weighting)
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("student_kind", ["epsilon", "sample", "teacher"])
def test_the_students_parameterisation_is_how_its_output_becomes_x(student_kind):
    method, abar = progressive_method("epsilon", student_kind, "snr_trunc")
    x = torch.linspace(-1, 1, 32).reshape(8, 1, 2, 2)
    draws = torch.Generator().manual_seed(3)
    index = torch.randint(0, 4, (8,), generator=draws)
    eps = torch.randn(x.shape, generator=draws)
    loss = method.loss("student", {"x0": x}, torch.Generator().manual_seed(3)).terms["distill"]
    kind = "epsilon" if student_kind == "teacher" else student_kind
    expected = hand_loss(x, eps, index, method.round_teacher.unet, method.student, abar, "epsilon", kind,
                         "snr_trunc")
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)


def test_the_weighting_changes_the_loss():
    """Guards the test above against a batch on which the weightings happen to coincide."""
    x = torch.rand(16, 1, 2, 2) * 2 - 1
    values = {w: progressive_method("epsilon", "v_prediction", w)[0].loss(
        "student", {"x0": x}, torch.Generator().manual_seed(7)).total.item()
        for w in ("snr_trunc", "constant", "min_snr")}
    assert len({round(v, 6) for v in values.values()}) == 3, values
