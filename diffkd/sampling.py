"""The one home of teacher sampling: sampling loops over a ``Denoiser`` from given noise, the training-free samplers
a teacher is swept with, and ``teacher_sample``, which the teacher-sample cache and the evaluation sweep both call.

``ddim_sample`` is the exact trailing-grid DDIM that the progressive method distils and that exported students
run; ``scheduler_sample`` drives any diffusers scheduler (DPM-Solver++, UniPC, ...) for training-free baselines.
Every loop starts from noise the caller gives, so that every comparison can use the same noise.

The samplers (``SAMPLERS``) are configured as their users would configure them for that teacher. DDIM is diffkd's exact one (``ddim_sample``), not diffusers' ``DDIMScheduler``: that steps t -> t - T//k, which
leaves the trailing grid when k does not divide T, and at k = 64 of T = 1000 its last step lands on t = 0 instead
of the clean sample (on the digits teacher: FD 19.5 against 15.5 for the exact grid, same noise, measured
2026-11-23). For the k that divide T (1, 2, 4, 8, ...) the two agree exactly.

All use trailing timestep spacing (Lin et al. 2023): with few steps it is the only spacing that starts from pure
noise, and it is the grid diffkd students run, so the comparison at equal k is like for like. A pixel-space teacher
whose scheduler clips x0 (``clip_sample``) has DDIM clip and DPM-Solver++/UniPC threshold x0 at the same range
(with ``sample_max_value`` = the clip range dynamic thresholding is that clip); without it both collapse at 4-8 steps
on a cosine-schedule teacher. Latent teachers get neither. An epsilon teacher that does not clip (google/ddpm-*,
linear betas; teachers/digits-eps-16) gets no clip and no thresholding, as its users run it: thresholding is a
choice its own scheduler config did not make. Both solvers are second order and end on sigma = 0.
UniPC keeps diffusers' default B(h) = bh2: its authors suggest bh1 for unconditional sampling below 10 steps, but
with a zero final sigma bh1 divides by an infinite step (NaN), and with ``sigma_min`` it was worse than bh2 on the
digits teacher (PSNR to DDIM-64 at 4 steps 21.8 vs 26.5 dB, measured 2026-11-22).
"""

from __future__ import annotations

import hashlib
import inspect
import itertools

import torch
from diffusers import (
    DPMSolverMultistepScheduler,
    FlowMatchHeunDiscreteScheduler,
    HeunDiscreteScheduler,
    UniPCMultistepScheduler,
)

from diffkd.errors import DiffkdError
from diffkd.io import LoadedPipeline
from diffkd.models import Conditioning, Denoiser
from diffkd.paths import flow_shift, is_flow_scheduler
from diffkd.validation import SAMPLERS

__all__ = ["SAMPLERS", "ddim_sample", "make_scheduler", "noise_generator", "sampler_settings", "scheduler_sample", "teacher_sample"]


@torch.no_grad()
def ddim_sample(model: Denoiser, noise: torch.Tensor, num_steps: int, cond: Conditioning | None = None,
                grid: list[int] | None = None) -> torch.Tensor:
    """Deterministic DDIM on the path's k-step grid (or on ``grid``), ending on the clean sample: the trailing grid
    of a VP path; on a rectified-flow path DDIM is the Euler step z_s = z_t + (sigma_s - sigma_t) v."""
    grid = grid or model.path.grid(num_steps)
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
    predicts = scheduler_prediction_type(scheduler)
    if predicts != model.prediction_type:
        raise ValueError(f"scheduler predicts {predicts!r} but the model predicts {model.prediction_type!r}: build "
                         f"the scheduler with prediction_type={model.prediction_type!r}")
    scheduler.set_timesteps(num_steps, device=noise.device)
    z = noise.float() * getattr(scheduler, "init_noise_sigma", 1.0)  # the FlowMatch schedulers have none: 1
    extra = {"generator": noise_generator(noise)} if "generator" in inspect.signature(scheduler.step).parameters else {}
    scale = getattr(scheduler, "scale_model_input", lambda sample, timestep: sample)
    for t in scheduler.timesteps:
        out = model.output(scale(z, t), t.reshape(()).to(noise.device), cond)
        z = scheduler.step(out.float(), t, z, **extra).prev_sample
    return z


def scheduler_prediction_type(scheduler) -> str:
    """A scheduler's parameterisation in diffkd's names: the FlowMatch schedulers (and DPM-Solver/UniPC's
    'flow_prediction') take the rectified-flow velocity, 'flow'."""
    predicts = scheduler.config.get("prediction_type", "flow" if is_flow_scheduler(scheduler) else "epsilon")
    return "flow" if predicts == "flow_prediction" else predicts


def noise_generator(noise: torch.Tensor) -> torch.Generator:
    """A generator seeded by the starting noise itself: a scheduler that draws fresh noise between steps
    (LCMScheduler's multistep consistency sampling) then gives the same sample for the same noise, in any order."""
    digest = hashlib.blake2b(noise.detach().cpu().float().numpy().tobytes(), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest, "little") >> 1)


