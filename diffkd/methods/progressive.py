"""Progressive distillation (Salimans & Ho 2022, Algorithm 2): N -> N/2 -> ... -> k sampling steps.

In each round a student learns to do in one DDIM step what its teacher does in two, on the nested trailing grids
that the exported DDIMScheduler uses. Round 1's teacher is the pipeline's UNet; round r+1's teacher is round r's
student, frozen. With a guidance scale, the teacher's two steps are classifier-free guided and the student learns
the guided result in one conditional pass (guidance distillation, Meng et al. 2023, with a fixed w).
With a w range (``method.guidance``) the student is guidance-embedded instead (``diffkd.guidance_embedding``): a
first round learns the CFG teacher's own start_steps-step DDIM at per-sample w (Meng et al. 2023, stage 1), and the
halvings then distil each w-conditioned student into the next at the same w (their stage 2).
"""

from __future__ import annotations

import contextlib

import torch

from diffkd import checkpoint, schedule, sharding, timestep_buckets
from diffkd.conditioning import training_rows
from diffkd.errors import DiffkdError
from diffkd.guidance_embedding import conditioning_pair, embedded_student
from diffkd.losses.kd import AuxiliaryLosses
from diffkd.losses.terms import LossTerms
from diffkd.method_options import ProgressiveConfig
from diffkd.methods.base import ExportSpec, Method, Network, Round
from diffkd.models import Conditioning, Denoiser


