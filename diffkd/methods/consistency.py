"""Consistency distillation (Song et al. 2023, "Consistency Models", Alg. 2) in LCM's discrete form (Luo et al. 2023).

The student is f(z_t, t) = c_skip(t) z_t + c_out(t) x0(F(z_t, t)) (Song et al. eq. 5 / Appendix C), where F is a UNet
initialised from the teacher that keeps the teacher's prediction type, x0(.) is that parameterisation's clean
prediction, and c_skip, c_out are the noise path's (``NoisePath.consistency_scalings``): LCM's scalings of the discrete
timestep on a VP path, c_skip(0) = 1 and c_out(0) = 0 exactly, so f(z, 0) = z (the boundary condition); on a
rectified-flow path f = x0 = z - sigma v, which is z at sigma = 0. Each update noises a training image to t_{n+k} on
the teacher's N-point grid, takes one teacher DDIM step (classifier-free guided with a fixed w for conditional
teachers) to t_n, k grid intervals lower (LCM's skipping interval), and pulls f(z_{t_{n+k}}, t_{n+k}) towards the
target network's f at (z_{t_n}, t_n). The target network is an EMA of the student (LCM), or with ``target_ema=0`` the
student itself under stop-gradient (iCT, Song & Dhariwal 2023). The distance is iCT's pseudo-Huber by default.

A student of another parameterisation than the teacher's (by default a velocity student of an epsilon teacher whose
top timestep leaves almost no signal: ``NoisePath.few_step_prediction_type``) first has a reparameterisation round:
its epsilon regresses onto the teacher's (the DDPM loss), so the consistency round starts from the teacher's function.
With ``guidance_steps`` a guidance round comes before the consistency round: F's x prediction regresses onto the
guided teacher's at the same input and w (Meng et al. 2023, stage 1). The target network restarts from the student
each round leaves.

The export is the plain F with the path's consistency scheduler: diffusers' ``LCMScheduler`` on the same grid
(``original_inference_steps`` = N, the same timestep scaling and x0 clip), which applies c_skip and c_out itself, or
its rectified-flow counterpart for a flow teacher: ``from_pretrained(student)(num_inference_steps=k)`` samples for any k
up to N with one network. On an unconditional VP teacher the run also scores DDIM on the same student and exports
it when it samples clearly better (``diffkd.sampler_choice``; photo-v: DDIM 1.02x the teacher's
DDIM-64 FD at 4 steps where LCM gives 1.97x).
"""

from __future__ import annotations

import copy
import functools
import math

import torch
from torch import nn

from diffkd import schedule
from diffkd.conditioning import training_rows
from diffkd.errors import DiffkdError
from diffkd.guidance_embedding import conditioning_pair, embedded_student
from diffkd.losses.kd import PerceptualKD
from diffkd.losses.terms import LossTerms
from diffkd.method_options import ConsistencyConfig
from diffkd.methods.base import ExportSpec, Method, Round
from diffkd.models import Conditioning, Denoiser

HUBER_FACTOR = 0.00054  # iCT (Song & Dhariwal 2023, sec. 3.3): c = 0.00054 sqrt(d)


