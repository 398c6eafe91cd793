"""Noise paths: the rectified-flow path against diffusers' FlowMatch schedulers and hand computations, the VP path
against what the project had, and the refusal of schedulers with no Gaussian path (all fast)."""

import itertools
import math

import numpy
import pytest
import torch
from diffusers import (
    DDPMPipeline,
    EDMEulerScheduler,
    FlowMatchEulerDiscreteScheduler,
    FlowMatchLCMScheduler,
)

from diffkd import schedule
from diffkd.errors import DiffkdError
from diffkd.io import denoiser_of, noise_path_of
from diffkd.methods.consistency import consistency_function, dpm_solver_2s_step
from diffkd.models import Conditioning, Denoiser
from diffkd.paths import FlowPath, VPPath, flow_shift
from tests.conftest import make_scheduler, make_tiny_unet


def test_flow_alpha_sigma_by_hand():
    path = FlowPath(1000)
    alpha, sigma = path.alpha_sigma(torch.tensor([0.0, 250.0, 1000.0]))
    torch.testing.assert_close(sigma, torch.tensor([0.0, 0.25, 1.0]))
    torch.testing.assert_close(alpha, torch.tensor([1.0, 0.75, 0.0]))


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_flow_training_timesteps_are_flowmatch_schedulers_own(shift):
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)
    ours = FlowPath(1000, shift).training_timesteps()
    torch.testing.assert_close(ours, scheduler.timesteps.flip(0))
    # by hand: the least noisy is sigma = shift (1/T) / (1 + (shift - 1) / T)
    assert ours[0].item() == pytest.approx(1000 * shift * 0.001 / (1 + (shift - 1) * 0.001), rel=1e-5)


def test_velocity_to_x0_eps_by_hand():
    """u = eps - x0 on z = (1 - sigma) x0 + sigma eps: x0 = z - sigma u, eps = z + (1 - sigma) u."""
    x0, eps = torch.randn(3, 1, 4, 4), torch.randn(3, 1, 4, 4)
    sigma = torch.tensor([0.1, 0.5, 0.9])
    alpha = 1 - sigma
    z = schedule.broadcast(alpha, x0) * x0 + schedule.broadcast(sigma, x0) * eps
    u = schedule.from_x0_eps(x0, eps, alpha, sigma, "flow")
    torch.testing.assert_close(u, eps - x0)
    x0_back, eps_back = schedule.to_x0_eps(u, z, alpha, sigma, "flow")
    s = sigma.view(-1, 1, 1, 1)
    torch.testing.assert_close(x0_back, z - s * u)
    torch.testing.assert_close(eps_back, z + (1 - s) * u)
    torch.testing.assert_close(x0_back, x0, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("k", [1, 2, 4, 8])
def test_flow_grid_is_the_exported_euler_schedulers_and_nests(k):
    path = FlowPath(1000, shift=3.0)
    scheduler = path.multistep_scheduler(None, k, "flow", None)
    scheduler.set_timesteps(k)
    assert path.grid(k) == [*scheduler.timesteps.tolist(), 0.0]
    # sigma = 1, 1 - 1/k, ..., 1/k, then 0: uniform, so every step moves (diffusers' default ends on 1/T)
    assert path.grid(k) == pytest.approx([1000 * (1 - i / k) for i in range(k + 1)], abs=1e-3)
    assert path.grid(2 * k)[::2] == pytest.approx(path.grid(k), abs=1e-3)


def test_ddim_step_on_the_flow_path_is_flowmatch_euler():
    """z_s = alpha_s x0 + sigma_s eps is the Euler step z_t + (sigma_s - sigma_t) u of the exported scheduler."""
    path = FlowPath(1000)
    scheduler = path.multistep_scheduler(None, 4, "flow", None)
    scheduler.set_timesteps(4)
    model = Denoiser(make_tiny_unet().eval(), path, "flow")
    z = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    grid = path.grid(4)
    with torch.no_grad():
        for t, s in itertools.pairwise(grid):
            u = model.output(z, torch.tensor(t))
            expected = scheduler.step(u, scheduler.timesteps[grid.index(t)], z).prev_sample
            z = model.ddim_step(z, torch.tensor(t), torch.tensor(s))
            torch.testing.assert_close(z, expected, atol=1e-5, rtol=1e-5)


def test_flow_consistency_function_is_flowmatch_lcms_x0():
    """FlowMatchLCMScheduler's last step returns x0 = z - sigma u as it is: the flow student's f."""
    path = FlowPath(1000)
    model = Denoiser(make_tiny_unet().eval(), path, "flow")
    scheduler = path.consistency_scheduler(None, 50, "flow", None, 10.0)
    assert isinstance(scheduler, FlowMatchLCMScheduler)
    scheduler.set_timesteps(1)
    z = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    t = scheduler.timesteps[0]
    with torch.no_grad():
        expected = scheduler.step(model.output(z, t), t, z).prev_sample
        ours = consistency_function(model, z, t.expand(2), None, 10.0)
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=1e-5)
    c_skip, c_out = path.consistency_scalings(torch.tensor([1.0, 500.0]), 10.0)
    assert c_skip.tolist() == [0.0, 0.0] and c_out.tolist() == [1.0, 1.0]


