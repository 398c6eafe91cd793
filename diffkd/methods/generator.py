"""Generator distillation (Luhman & Luhman 2021, "Knowledge Distillation in Iterative Generative Models"): the student
maps noise straight to the teacher's many-step sample from that noise, in one step or on its own k-step grid.

The pairs (noise, teacher sample) come from a ``diffkd.sample_cache`` made once per teacher and sampler. The student
runs the same trailing-grid DDIM that the exported scheduler runs (x0 clipped between steps as the scheduler does),
so ``DiffusionPipeline.from_pretrained(student)(num_inference_steps=k)`` reproduces what was trained. The loss is
the x-space MSE of Luhman & Luhman plus whichever of output KD, feature KD and LPIPS the ``losses`` section weights.
"""

from __future__ import annotations

import contextlib
import itertools

import torch

from diffkd import sample_cache, schedule
from diffkd.conditioning import batch_conditioning, read_prompts
from diffkd.errors import DiffkdError
from diffkd.losses.kd import AuxiliaryLosses
from diffkd.losses.terms import LossTerms
from diffkd.method_options import GeneratorConfig
from diffkd.methods.base import ExportSpec, Method, Network, Round


class GeneratorDistillation(Method):
    name = "generator"
    config_class = GeneratorConfig
    reads_data_prompts = True  # its teacher-sample pairs are drawn from data.prompts, never from captions

    def __init__(self, config, teacher, student):
        super().__init__(config, teacher, student)
        self.auxiliary = AuxiliaryLosses(config.losses, teacher, student, self.prediction_type)

    def check(self) -> None:
        total = self.teacher.denoiser.num_train_timesteps
        k = self.options.student_steps
        if not self.teacher.denoiser.path.supports_steps(k):
            raise DiffkdError(f"method.student_steps={k} does not divide the teacher's {total} training timesteps, so "
                              "DDIMScheduler could not reproduce the student's grid; pick a divisor such as 1, 2 or 4")
        if self.options.teacher_steps > total:
            raise DiffkdError(f"method.teacher_steps={self.options.teacher_steps} exceeds the teacher's {total} "
                              "training timesteps")
        losses = self.config.losses
        if self.options.mse == 0 and losses.lpips == 0 and losses.output_kd == 0 and losses.feature_kd == 0:
            raise DiffkdError("every loss weight is 0, so nothing would be learned: set method.mse or losses.lpips")

    def rounds(self) -> list[Round]:
        return [Round(f"noise->sample in {self.options.student_steps}", self.options.num_steps)]

    def dataset(self) -> dict[str, torch.Tensor]:
        data = self.config.data
        prompts = tuple(read_prompts(data.prompts, data.prompts_file)) if self.teacher.text_conditioned else ()
        return sample_cache.pair_rows(self.teacher, self.options, prompts)

    def networks(self) -> dict[str, Network]:
        """The student, and the feature-KD projections when the losses section uses any."""
        projections = self.auxiliary.modules()
        return {**super().networks(), **({"projections": Network(projections)} if len(projections) else {})}

    def loss(self, phase: str, batch: dict[str, torch.Tensor], generator: torch.Generator) -> LossTerms:
        student = self.student
        noise, target = batch["noise"], batch["sample"]
        cond = batch_conditioning(batch, self.options.guidance_scale)
        model = self.teacher.denoiser.like(student, self.prediction_type, clip=False)
        grid = model.path.grid(self.options.student_steps)
        z, first = noise.float(), None
        for t, s in itertools.pairwise(grid):
            t_batch = torch.full((noise.shape[0],), t, device=noise.device)
            watch = self.auxiliary.watch(student) if first is None else contextlib.nullcontext()
            with watch:
                x0, eps = model.x0_eps(z, t_batch, cond.unguided())
            first = first or (z, t_batch, x0, eps)
            if s != model.path.clean:  # the exported scheduler's intermediate step, clip included
                alpha_s, sigma_s = model.alpha_sigma(torch.full_like(t_batch, s))
                z = schedule.ddim_step(x0, eps, alpha_s, sigma_s, self.teacher.denoiser.clip_sample)
        terms = LossTerms({"mse": (x0 - target).pow(2).mean()}, {"mse": self.options.mse})
        z0, t0, x0_first, eps_first = first
        return self.auxiliary.add(terms, z0, t0, cond, (x0_first, eps_first), images=(x0, target))

    def export_spec(self) -> ExportSpec:
        o = self.options
        teacher = self.teacher.denoiser
        scheduler = teacher.path.multistep_scheduler(self.teacher.scheduler, o.student_steps, self.prediction_type,
                                                     teacher.clip_sample)
        return ExportSpec(scheduler, o.student_steps, self.prediction_type, card={
            "teacher_sampler": o.teacher_sampler, "teacher_steps": o.teacher_steps, "num_pairs": o.num_samples,
            "sample_seed": o.sample_seed})