def pseudo_huber(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-sample sqrt(||a - b||^2 + c^2) - c with c = 0.00054 sqrt(d) (iCT eq. 8): L2-like near 0, L1-like far."""
    c = HUBER_FACTOR * math.sqrt(a[0].numel())
    return ((a - b).float().pow(2).flatten(1).sum(1) + c**2).sqrt() - c


def consistency_function(model: Denoiser, z: torch.Tensor, t: torch.Tensor, cond: Conditioning | None,
                         timestep_scaling: float) -> torch.Tensor:
    """f(z, t) = c_skip z + c_out x0(F(z, t)) with the path's scalings, x0 clipped as the exported scheduler clips
    it (LCMScheduler's c_skip, c_out on a VP path; x0 = z - sigma v as it is on a flow path, as the flow LCM scheduler takes it)."""
    x0, _ = model.x0_eps(z, t, cond)
    if model.clip_sample is not None:
        x0 = x0.clamp(-model.clip_sample, model.clip_sample)
    c_skip, c_out = model.path.consistency_scalings(t, timestep_scaling)
    return schedule.broadcast(c_skip, z) * z.float() + schedule.broadcast(c_out, x0) * x0


def dpm_solver_2s_step(model: Denoiser, z: torch.Tensor, t: torch.Tensor, u: torch.Tensor, s: torch.Tensor,
                       cond: Conditioning | None) -> torch.Tensor:
    """DPM-Solver++(2S): a DDIM step to u, then z_s = DDIM from z_t with x0 replaced by
    D = (1 - 1/(2r)) x0(z_t, t) + 1/(2r) x0(z_u, u), r = (lambda_u - lambda_t) / (lambda_s - lambda_t), lambda = log
    alpha / sigma. (sigma_s / sigma_t) z_t + alpha_s (1 - e^-h) D is that DDIM form, so the x0 clip applies to D."""
    x0_t, _ = model.x0_eps(z, t, cond)
    if model.clip_sample is not None:
        x0_t = x0_t.clamp(-model.clip_sample, model.clip_sample)
    (a_t, s_t), (a_u, s_u), (a_s, s_s) = model.alpha_sigma(t), model.alpha_sigma(u), model.alpha_sigma(s)
    z_u = schedule.ddim_step(x0_t, (z - schedule.broadcast(a_t, z) * x0_t) / schedule.broadcast(s_t, z), a_u, s_u)
    x0_u, _ = model.x0_eps(z_u, u, cond)
    lam_t, lam_u, lam_s = (a_t / s_t).log(), (a_u / s_u).log(), (a_s / s_s).log()
    # from pure noise (alpha_t = 0, rectified flow's sigma = 1) lambda_t = -inf and r -> 1
    r_inverse = torch.where(torch.isfinite(lam_t), (lam_s - lam_t) / (lam_u - lam_t), torch.ones_like(lam_t))
    half_over_r = schedule.broadcast(0.5 * r_inverse, z)
    x0 = (1 - half_over_r) * x0_t + half_over_r * x0_u
    eps = (z - schedule.broadcast(a_t, z) * x0) / schedule.broadcast(s_t, z)
    return schedule.ddim_step(x0, eps, a_s, s_s, model.clip_sample)


class ConsistencyDistillation(Method):
    name = "consistency"
    config_class = ConsistencyConfig

    def __init__(self, config, teacher, student):
        self.guidance = config.method.guidance
        student = embedded_student(config, teacher, student)
        super().__init__(config, teacher, student)
        teacher_model = teacher.denoiser
        self.grid = teacher_model.path.consistency_grid(self.options.teacher_grid)
        self.model = teacher_model.like(student, self.prediction_type)
        self.target = (copy.deepcopy(student).requires_grad_(False).eval() if self.options.target_ema > 0
                       else None)
        self.target_model = (teacher_model.like(self.target, self.prediction_type) if self.target is not None
                             else self.model)
        self.round_index = 0
        losses = config.losses
        self.perceptual = (PerceptualKD(teacher, losses.lpips_net, losses.lpips_backbone_weights)
                           if self.options.distance == "lpips" else None)

    def check(self) -> None:
        total, points = self.teacher.denoiser.num_train_timesteps, self.options.teacher_grid
        if not self.teacher.denoiser.path.supports_steps(points) or points >= total:
            raise DiffkdError(f"method.teacher_grid={points} must divide the teacher's {total} training timesteps "
                              "and be smaller, so LCMScheduler reproduces the grid; try 50 (LCM's) or 100")
        samplers = self.samplers()
        if self.options.sampler not in ("auto", *samplers):
            raise DiffkdError(f"method.sampler={self.options.sampler!r} is not a scheduler this student can be exported "
                              f"with; use auto (the run scores them) or one of {', '.join(samplers)}")
        losses = self.config.losses
        if losses.output_kd or losses.feature_kd or losses.lpips:
            raise DiffkdError("method consistency has its own distance (method.distance); set losses.output_kd, "
                              "losses.feature_kd and losses.lpips to 0, or method.distance=lpips for LPIPS")

    @functools.cached_property
    def round_kinds(self) -> list[str]:
        """The rounds in order: reparameterisation (a student of another parameterisation than the teacher's, with
        ``reparameterisation_steps``), guidance (``guidance_steps``), then consistency. Fixed by the config: read
        once, not at every step's loss."""
        o = self.options
        reparameterises = self.prediction_type != self.teacher.denoiser.prediction_type and o.reparameterisation_steps
        return [*(["reparameterisation"] if reparameterises else []), *(["guidance"] if o.guidance_steps else []),
                "consistency"]

    def rounds(self) -> list[Round]:
        """The consistency round (after the reparameterisation and guidance rounds, if any), not judged by round
        health: its loss is measured against the target network, which follows the student, so it need not fall
        when training works (glyphs LCM-LoRA: 0.86 -> 0.91 over 2,000 steps for a student within 1.07x of the full
        student's FD)."""
        o = self.options
        rounds = {"reparameterisation": Round(f"reparameterisation to {self.prediction_type}",
                                              o.reparameterisation_steps),
                  "guidance": Round("guidance", o.guidance_steps),
                  "consistency": Round(f"consistency on {o.teacher_grid} points, skip {o.skip}", o.num_steps,
                                       loss_falls=False)}
        return [rounds[kind] for kind in self.round_kinds]

    def begin_round(self, index: int) -> None:
        """Each round's target network starts from the student the round before left."""
        self.round_index = index
        if self.target is not None and index > 0:
            self.target.load_state_dict(self.student.state_dict())

    def load_state_tensors(self, index: int, tensors: dict[str, torch.Tensor]) -> None:
        self.round_index = index

    def dataset(self) -> dict[str, torch.Tensor]:
        """The training images (as latents for a latent teacher) and, for a text teacher, their prompts' encodings."""
        return training_rows(self.teacher, self.config.data)

    def followers(self) -> dict[str, nn.Module]:
        return {"target": self.target} if self.target is not None else {}

    @torch.no_grad()
    def after_step(self) -> None:
        """The target network's EMA step: theta^- <- mu theta^- + (1 - mu) theta, over the trained weights (a LoRA
        student's frozen base is the target's, and train.frozen_dtype may store it at another dtype)."""
        if self.target is not None:
            for follower, trained in zip(self.target.parameters(), self.student.parameters()):
                if trained.requires_grad:
                    follower.lerp_(trained, 1 - self.options.target_ema)

    @torch.no_grad()
    def teacher_step(self, z: torch.Tensor, t: torch.Tensor, s: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        """The teacher's ODE step z_t -> z_s, classifier-free guided when ``cond`` asks for it: one DDIM step, or
        DPM-Solver++(2S) (Lu et al. 2022, data prediction) through the integer midpoint u of [s, t]."""
        teacher = self.teacher.denoiser
        if self.options.solver == "ddim":
            return teacher.ddim_step(z, t, s, cond)
        return dpm_solver_2s_step(teacher, z, t, teacher.path.midpoint(t, s), s, cond)

    def student_output(self, model: Denoiser, z: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        """The consistency function of ``model`` (the student or its target network): one conditional pass."""
        return consistency_function(model, z, t, cond, self.options.timestep_scaling)

    def conditioning(self, batch: dict[str, torch.Tensor], generator: torch.Generator
                     ) -> tuple[Conditioning, Conditioning]:
        """(the teacher's conditioning, the student's): a fixed w guides the teacher's step and is baked into the
        student; a w range draws one w per sample for the teacher's step and tells the student (and its target
        network) that w through the guidance embedding (LCM's w-conditioning)."""
        return conditioning_pair(batch, self.options.guidance_scale, self.guidance, generator)

    def loss(self, phase: str, batch: dict[str, torch.Tensor], generator: torch.Generator) -> LossTerms:
        kind = self.round_kinds[self.round_index]
        if kind == "reparameterisation":
            return self.reparameterisation_loss(batch, generator)
        if kind == "guidance":
            return self.guidance_loss(batch, generator)
        x = batch["x0"]
        grid = torch.tensor(self.grid, device=x.device)
        n = torch.randint(0, len(self.grid) - self.options.skip, (x.shape[0],), generator=generator).to(x.device)
        t, s = grid[n + self.options.skip], grid[n]
        eps = torch.randn(x.shape, generator=generator).to(x.device)
        alpha_t, sigma_t = self.teacher.denoiser.alpha_sigma(t)
        z_t = schedule.broadcast(alpha_t, x) * x + schedule.broadcast(sigma_t, x) * eps
        teacher_cond, student_cond = self.conditioning(batch, generator)
        target = self.target_at(z_t, t, s, teacher_cond, student_cond)
        prediction = self.student_output(self.model, z_t, t, student_cond)
        return LossTerms({"consistency": self.distance(prediction, target).mean()})

    def reparameterisation_loss(self, batch: dict[str, torch.Tensor], generator: torch.Generator) -> LossTerms:
        """|eps(F(z_t, t)) - eps_teacher(z_t, t)|^2 at training timesteps drawn uniformly: the DDPM loss towards the
        teacher's function, read through the student's own parameterisation. In x space it weights errors by
        alpha^2 / sigma^2, so the top timesteps, where the teacher's x0 is its error amplified, barely count and the
        consistency round learns them."""
        timesteps = self.teacher.denoiser.path.training_timesteps(batch["x0"].device)
        (_, eps_student), (_, eps_teacher) = self.predictions_at(batch, generator, timesteps)
        return LossTerms({"reparameterisation": (eps_student - eps_teacher).pow(2).flatten(1).mean(1).mean()})

    def guidance_loss(self, batch: dict[str, torch.Tensor], generator: torch.Generator) -> LossTerms:
        """|x0(F(z_t, t, w)) - x0_teacher^w(z_t, t)|^2 at the grid's timesteps (not the boundary), in x space: the
        guided teacher's prediction at the student's own input, as progressive's guidance round."""
        timesteps = torch.tensor(self.grid[1:], device=batch["x0"].device)
        (x_student, _), (x_teacher, _) = self.predictions_at(batch, generator, timesteps)
        return LossTerms({"guidance": (x_student - x_teacher).pow(2).flatten(1).mean(1).mean()})

    def predictions_at(self, batch: dict[str, torch.Tensor], generator: torch.Generator, timesteps: torch.Tensor
                       ) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
        """The student's and the teacher's (x0, eps) at the batch noised to a t drawn from ``timesteps`` per row, each
        conditioned as the method conditions it (the teacher without gradients): what the regression rounds fit."""
        x = batch["x0"]
        t = timesteps[torch.randint(0, len(timesteps), (x.shape[0],), generator=generator).to(x.device)]
        eps = torch.randn(x.shape, generator=generator).to(x.device)
        alpha_t, sigma_t = self.teacher.denoiser.alpha_sigma(t)
        z_t = schedule.broadcast(alpha_t, x) * x + schedule.broadcast(sigma_t, x) * eps
        teacher_cond, student_cond = self.conditioning(batch, generator)
        with torch.no_grad():
            teacher = self.teacher.denoiser.x0_eps(z_t, t, teacher_cond)
        return self.model.x0_eps(z_t, t, student_cond), teacher

    @torch.no_grad()
    def target_at(self, z_t: torch.Tensor, t: torch.Tensor, s: torch.Tensor, teacher_cond: Conditioning,
                  student_cond: Conditioning) -> torch.Tensor:
        """The consistency target of z_t: the target network's f at the teacher's ODE step's landing point z_s."""
        return self.student_output(self.target_model, self.teacher_step(z_t, t, s, teacher_cond), s, student_cond)

    def distance(self, prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Per-sample distance between the student's and the target network's outputs."""
        if self.options.distance == "pseudo_huber":
            return pseudo_huber(prediction, target)
        if self.options.distance == "l2":
            return (prediction - target).pow(2).flatten(1).mean(1)
        return self.perceptual(prediction, target)

    def export_spec(self) -> ExportSpec:
        """The student with the path's consistency scheduler, or ``method.sampler``'s; with "auto", the path's
        alternatives ride along for the run to score (``diffkd.sampler_choice``)."""
        candidates = self.samplers()
        own = next(iter(candidates))
        if self.options.sampler != "auto":
            return self.spec_with(candidates[self.options.sampler], own == self.options.sampler)
        spec = self.spec_with(candidates[own], True)
        spec.alternatives = {name: self.spec_with(scheduler, False) for name, scheduler in candidates.items()
                             if name != own}
        return spec

    def samplers(self) -> dict[str, object]:
        """The schedulers this student may be exported with by class name, the path's consistency scheduler first."""
        teacher = self.teacher.denoiser
        own = teacher.path.consistency_scheduler(self.teacher.scheduler, self.options.teacher_grid,
                                                 self.prediction_type, teacher.clip_sample,
                                                 self.options.timestep_scaling)
        return {type(own).__name__: own, **teacher.path.consistency_alternatives(own)}

    def spec_with(self, scheduler, own: bool) -> ExportSpec:
        """The export with ``scheduler``; the model card's swaps are the path's for its own scheduler only."""
        sampled = {}
        for k in range(1, min(8, self.options.teacher_grid) + 1):
            scheduler.set_timesteps(k)
            sampled[k] = scheduler.timesteps.tolist()
        o = self.options
        return ExportSpec(scheduler, o.num_inference_steps, self.prediction_type, card={
            "trained_timesteps": self.grid, "teacher_grid": o.teacher_grid, "skip": o.skip,
            "target_ema": o.target_ema, "distance": o.distance, "solver": o.solver, "guidance_scale": o.guidance_scale,
            "timestep_scaling": o.timestep_scaling, "sampling_timesteps": sampled, "guidance_steps": o.guidance_steps,
            "reparameterisation_steps": o.reparameterisation_steps if "reparameterisation" in self.round_kinds else 0,
            **({} if self.guidance is None else {"guidance_range": [self.guidance.w_min, self.guidance.w_max]})},
            also_samples_with=self.teacher.denoiser.path.consistency_swaps if own else ())