def test_dpm_solver_2s_from_pure_noise_takes_the_r_to_1_limit():
    """At sigma = 1 (alpha = 0) lambda = -inf; r -> 1, so D = (x0_t + x0_u) / 2 and z_s = (sigma_s / sigma_t) z_t
    + alpha_s D (the DDIM form with alpha_t = 0), finite."""
    path = FlowPath(1000)
    model = Denoiser(make_tiny_unet().eval(), path, "flow")
    z = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(2))
    t, u, s = torch.full((2,), 1000.0), torch.full((2,), 900.0), torch.full((2,), 800.0)
    with torch.no_grad():
        ours = dpm_solver_2s_step(model, z, t, u, s, None)
        x0_t, _ = model.x0_eps(z, t)
        z_u = model.ddim_step(z, t, u)
        x0_u, _ = model.x0_eps(z_u, u)
    expected = 0.8 * z + 0.2 * (x0_t + x0_u) / 2
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=1e-5)


def test_dynamic_shift_is_flux_pipelines_mu():
    config = {"use_dynamic_shifting": True, "base_image_seq_len": 256, "max_image_seq_len": 4096,
              "base_shift": 0.5, "max_shift": 1.15}
    mu = 0.5 + (1.15 - 0.5) * (1024 - 256) / (4096 - 256)  # a 1024-token image (512 px Flux latents, packed)
    assert flow_shift(config, 1024) == pytest.approx(math.exp(mu))
    assert flow_shift({"shift": 3.0}, 1024) == 3.0


def test_vp_path_keeps_the_trailing_grid_and_alphas():
    scheduler = make_scheduler()
    path = VPPath(scheduler.alphas_cumprod)
    assert path.grid(4) == schedule.trailing_grid(1000, 4)
    t = torch.tensor([0, 499, 999, -1])
    torch.testing.assert_close(torch.stack(path.alpha_sigma(t)),
                               torch.stack(schedule.alpha_sigma(scheduler.alphas_cumprod, t)))
    assert path.supports_steps(4) and not path.supports_steps(3)


def test_flow_pipeline_gets_the_flow_path_and_velocity():
    pipeline = DDPMPipeline(make_tiny_unet(), FlowMatchEulerDiscreteScheduler(shift=2.0))
    denoiser = denoiser_of(pipeline)
    assert isinstance(denoiser.path, FlowPath) and denoiser.path.shift == 2.0
    assert denoiser.prediction_type == "flow"


def test_schedulers_without_a_gaussian_path_diffkd_takes_are_refused():
    with pytest.raises(DiffkdError, match="EDMEulerScheduler, which has no Gaussian path"):
        noise_path_of(EDMEulerScheduler(), "edm-teacher")
    with pytest.raises(DiffkdError, match="invert_sigmas"):
        noise_path_of(FlowMatchEulerDiscreteScheduler(invert_sigmas=True), "mochi-like")