def sampler_settings(name: str, teacher_scheduler, latent: bool) -> dict:
    """The scheduler class name and config overrides of sampler ``name`` for this teacher (for the protocol)."""
    teacher_config = dict(teacher_scheduler.config)
    if is_flow_scheduler(teacher_scheduler):
        return _flow_sampler_settings(name, teacher_config)
    clip = bool(teacher_config.get("clip_sample", False)) and not latent
    clip_range = float(teacher_config.get("clip_sample_range", 1.0))
    common = {"timestep_spacing": "trailing", "prediction_type": teacher_config.get("prediction_type", "epsilon")}
    if name == "ddim":
        return {"class": "diffkd.sampling.ddim_sample", **common, "grid": "exact: each step to the next grid point, "
                "the last to the clean sample", "clip_sample": clip, "clip_sample_range": clip_range}
    if name == "heun":
        return {"class": "HeunDiscreteScheduler", **common}
    return _second_order(name, {**common, "thresholding": clip, "sample_max_value": clip_range,
                                "dynamic_thresholding_ratio": 0.995})


def _flow_sampler_settings(name: str, teacher_config: dict) -> dict:
    """A rectified-flow teacher's samplers as SD3/Flux users run them: the Euler step on sigma = 1, 1 - 1/k, ...,
    1/k (FluxPipeline's grid; ``ddim`` is that step on this path), FlowMatch Heun with the teacher's shift, and
    DPM-Solver++ / UniPC on flow sigmas (``use_flow_sigmas``, ``flow_shift`` = the teacher's shift)."""
    shift = flow_shift({**teacher_config, "use_dynamic_shifting": False}, None)
    if name == "ddim":
        return {"class": "diffkd.sampling.ddim_sample", "grid": "exact Euler on sigma = 1, 1 - 1/k, ..., 1/k, 0",
                "prediction_type": "flow"}
    if name == "heun":
        return {"class": "FlowMatchHeunDiscreteScheduler", "shift": shift}
    return _second_order(name, {"prediction_type": "flow_prediction", "use_flow_sigmas": True, "flow_shift": shift})


def _second_order(name: str, settings: dict) -> dict:
    """DPM-Solver++(2M) or UniPC (bh2) with ``settings``: second order, first order on the last step, ending on
    sigma = 0."""
    solver = {**settings, "solver_order": 2, "lower_order_final": True, "final_sigmas_type": "zero"}
    if name == "dpmsolver++":
        return {"class": "DPMSolverMultistepScheduler", **solver, "algorithm_type": "dpmsolver++",
                "solver_type": "midpoint"}
    if name == "unipc":
        return {"class": "UniPCMultistepScheduler", **solver, "predict_x0": True, "solver_type": "bh2"}
    raise ValueError(f"unknown sampler {name!r}")


_CLASSES = {cls.__name__: cls for cls in (DPMSolverMultistepScheduler, UniPCMultistepScheduler, HeunDiscreteScheduler,
                                          FlowMatchHeunDiscreteScheduler)}


def make_scheduler(name: str, teacher_scheduler, latent: bool):
    """A fresh solver scheduler for one sampling run (multistep solvers keep state between steps)."""
    settings = dict(sampler_settings(name, teacher_scheduler, latent))
    cls = _CLASSES[settings.pop("class")]
    return cls.from_config(teacher_scheduler.config, **settings)


def teacher_sample(teacher: LoadedPipeline, noise: torch.Tensor, sampler: str, steps: int,
                   cond: Conditioning | None) -> torch.Tensor:
    """The teacher's deterministic sample from ``noise`` (in its UNet's space: latents for latent teachers)."""
    if sampler == "ddim":
        return ddim_sample(teacher.denoiser, noise, steps, cond)
    scheduler = make_scheduler(sampler, teacher.scheduler, teacher.latent)
    return scheduler_sample(teacher.denoiser, scheduler, noise, steps, cond)


def check_scheduler_steps(scheduler, steps, option: str) -> None:
    """Refuse, before any sampling, a step count ``scheduler`` cannot set: each ``k`` in ``steps`` is tried on a
    copy of it (LCMScheduler stops at its ``original_inference_steps``, DDIM at the training timesteps), so the
    refusal is one line before the work, not a scheduler's traceback after it."""
    name = type(scheduler).__name__
    for k in steps:
        trial = type(scheduler).from_config(scheduler.config)
        try:
            trial.set_timesteps(int(k))
        except (ValueError, IndexError) as error:
            reason = " ".join(str(error).split())
            raise DiffkdError(f"{option} has {k}, which the pipeline's {name} cannot sample ({reason[:160]}): "
                              "drop that step count") from None
        if not torch.isfinite(torch.as_tensor(trial.timesteps, dtype=torch.float64)).all():
            # FlowMatch's shift_terminal stretch divides by zero at k = 1
            raise DiffkdError(f"{option} has {k}, which the pipeline's {name} cannot sample (its timesteps at that "
                              "k are not finite): drop that step count")
