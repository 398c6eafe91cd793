"""Distribution matching distillation, DMD2 (Yin et al. 2024, "Improved Distribution Matching Distillation for Fast
Image Synthesis"; DMD: Yin et al. 2023, "One-step Diffusion with Distribution Matching Distillation").

The generator G (the student, initialised from the teacher) maps noise to an image in one step at t = T, or in k
steps on the grid that the path's exported multistep scheduler runs. Instead of regressing the teacher's samples it is
pushed along the gradient of KL(p_G || p_data): noised to x_t, a sample's score difference s_fake - s_real is,
in x0 terms, (fake x0 - real x0) (DMD eq. 7), where the real score is the frozen teacher (classifier-free guided
for conditional teachers) and the fake score is a second copy of the teacher trained by the ordinary denoising loss
on G's own detached samples, ``fake_updates`` updates per generator update (DMD2's two time-scale rule, sec. 4.2).

With k steps G is trained on its own intermediate states (DMD2's backward simulation, sec. 4.5): a random grid
step i is drawn, G's own steps (without gradient) take the noise to step i, and G's x0 prediction there gets the
gradient; the fake score then follows the mixture of all k steps' outputs. ``backward_simulation: unrolled``
instead always takes the whole k-step sample, with the gradient through every step, so the fake score follows the
distribution that sampling gives (at the cost of k UNet passes' activations). A step re-noises G's x0 with fresh
noise (``multistep: consistency``, DMD2's, sampled by the path's consistency scheduler) or takes a deterministic
DDIM step (``multistep: ddim``, the path's multistep scheduler). Optional: DMD2's GAN term (sec. 4.3), a classifier head on the fake score
network's mid-block features, and DMD's regression loss on the teacher-sample cache that ``generator`` builds, as
a term or a warm start round.
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import nn

from diffkd import sample_cache, schedule
from diffkd.conditioning import batch_conditioning, read_prompts, training_rows
from diffkd.errors import DiffkdError
from diffkd.lora import lora_copy
from diffkd.losses.terms import LossTerms
from diffkd.method_options import DmdConfig
from diffkd.methods.base import ExportSpec, Method, Network, Phase, Round
from diffkd.methods.consistency import consistency_function
from diffkd.models import Conditioning

TIMESTEP_SCALING = 10.0  # LCMScheduler's default boundary scaling, for ``multistep: consistency``


def distribution_matching_gradient(x: torch.Tensor, real_x0: torch.Tensor, fake_x0: torch.Tensor) -> torch.Tensor:
    """DMD's per-sample gradient on x (DMD eq. 8 with DMD2's weighting): (fake x0 - real x0) / mean|x - real x0|.

    Dividing by the mean absolute distance to the real score's x0 prediction normalises the gradient's scale
    across noise levels and samples; a sample exactly on the real prediction gets a zero gradient (DMD2's nan_to_num would give it +-3e38).
    """
    scale = schedule.broadcast((x - real_x0).abs().flatten(1).mean(1), x)
    return torch.where(scale > 0, (fake_x0 - real_x0) / scale.clamp(min=torch.finfo(x.dtype).tiny), 0.0)


def distribution_matching_loss(x: torch.Tensor, gradient: torch.Tensor) -> torch.Tensor:
    """0.5 * mean((x - stopgrad(x - gradient))^2): its derivative in x is ``gradient`` / x.numel() (DMD2's form)."""
    return 0.5 * F.mse_loss(x, (x - gradient).detach())


def gan_generator_loss(fake_logits: torch.Tensor) -> torch.Tensor:
    """Non-saturating generator loss softplus(-D(fake)) (Goodfellow et al. 2014; DMD2 eq. 5)."""
    return F.softplus(-fake_logits).mean()


def gan_classifier_loss(fake_logits: torch.Tensor, real_logits: torch.Tensor) -> torch.Tensor:
    """The classifier's loss softplus(D(fake)) + softplus(-D(real)): real images up, the generator's down."""
    return F.softplus(fake_logits).mean() + F.softplus(-real_logits).mean()


def classifier_head(channels: int) -> nn.Module:
    """DMD2's small head that turns the fake score network's bottleneck features into one real/fake logit."""
    groups = math.gcd(32, channels)
    return nn.Sequential(nn.GroupNorm(groups, channels), nn.SiLU(), nn.Conv2d(channels, channels, 3, padding=1),
                         nn.GroupNorm(groups, channels), nn.SiLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(channels, 1))


class DistributionMatching(Method):
    name = "dmd"
    config_class = DmdConfig

    def __init__(self, config, teacher, student):
        super().__init__(config, teacher, student)
        o = self.options
        self.generator = teacher.denoiser.like(student, self.prediction_type)
        self.fake_unet = (lora_copy(teacher.unet, o.fake_score_lora_rank, teacher.layout.lora_targets)
                          if o.fake_score_lora_rank else copy.deepcopy(teacher.unet).float().requires_grad_(True).train())
        self.fake = teacher.denoiser.like(self.fake_unet, clip=False)
        self.grid = self.generator.path.sampled_grid(self.export_scheduler(), o.student_steps)
        self.head = None
        self._features: list[torch.Tensor] = []
        if o.gan > 0:
            self.head = classifier_head(self.fake_unet.config.block_out_channels[-1]).to(self.fake_unet.device)
            self.fake_unet.mid_block.register_forward_hook(lambda module, args, output: self._features.append(output))
        self.warm_start = o.warm_start_steps > 0
        self.pairs: dict[str, torch.Tensor] = {}

    @property
    def reads_data_prompts(self) -> bool:
        """The regression's teacher-sample pairs are drawn from data.prompts, whatever the data set's captions."""
        return self.options.uses_cache

    def check(self) -> None:
        total = self.teacher.denoiser.num_train_timesteps
        k = self.options.student_steps
        if not self.teacher.denoiser.path.supports_steps(k):
            raise DiffkdError(f"method.student_steps={k} does not divide the teacher's {total} training timesteps, so "
                              "DDIMScheduler could not reproduce the generator's grid; pick a divisor such as 1, 2 "
                              "or 4")
        if self.options.uses_cache and self.options.teacher_steps > total:
            raise DiffkdError(f"method.teacher_steps={self.options.teacher_steps} exceeds the teacher's {total} "
                              "training timesteps")
        if self.config.train.shard and k > 1 and self.options.backward_simulation == "random_step":
            raise DiffkdError("train.shard needs every process to run the same passes, and backward_simulation="
                              "random_step draws a grid step (a number of generator passes) per process: set "
                              "method.backward_simulation=unrolled, or drop train.shard")
        if self.options.gan > 0 and getattr(self.fake_unet, "mid_block", None) is None:
            raise DiffkdError("method.gan > 0 needs the teacher UNet's mid block for the classifier head; this "
                              "teacher has none: set method.gan=0")

    def rounds(self) -> list[Round]:
        o = self.options
        warm = [Round("regression warm start", o.warm_start_steps)] if o.warm_start_steps else []
        return warm + [Round(f"distribution matching, {o.student_steps} step(s)", o.num_steps, loss_falls=False)]

    def begin_round(self, index: int) -> None:
        self.warm_start = index == 0 and self.options.warm_start_steps > 0

    def load_state_tensors(self, index: int, tensors: dict[str, torch.Tensor]) -> None:
        self.begin_round(index)

    def dataset(self) -> dict[str, torch.Tensor]:
        """The data set's images (the GAN term's real samples) with their prompts' conditioning; the teacher-sample
        pairs, when a regression uses them, are kept aside and drawn by index."""
        data = self.config.data
        if self.options.uses_cache:
            prompts = read_prompts(data.prompts, data.prompts_file) if self.teacher.text_conditioned else []
            self.pairs = sample_cache.pair_rows(self.teacher, self.options, tuple(prompts))
        return training_rows(self.teacher, data)

    def networks(self) -> dict[str, Network]:
        o = self.options
        betas = tuple(o.adam_betas)
        fake_lr = o.fake_learning_rate or None
        networks = {"student": Network(self.student, adam_betas=betas, exported=True, export_ema=True),
                    "fake_score": Network(self.fake_unet, learning_rate=fake_lr, adam_betas=betas)}
        if self.head is not None:
            networks["classifier"] = Network(self.head, learning_rate=fake_lr, adam_betas=betas)
        return networks

    def phases(self) -> list[Phase]:
        fake = ("fake_score", "classifier") if self.head is not None else ("fake_score",)
        return [Phase("fake_score", fake, repeats=self.options.fake_updates), Phase("generator", ("student",))]

    def rollout(self, noise: torch.Tensor, stop: int, cond: Conditioning, generator: torch.Generator,
                through: bool = False) -> torch.Tensor:
        """G's output at grid step ``stop``, reached from ``noise`` by G's own steps, each as the exported scheduler
        takes it (``method.multistep``): without gradient (DMD2's backward simulation) or, ``through``, with the
        gradient through every step."""
        z = noise.float()
        batch = noise.shape[0]
        with torch.set_grad_enabled(through and torch.is_grad_enabled()):
            for t, s in zip(self.grid[:stop], self.grid[1:stop + 1]):
                z = self.step(z, torch.full((batch,), t, device=z.device), s, cond, generator)
        t = torch.full((batch,), self.grid[stop], device=z.device)
        x0 = self.generator.x0_eps(z, t, cond)[0]  # unclipped, so the gradient reaches every pixel
        if self.options.multistep == "ddim":
            return x0
        c_skip, c_out = self.generator.path.consistency_scalings(t, TIMESTEP_SCALING)  # c_skip < 1e-7 on the grid
        return schedule.broadcast(c_skip, z) * z + schedule.broadcast(c_out, x0) * x0

    def step(self, z: torch.Tensor, t: torch.Tensor, s: int, cond: Conditioning,
             generator: torch.Generator) -> torch.Tensor:
        """One sampling step of G from t to grid point s: DDIM, or LCMScheduler's consistency step (the clipped
        consistency function's output re-noised to s with fresh noise)."""
        s = torch.full_like(t, s)
        if self.options.multistep == "ddim":
            return self.generator.ddim_step(z, t, s, cond)
        x = consistency_function(self.generator, z, t, cond, TIMESTEP_SCALING)
        alpha_s, sigma_s = self.generator.alpha_sigma(s)
        fresh = torch.randn(x.shape, generator=generator).to(x.device)
        return schedule.broadcast(alpha_s, x) * x + schedule.broadcast(sigma_s, x) * fresh

    def loss(self, phase: str, batch: dict[str, torch.Tensor], generator: torch.Generator) -> LossTerms:
        real = batch["x0"]
        cond = batch_conditioning(batch, self.options.guidance_scale)
        noise = torch.randn(real.shape, generator=generator).to(real.device)
        stop = int(torch.randint(0, self.options.student_steps, (), generator=generator))
        if self.options.backward_simulation == "unrolled":  # drawn all the same: the measured runs' random stream
            stop = self.options.student_steps - 1
        if phase == "fake_score":
            return self.fake_score_loss(real, noise, stop, cond, generator)
        if self.warm_start:
            return LossTerms({"regression": self.regression_loss(real, stop, generator)})
        return self.generator_loss(noise, stop, cond, generator)

    def _noised(self, x: torch.Tensor, t: torch.Tensor, generator: torch.Generator
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        eps = torch.randn(x.shape, generator=generator).to(x.device)
        alpha, sigma = self.fake.alpha_sigma(t)
        return schedule.broadcast(alpha, x) * x + schedule.broadcast(sigma, x) * eps, eps, alpha, sigma

    def _timesteps(self, batch: int, generator: torch.Generator, device: torch.device,
                   fractions: tuple[float, float] = (0.0, 1.0)) -> torch.Tensor:
        """Training timesteps of the teacher's path, drawn uniformly by index within ``fractions`` of the range."""
        total = self.fake.num_train_timesteps
        low, high = int(fractions[0] * total), max(int(fractions[0] * total) + 1, int(fractions[1] * total))
        return self.fake.path.timesteps_at(torch.randint(low, high, (batch,), generator=generator).to(device))

    def fake_score_loss(self, real: torch.Tensor, noise: torch.Tensor, stop: int, cond: Conditioning,
                        generator: torch.Generator) -> LossTerms:
        """The fake score network's denoising loss on G's detached samples (in the teacher's parameterisation),
        plus the classifier head's GAN loss when it is on."""
        with torch.no_grad():
            x = self.rollout(noise, stop, cond.unguided(), generator)
        t = self._timesteps(x.shape[0], generator, x.device)
        z, eps, alpha, sigma = self._noised(x, t, generator)
        self._features.clear()
        output = self.fake.output(z, t, cond.unguided()).float()
        target = schedule.from_x0_eps(x, eps, alpha, sigma, self.fake.prediction_type)
        terms = LossTerms({"denoise": (output - target).pow(2).mean()})
        if self.head is None:
            return terms
        fake_logits = self.head(self._features[-1].float())
        t_real = self._timesteps(real.shape[0], generator, real.device, self.options.timestep_range)
        self.fake.output(self._noised(real.float(), t_real, generator)[0], t_real, cond.unguided())
        real_logits = self.head(self._features[-1].float())
        terms.add("classifier", gan_classifier_loss(fake_logits, real_logits), self.options.gan_classifier)
        return terms

    def generator_loss(self, noise: torch.Tensor, stop: int, cond: Conditioning,
                       generator: torch.Generator) -> LossTerms:
        """DMD's distribution-matching loss on x = G(noise), with the GAN and regression terms when weighted."""
        o = self.options
        x = self.rollout(noise, stop, cond.unguided(), generator, through=o.backward_simulation == "unrolled")
        t = self._timesteps(x.shape[0], generator, x.device, o.timestep_range)
        z, _, _, _ = self._noised(x, t, generator)
        with torch.no_grad():
            real_x0 = self.teacher.denoiser.x0_eps(z, t, cond)[0]
        terms, weights = {}, {}
        if self.head is not None:  # one fake pass with gradient to x: its x0 for DM, its features for the GAN
            self._features.clear()
            fake_x0 = self.fake.x0_eps(z, t, cond.unguided())[0].detach()
            terms["gan"], weights["gan"] = gan_generator_loss(self.head(self._features[-1].float())), o.gan
        else:
            with torch.no_grad():
                fake_x0 = self.fake.x0_eps(z, t, cond.unguided())[0]
        gradient = distribution_matching_gradient(x.detach(), real_x0, fake_x0)
        terms["dm"] = distribution_matching_loss(x, gradient)
        if o.regression > 0:
            terms["regression"], weights["regression"] = self.regression_loss(noise, stop, generator), o.regression
        return LossTerms(terms, weights, metrics={"dm/gradient_rms": gradient.pow(2).mean().sqrt().detach()})

    def regression_loss(self, like: torch.Tensor, stop: int, generator: torch.Generator) -> torch.Tensor:
        """x-space MSE between G's x0 at grid step ``stop`` from a cached noise and the teacher's sample from it
        (DMD's regression loss, with MSE in place of LPIPS as ``generator`` uses)."""
        rows = torch.randint(0, len(self.pairs["noise"]), (like.shape[0],), generator=generator)
        pairs = {k: v[rows].to(like.device) for k, v in self.pairs.items()}
        cond = batch_conditioning(pairs, self.options.guidance_scale).unguided()
        return (self.rollout(pairs["noise"], stop, cond, generator) - pairs["sample"].float()).pow(2).mean()

    def export_scheduler(self):
        """The scheduler G samples with, whose k timesteps G trains on (``self.grid``)."""
        o = self.options
        clip, path = self.generator.clip_sample, self.generator.path
        if o.multistep == "ddim":
            return path.multistep_scheduler(self.teacher.scheduler, o.student_steps, self.prediction_type, clip)
        # the path's consistency scheduler on all T timesteps, so other k sample too; G trains on whatever k
        # timesteps it samples (``NoisePath.sampled_grid``)
        return path.consistency_scheduler(self.teacher.scheduler, path.num_train_timesteps, self.prediction_type,
                                          clip, TIMESTEP_SCALING)

    def export_spec(self) -> ExportSpec:
        o = self.options
        return ExportSpec(self.export_scheduler(), o.student_steps, self.prediction_type, card={
            "timesteps": self.grid[:-1], "multistep": o.multistep, "backward_simulation": o.backward_simulation,
            "fake_updates": o.fake_updates, "guidance_scale": o.guidance_scale,
            "timestep_range": list(o.timestep_range), "gan": o.gan, "regression": o.regression,
            "warm_start_steps": o.warm_start_steps, "fake_score_lora_rank": o.fake_score_lora_rank})