def test_a_flow_students_step_counts_its_scheduler_cannot_sample_are_refused():
    """A 4-step flow student's FlowMatchEuler (shift_terminal 1/4) gives NaN timesteps at k = 1: refused up front."""
    from diffkd.sampling import check_scheduler_steps

    scheduler = FlowPath(1000).multistep_scheduler(None, 4, "flow", None)
    check_scheduler_steps(scheduler, [2, 4, 8], "eval.steps")
    with pytest.raises(DiffkdError, match="eval.steps has 1, .* not finite"):
        check_scheduler_steps(scheduler, [1, 4], "eval.steps")


def test_flow_consistency_scheduler_samples_log_uniform_sigmas_down_to_its_last_sigma_in_every_pipeline(tmp_path):
    """k = 1 samples sigma = 1 alone, k > 1 sigma_j = 0.5^(j / (k - 1)) (a hand computation), read back from the saved
    config as DiffusionPipeline.from_pretrained loads it, and the same when a pipeline passes its own sigmas
    (FluxPipeline passes linspace(1, 1/k, k))."""
    FlowPath(1000).consistency_scheduler(None, 50, "flow", None, 10.0).save_pretrained(tmp_path)
    loaded = FlowMatchLCMScheduler.from_pretrained(tmp_path)
    for k in (1, 2, 4, 8):
        expected = [0.5 ** (j / (k - 1)) if k > 1 else 1.0 for j in range(k)] + [0.0]
        loaded.set_timesteps(k)
        torch.testing.assert_close(loaded.sigmas, torch.tensor(expected))
        torch.testing.assert_close(loaded.timesteps, torch.tensor(expected[:-1]) * 1000)
        loaded.set_timesteps(sigmas=numpy.linspace(1.0, 1 / k, k).tolist())
        torch.testing.assert_close(loaded.sigmas, torch.tensor(expected))


def test_flow_consistency_scalings_follow_t_device_and_dtype():
    c_skip, c_out = FlowPath(1000).consistency_scalings(torch.tensor([1.0, 500.0], dtype=torch.float64), 10.0)
    assert c_skip.dtype == torch.float32 and c_skip.device == torch.device("cpu") and c_out.tolist() == [1.0, 1.0]


def test_dmd_trains_on_the_timesteps_its_exported_scheduler_samples(tmp_path):
    """A 4-step DMD2 generator on a flow teacher: with DDIM steps (FlowMatch Euler) it trains on sigma = 1, 3/4, 1/2,
    1/4; with consistency steps FlowMatchLCM samples sigma = 0.5^(j / 3), so that is its grid, and the exported
    pipeline's sample (fresh noise between steps included) is the training-time rollout."""
    from diffkd.api import prepare
    from diffkd.config import parse_config

    DDPMPipeline(make_tiny_unet(), FlowMatchEulerDiscreteScheduler()).save_pretrained(tmp_path / "flow")

    def method(multistep):
        config = parse_config({"method": {"name": "dmd", "student_steps": 4, "multistep": multistep, "num_steps": 1},
                               "teacher": {"source": str(tmp_path / "flow")}, "data": {"source": "digits"},
                               "train": {"device": "cpu"}, "run_eval": False})
        built = prepare(config)[1]
        built.check()
        return built

    assert method("ddim").grid == [1000.0, 750.0, 500.0, 250.0, 0.0]
    consistency = method("consistency")
    assert consistency.grid == pytest.approx([1000.0, 1000 * 0.5 ** (1 / 3), 1000 * 0.5 ** (2 / 3), 500.0, 0.0])
    pipe = DDPMPipeline(consistency.student, consistency.export_scheduler())
    images = pipe(batch_size=2, num_inference_steps=4, generator=torch.Generator().manual_seed(5), output_type="np")
    draws = torch.Generator().manual_seed(5)
    noise = torch.randn((2, 1, 8, 8), generator=draws)
    with torch.no_grad():
        x0 = consistency.rollout(noise, 3, Conditioning(), draws)
    expected = (x0.clamp(-1, 1) / 2 + 0.5).permute(0, 2, 3, 1).numpy()
    assert abs(images.images - expected).max() < 1e-5
