from fractions import Fraction

import pytest
import torch

from diffkd import schedule
from diffkd.models import Denoiser
from tests.conftest import make_scheduler, make_tiny_unet


def test_trailing_grid_golden_and_nested():
    assert schedule.trailing_grid(1000, 4) == [999, 749, 499, 249, -1]
    assert schedule.trailing_grid(1000, 64)[::2] == schedule.trailing_grid(1000, 32)


def student_method(name: str, k: int):
    """A progressive or generator method whose student samples in k steps, on a stub teacher (nothing runs)."""
    from types import SimpleNamespace

    from diffkd.config import parse_config
    from diffkd.io import LoadedPipeline
    from diffkd.methods import method_class

    scheduler = make_scheduler()
    unet = make_tiny_unet()
    teacher = LoadedPipeline("stub", SimpleNamespace(unet=unet, scheduler=scheduler),
                             Denoiser(unet, scheduler.alphas_cumprod, "v_prediction"))
    method = {"progressive": {"final_steps": k, "start_steps": 2 * k}, "generator": {"student_steps": k}}[name]
    config = parse_config({"method": {"name": name, **method}, "teacher": {"source": "stub"},
                           "train": {"device": "cpu"}, "run_eval": False})
    return method_class(name)(config, teacher, unet)


@pytest.mark.parametrize("name", ["progressive", "generator"])
def test_every_student_grid_from_1_to_64_is_diffusers_or_refused(name):
    """A k-step student is exported with a trailing DDIMScheduler, which steps t -> t - T // k: it reproduces the
    student's trailing grid only when k divides T. Every k from 1 to 64 that the method accepts must match
    diffusers' timesteps and steps exactly; every other k must be refused before any work."""
    from diffkd.errors import DiffkdError

    sched = make_scheduler()
    accepted = []
    for k in range(1, 65):
        method = student_method(name, k)
        if 1000 % k:
            with pytest.raises(DiffkdError, match=f"={k} does not divide"):
                method.check()
            continue
        method.check()
        accepted.append(k)
        grid = schedule.trailing_grid(1000, k)
        sched.set_timesteps(k)
        assert grid[:-1] == sched.timesteps.tolist(), k
        assert [t - 1000 // k for t in grid[:-1]] == grid[1:], k  # DDIMScheduler.step's previous timestep
    assert accepted == [1, 2, 4, 5, 8, 10, 20, 25, 40, 50]


def test_every_grid_from_1_to_64_is_the_rounded_closed_form():
    """Teacher grids (start_steps 16, 32, 64) and the sweep's own DDIM take any k, not only divisors of T:
    t_i = round(T - i T / k) - 1, ties to even as np.round, computed here in exact fractions. diffusers'
    DDIMScheduler.set_timesteps agrees except where its float np.arange misrounds a tie (k = 48: 937.5 -> 936) or
    overshoots to a 62nd timestep, -1 (k = 61); neither k can be a student's (they do not divide T)."""
    sched = make_scheduler()
    for k in range(1, 65):
        exact = [round(Fraction(1000) - Fraction(1000 * i, k)) - 1 for i in range(k + 1)]
        assert schedule.trailing_grid(1000, k) == exact, k
        sched.set_timesteps(k)
        assert (sched.timesteps.tolist() == exact[:-1]) == (k not in (48, 61)), k


def test_teacher_grids_nest_for_every_accepted_student():
    """A halving needs the teacher's 2k grid to contain the student's k grid: trailing_grid(T, 2k)[::2]."""
    for k in (1, 2, 4, 5, 8, 10, 20, 25, 40, 50):
        m = k
        while 2 * m <= 1000:
            assert schedule.trailing_grid(1000, 2 * m)[::2] == schedule.trailing_grid(1000, m), (k, m)
            m *= 2


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])  # DDIMScheduler's; flow: test_paths
@pytest.mark.parametrize("clip", [False, True])
def test_ddim_step_equals_diffusers(prediction_type, clip):
    sched = make_scheduler(prediction_type, clip_sample=clip)
    sched.set_timesteps(4)
    acp = sched.alphas_cumprod
    torch.manual_seed(0)
    z = torch.randn(3, 1, 8, 8) * 2
    for t, s in zip(schedule.trailing_grid(1000, 4)[:-1], schedule.trailing_grid(1000, 4)[1:]):
        out = torch.randn_like(z)
        expected = sched.step(out, t, z).prev_sample
        x0, eps = schedule.to_x0_eps(out, z, *schedule.alpha_sigma(acp, torch.tensor(t)), prediction_type)
        ours = schedule.ddim_step(x0, eps, *schedule.alpha_sigma(acp, torch.tensor(s)), 1.0 if clip else None)
        torch.testing.assert_close(ours, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("prediction_type", schedule.PREDICTION_TYPES)
def test_parameterisations_round_trip(prediction_type):
    acp = make_scheduler().alphas_cumprod
    alpha, sigma = schedule.alpha_sigma(acp, torch.tensor([10, 500, 990]))
    x0, eps = torch.randn(3, 1, 4, 4), torch.randn(3, 1, 4, 4)
    z = schedule.broadcast(alpha, x0) * x0 + schedule.broadcast(sigma, x0) * eps
    out = schedule.from_x0_eps(x0, eps, alpha, sigma, prediction_type)
    x0_back, eps_back = schedule.to_x0_eps(out, z, alpha, sigma, prediction_type)
    torch.testing.assert_close(x0_back, x0, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(eps_back, eps, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("prediction_type", schedule.PREDICTION_TYPES)
def test_progressive_target_reproduces_two_teacher_steps(prediction_type):
    """One student DDIM step with x_tilde from z_t must land on the teacher's two-step z_t''."""
    acp = make_scheduler().alphas_cumprod
    teacher = Denoiser(make_tiny_unet().eval(), acp, prediction_type)
    grid = schedule.trailing_grid(1000, 4)
    torch.manual_seed(1)
    z_t = torch.randn(2, 1, 8, 8)
    for i in range(4):  # every student step of a 4-step student, the last one ending on the clean sample
        t, t1, t2 = (torch.tensor(v) for v in (grid[i], schedule.trailing_grid(1000, 8)[2 * i + 1], grid[i + 1]))
        with torch.no_grad():
            z_teacher = teacher.ddim_step(teacher.ddim_step(z_t, t, t1), t1, t2)
        (a_t, s_t), (a_s, s_s) = schedule.alpha_sigma(acp, t), schedule.alpha_sigma(acp, t2)
        x_tilde = schedule.progressive_target(z_t, z_teacher, a_t, s_t, a_s, s_s)
        eps_tilde = (z_t - a_t * x_tilde) / s_t
        torch.testing.assert_close(schedule.ddim_step(x_tilde, eps_tilde, a_s, s_s), z_teacher, atol=1e-5, rtol=1e-5)


def test_progressive_target_golden_number():
    """A hand computation: z_t=1, z_s=0.5, (a_t, s_t)=(0.6, 0.8), (a_s, s_s)=(0.8, 0.6).

    ratio = 0.6/0.8 = 0.75; x = (0.5 - 0.75*1) / (0.8 - 0.75*0.6) = -0.25 / 0.35.
    """
    one = torch.ones(1, 1, 1, 1)
    x = schedule.progressive_target(one, 0.5 * one, torch.tensor(0.6), torch.tensor(0.8), torch.tensor(0.8),
                                    torch.tensor(0.6))
    assert x.item() == pytest.approx(-0.25 / 0.35, rel=1e-6)


def test_loss_weights():
    s = torch.tensor([0.25, 1.0, 9.0])
    assert schedule.loss_weight(s, "snr_trunc").tolist() == [1.0, 1.0, 9.0]
    assert schedule.loss_weight(s, "min_snr").tolist() == [0.25, 1.0, 5.0]
    assert schedule.loss_weight(s, "snr").tolist() == s.tolist()
    with pytest.raises(ValueError, match="snr_trunc"):
        schedule.loss_weight(s, "bogus")
