"""Sampling loops over a ``Denoiser`` from given noise, so that every comparison can use the same noise.

``ddim_sample`` is the exact trailing-grid DDIM that the progressive method distils and that exported students
run; ``scheduler_sample`` drives any diffusers scheduler (DPM-Solver++, UniPC, ...) for training-free baselines.
"""

from __future__ import annotations

import itertools

import torch

from diffkd import schedule
from diffkd.models import Conditioning, Denoiser


@torch.no_grad()
def ddim_sample(model: Denoiser, noise: torch.Tensor, num_steps: int, cond: Conditioning | None = None,
                grid: list[int] | None = None) -> torch.Tensor:
    """Deterministic DDIM on the trailing grid (or on ``grid``), ending on the clean sample."""
    grid = grid or schedule.trailing_grid(model.num_train_timesteps, num_steps)
    z = noise.float()
    for t, s in itertools.pairwise(grid):
        z = model.ddim_step(z, torch.tensor(t, device=z.device), torch.tensor(s, device=z.device), cond)
    return z


@torch.no_grad()
def scheduler_sample(model: Denoiser, scheduler, noise: torch.Tensor, num_steps: int,
                     cond: Conditioning | None = None) -> torch.Tensor:
    """Sample with a diffusers scheduler whose ``prediction_type`` matches the model's.

    The scheduler is configured in place (``set_timesteps``); pass a fresh one per call for multistep solvers.
    """
    if scheduler.config.prediction_type != model.prediction_type:
        raise ValueError(f"scheduler predicts {scheduler.config.prediction_type!r} but the model predicts "
                         f"{model.prediction_type!r}: build the scheduler with prediction_type="
                         f"{model.prediction_type!r}")
    scheduler.set_timesteps(num_steps, device=noise.device)
    z = noise.float() * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        out = model.output(scheduler.scale_model_input(z, t), t.reshape(()).to(noise.device), cond)
        z = scheduler.step(out.float(), t, z).prev_sample
    return z