class ProgressiveDistillation(Method):
    name = "progressive"
    config_class = ProgressiveConfig

    def __init__(self, config, teacher, student):
        self.guidance = config.method.guidance
        student = embedded_student(config, teacher, student)
        super().__init__(config, teacher, student)
        self.round_teacher: Denoiser = teacher.denoiser
        self.student_steps, self.teacher_steps = self.plan()[0]
        self.auxiliary = AuxiliaryLosses(config.losses, teacher, student, self.prediction_type)

    def check(self) -> None:
        path = self.teacher.denoiser.path
        total = path.num_train_timesteps
        if not path.supports_steps(self.options.final_steps):
            raise DiffkdError(f"method.final_steps={self.options.final_steps} does not divide the teacher's "
                              f"{total} training timesteps, so DDIMScheduler could not reproduce the student's grid; "
                              f"pick a divisor such as 1, 2, 4 or 8")
        if self.options.start_steps > total:
            raise DiffkdError(f"method.start_steps={self.options.start_steps} exceeds the teacher's {total} "
                              "training timesteps")

    def plan(self) -> list[tuple[int, int]]:
        """(student steps, teacher steps) of each round: the optional imitation (or guidance) round, then the
        halvings."""
        n = self.options.start_steps
        rounds = [(n, n)] if self.options.imitation_steps or self.guidance is not None else []
        while n > self.options.final_steps:
            rounds.append((n // 2, n))
            n //= 2
        return rounds

    def rounds(self) -> list[Round]:
        first = f"{self.options.start_steps} ({'imitate' if self.guidance is None else 'guidance'})"
        return [Round(f"{m}->{k}", self.options.steps_per_round) if m != k else
                Round(first, self.options.imitation_steps or self.options.steps_per_round)
                for k, m in self.plan()]

    def _distils_pipeline_teacher(self, index: int) -> bool:
        """The imitation round and the first halving learn from the pipeline's teacher; later rounds from the
        previous round's student. With guidance, every halving learns from a w-conditioned student."""
        return index == 0 or (index == 1 and self.options.imitation_steps > 0 and self.guidance is None)

    def dataset(self) -> dict[str, torch.Tensor]:
        return training_rows(self.teacher, self.config.data)

    def begin_round(self, index: int) -> None:
        """The first halving distils the pipeline's teacher; each later one round r-1's student, frozen as it ended."""
        self.student_steps, self.teacher_steps = self.plan()[index]
        if not self._distils_pipeline_teacher(index):
            self.round_teacher = self._frozen_student()

    def _frozen_student(self) -> Denoiser:
        unet = sharding.plain_copy(self.student).requires_grad_(False).eval()
        return self.teacher.denoiser.like(unet, self.prediction_type)

    def networks(self) -> dict[str, Network]:
        """The student, and the feature-KD projections when the losses section uses any."""
        projections = self.auxiliary.modules()
        return {**super().networks(), **({"projections": Network(projections)} if len(projections) else {})}

    def state_tensors(self) -> dict[str, torch.Tensor]:
        if self.round_teacher is self.teacher.denoiser:
            return {}
        kept = set(checkpoint.network_state(self.student))  # a LoRA student's frozen base is the teacher's
        return {f"round_teacher.{k}": v for k, v in self.round_teacher.unet.state_dict().items() if k in kept}

    def load_state_tensors(self, index: int, tensors: dict[str, torch.Tensor]) -> None:
        self.student_steps, self.teacher_steps = self.plan()[index]
        if not self._distils_pipeline_teacher(index):
            self.round_teacher = self._frozen_student()
            prefix = "round_teacher."
            checkpoint.load_network_state(self.round_teacher.unet, {k[len(prefix):]: v for k, v in tensors.items()
                                                                    if k.startswith(prefix)},
                                          kept=set(checkpoint.network_state(self.student)))

    def loss(self, phase: str, batch: dict[str, torch.Tensor], generator: torch.Generator) -> LossTerms:
        student = self.student
        x = batch["x0"]
        k, path = self.student_steps, self.teacher.denoiser.path
        per_step = self.teacher_steps // k  # 2 in a halving, 1 when imitating
        grid = torch.tensor(path.grid(k), device=x.device)
        fine = torch.tensor(path.grid(self.teacher_steps), device=x.device)
        i = torch.randint(0, k, (x.shape[0],), generator=generator).to(x.device)
        t, s = grid[i], grid[i + 1]
        eps = torch.randn(x.shape, generator=generator).to(x.device)
        alpha_t, sigma_t = self.round_teacher.alpha_sigma(t)
        alpha_s, sigma_s = self.round_teacher.alpha_sigma(s)
        z_t = schedule.broadcast(alpha_t, x) * x + schedule.broadcast(sigma_t, x) * eps

        cond, student_cond = self.conditioning(batch, generator)
        # a previous student already carries the guidance (baked in, or told w): it takes the student's one pass
        teacher_cond = cond if self.round_teacher is self.teacher.denoiser else student_cond
        with torch.no_grad():  # the teacher's two DDIM steps, t -> t' -> t'' (one when imitating)
            z_target = z_t
            for j in range(per_step):
                z_target = self.round_teacher.ddim_step(z_target, fine[per_step * i + j], fine[per_step * i + j + 1],
                                                        teacher_cond)
            x_target = schedule.progressive_target(z_t, z_target, alpha_t, sigma_t, alpha_s, sigma_s)

        model = self.teacher.denoiser.like(student, self.prediction_type, clip=False)
        teacher_terms = self.options.kd_rounds == "all" or per_step == 1
        with self.auxiliary.watch(student) if teacher_terms else contextlib.nullcontext():
            x_pred, eps_pred = model.x0_eps(z_t, t, student_cond)
        weight = schedule.loss_weight(path.snr(t), self.options.loss_weighting)
        weight = weight * self.step_weight(alpha_t, sigma_t, alpha_s, sigma_s)
        per_sample = weight * (x_pred - x_target).pow(2).flatten(1).mean(1)
        terms = LossTerms({"distill": per_sample.mean()},
                          metrics={f"distill/{name}": share for name, share in timestep_buckets.bucket_shares(
                              per_sample, t, path.num_train_timesteps).items()})
        return self.auxiliary.add(terms, z_t, t, cond, (x_pred, eps_pred), images=(x_pred, x_target),
                                  teacher_terms=teacher_terms)

    def conditioning(self, batch: dict[str, torch.Tensor], generator: torch.Generator
                     ) -> tuple[Conditioning, Conditioning]:
        """(the pipeline teacher's conditioning, the student's): a fixed w guides the teacher and is baked into the
        student; a w range draws one w per sample, for the teacher's CFG and the student's guidance embedding."""
        return conditioning_pair(batch, self.options.guidance_scale, self.guidance, generator)

    def uses_z_space(self) -> bool:
        """Whether this round's loss is measured where the student's step lands (see ``step_weight``).

        "auto" keeps a guidance round (``in_guidance_round``) in x space: it regresses onto the CFG teacher's x
        prediction at the student's own input (Meng et al. 2023, eq. 6), and CFG acts mostly at high t, where z
        space's c^2 would drop it (eval/RESULTS.md, "Guidance-embedded 4-step student": the w response of each
        loss)."""
        if self.options.target_space == "auto":
            return self.round_teacher.prediction_type == "epsilon" and not self.in_guidance_round()
        return self.options.target_space == "z"

    def in_guidance_round(self) -> bool:
        """The first round of a w range, or an imitation round of a teacher guided at a fixed w > 1."""
        guided = self.guidance is not None or self.options.guidance_scale > 1
        return guided and self.student_steps == self.teacher_steps

    def step_weight(self, alpha_t: torch.Tensor, sigma_t: torch.Tensor, alpha_s: torch.Tensor,
                    sigma_s: torch.Tensor) -> torch.Tensor:
        """c^2 = (alpha_s - sigma_s alpha_t / sigma_t)^2 in z space, 1 in x space.

        A DDIM step t -> s moves z_s by c * dx when its x prediction moves by dx, so c^2 * |dx|^2 = |dz_s|^2: the
        error that sampling actually sees. An epsilon teacher's x0 = (z - sigma eps) / alpha carries its eps error
        times sigma / alpha (~160 at the top of a linear schedule), and so does the progressive target; weighted
        by max(SNR, 1) >= 1 that noise dominates the x-space loss and the round does not converge (issue 14). c is
        ~0.002 there and 1 on the last step (s = clean), so z space keeps what matters and drops the noise that
        sampling never sees. A v or x teacher's targets are well conditioned; there x space is kept.
        """
        if not self.uses_z_space():
            return torch.ones_like(alpha_t)
        return (alpha_s - sigma_s * alpha_t / sigma_t) ** 2

    def export_spec(self) -> ExportSpec:
        k = self.options.final_steps
        teacher = self.teacher.denoiser
        scheduler = teacher.path.multistep_scheduler(self.teacher.scheduler, k, self.prediction_type, teacher.clip_sample)
        return ExportSpec(scheduler, k, self.prediction_type, card={
            "start_steps": self.options.start_steps, "imitation_steps": self.options.imitation_steps,
            "loss_weighting": self.options.loss_weighting, "kd_rounds": self.options.kd_rounds,
            "guidance_scale": self.options.guidance_scale, "target_space": self.options.target_space,
            **({} if self.guidance is None else {"guidance_range": [self.guidance.w_min, self.guidance.w_max]})})
