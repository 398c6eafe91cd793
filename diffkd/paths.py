"""Noise paths: z_t = alpha_t x + sigma_t eps for each scheduler family, on the time axis its network is called with.

Every method works on a ``NoisePath`` and never asks which family its teacher is. Two families:

- ``VPPath``: the variance-preserving path of a DDPM-family scheduler, alpha_t = sqrt(alphas_cumprod[t]) at integer
  timesteps t = 0..T-1, and t = -1 for the clean sample. Students export with DDIM (trailing grid) or LCMScheduler.
- ``FlowPath``: rectified flow (Liu et al. 2022; Esser et al. 2024, SD3), alpha = 1 - sigma, the network called at
  t = sigma * T as diffusers' FlowMatchEulerDiscreteScheduler calls it, t = 0 the clean sample. The teacher's
  training timesteps carry its ``shift`` (sigma' = shift sigma / (1 + (shift - 1) sigma)); a dynamically shifted
  teacher (Flux) gets the shift of its resolution. Students export with FlowMatchEulerDiscreteScheduler or
  FlowMatchLCMScheduler and predict the velocity eps - x.

A student's k-step grid is what its exported scheduler samples at k (``grid``), so training and sampling agree by
construction; grids nest (``grid(2k)[::2] == grid(k)``), which progressive distillation needs.
"""

from __future__ import annotations

import inspect
import math

import torch
from diffusers import DDIMScheduler, FlowMatchEulerDiscreteScheduler, FlowMatchLCMScheduler, LCMScheduler

from diffkd import schedule

SIGMA_DATA = 0.5  # LCM's (and Karras et al.'s) data standard deviation in the boundary scalings


class NoisePath:
    """The interface methods use; see the module docstring."""

    family: str = ""
    clean: float = 0.0
    timestep_type: type = float  # what the network's timesteps are on this axis
    prediction_types: tuple[str, ...] = ()
    consistency_swaps: tuple[str, ...] = ()  # schedulers measured to sample a consistency student as well as its own

    def __init__(self, num_train_timesteps: int):
        self.num_train_timesteps = num_train_timesteps

    def alpha_sigma(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def snr(self, t: torch.Tensor) -> torch.Tensor:
        """Signal-to-noise ratio alpha_t^2 / sigma_t^2 (progressive's loss weighting)."""
        alpha, sigma = self.alpha_sigma(t)
        return alpha**2 / sigma**2

    def training_timesteps(self, device: torch.device | str = "cpu") -> torch.Tensor:
        """The T timesteps denoising training draws from, least noisy first (index i of a uniform draw)."""
        raise NotImplementedError

    def timesteps_at(self, index: torch.Tensor) -> torch.Tensor:
        """Training timesteps at integer indices 0..T-1 (a uniform index draw gives the teacher's training law)."""
        return self.training_timesteps(index.device)[index]

    def midpoint(self, t: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        """A timestep between s and t on this path's axis (DPM-Solver(2S)'s intermediate point)."""
        raise NotImplementedError

    def supports_steps(self, k: int) -> bool:
        """Whether the exported multistep scheduler samples exactly ``grid(k)``."""
        return True

    def grid(self, k: int) -> list[float]:
        """k sampling steps and the clean end, as ``multistep_scheduler`` samples them at k."""
        raise NotImplementedError

    def multistep_scheduler(self, teacher_scheduler, k: int, prediction_type: str, clip_sample: float | None):
        """The deterministic scheduler a k-step student is exported with."""
        raise NotImplementedError

    def sampled_grid(self, scheduler, k: int) -> list[float]:
        """The timesteps ``scheduler`` samples at k, then the clean end: the grid a student exported with that
        scheduler must be trained on (a FlowMatchLCM student's 4 steps, 1, 0.79, 0.63, 0.5, are not Euler's 1, 0.75,
        0.5, 0.25)."""
        scheduler.set_timesteps(k)
        return [*(self.timestep_type(t) for t in scheduler.timesteps.tolist()), self.clean]

    def consistency_grid(self, points: int) -> list[float]:
        """The boundary, then ``points`` training timesteps of consistency distillation, least noisy first."""
        raise NotImplementedError

    def consistency_scheduler(self, teacher_scheduler, points: int, prediction_type: str,
                              clip_sample: float | None, timestep_scaling: float):
        """The multistep consistency sampler (fresh noise between steps) a consistency student is exported with."""
        raise NotImplementedError

    def few_step_prediction_type(self, teacher_prediction_type: str) -> str:
        """The parameterisation a few-step student of this path should have: the teacher's, here."""
        return teacher_prediction_type

    def consistency_alternatives(self, exported) -> dict:
        """Schedulers besides ``exported`` (the consistency scheduler) that a consistency student may be exported
        with, by class name: the candidates a run scores at its end (``diffkd.sampler_choice``). None here."""
        return {}

    def consistency_scalings(self, t: torch.Tensor, timestep_scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
        """(c_skip, c_out) of f = c_skip z + c_out x0, as the exported consistency scheduler applies them."""
        raise NotImplementedError

    def card(self) -> dict:
        """What the model card records about the path."""
        return {"family": self.family, "num_train_timesteps": self.num_train_timesteps}


# sigma / alpha at the top timestep above which an epsilon student cannot sample in 1-2 steps (few_step_prediction_type)
EPSILON_TOP_AMPLIFICATION = 50.0


class VPPath(NoisePath):
    family = "variance-preserving"
    clean = schedule.CLEAN
    timestep_type = int
    prediction_types = ("epsilon", "v_prediction", "sample")
    # What the model card allows when the run did not score its samplers (a text teacher): from_config of the
    # exported LCMScheduler, both step through F's x0 and re-noise. Which sampler is best depends on the teacher
    # (4 steps, x the teacher's DDIM-64 FD: digits-16 DDPM 1.11, LCM 1.18, TCD 2.18, DDIM 6.20; the panel's photo-v
    # DDIM 1.02, TCD 1.43, DDPM 1.46, LCM 1.97; eval/RESULTS.md), which is why an unconditional teacher's run scores
    # LCM and DDIM itself (``consistency_alternatives``). DPM-Solver drifts from k = 4 on digits, Euler gives
    # noise, UniPC and Heun do not run in DDPMPipeline.
    consistency_swaps = ("TCDScheduler", "DDPMScheduler")

    def __init__(self, alphas_cumprod: torch.Tensor):
        super().__init__(len(alphas_cumprod))
        self.alphas_cumprod = alphas_cumprod.float()

    def alpha_sigma(self, t):
        return schedule.alpha_sigma(self.alphas_cumprod.to(torch.as_tensor(t).device), t)

    def training_timesteps(self, device="cpu"):
        return torch.arange(self.num_train_timesteps, device=device)

    def midpoint(self, t, s):
        return (t + s) // 2

    def supports_steps(self, k):
        return 1 <= k <= self.num_train_timesteps and self.num_train_timesteps % k == 0

    def grid(self, k):
        return schedule.trailing_grid(self.num_train_timesteps, k)

    def multistep_scheduler(self, teacher_scheduler, k, prediction_type, clip_sample):
        """DDIM with trailing spacing and a final alpha of 1 on the teacher's betas. Trailing spacing ignores
        steps_offset; it is 1 only because StableDiffusionPipeline warns about anything else."""
        return DDIMScheduler.from_config(
            teacher_scheduler.config, timestep_spacing="trailing", set_alpha_to_one=True, steps_offset=1,
            prediction_type=prediction_type, clip_sample=clip_sample is not None,
            clip_sample_range=clip_sample or 1.0, thresholding=False)

    def consistency_grid(self, points):
        """The boundary t = 0, then LCMScheduler's training grid j * (T // N) - 1 for j = 1..N (19, 39, ..., 999)."""
        spacing = self.num_train_timesteps // points
        return [0] + [j * spacing - 1 for j in range(1, points + 1)]

    def consistency_scheduler(self, teacher_scheduler, points, prediction_type, clip_sample, timestep_scaling):
        return LCMScheduler.from_config(
            teacher_scheduler.config, original_inference_steps=points, timestep_scaling=timestep_scaling,
            prediction_type=prediction_type, clip_sample=clip_sample is not None, clip_sample_range=clip_sample or 1.0,
            thresholding=False)

    def few_step_prediction_type(self, teacher_prediction_type):
        """v_prediction for an epsilon teacher whose top timestep (where every sampler starts) makes x0 = (z - sigma
        eps) / alpha multiply a student's error by sigma / alpha > ``EPSILON_TOP_AMPLIFICATION`` (DDPM's linear betas:
        157; LDM's scaled ones: 84): there an epsilon student's 1- and 2-step samples fail (digits-eps-16, 2 steps:
        12.7x the teacher's DDIM-64 FD; v with a reparameterisation round: 1.24x). SD 1.x's betas (14.6) keep epsilon,
        as LCM distils them."""
        alpha, sigma = self.alpha_sigma(self.num_train_timesteps - 1)
        if teacher_prediction_type == "epsilon" and float(sigma / alpha) > EPSILON_TOP_AMPLIFICATION:
            return "v_prediction"
        return teacher_prediction_type

    def consistency_alternatives(self, exported):
        """DDIM, the deterministic end of the samplers a pipeline config carries (LCM re-noises fully), from the
        exported LCMScheduler's config on the trailing grid, which starts at t = T - 1 as LCM's does. Scored at the
        card's k, it holds at 2k: it improves with k where LCM degrades (photo-v, FD of 1,024 samples at 2 / 4 / 8
        steps: DDIM 16.2 / 13.6 / 14.0, LCM 20.3 / 26.0 / 32.1). DDPM, between them, is left out: on digits-16 it
        beats LCM at 4 steps (1.02x against 1.09x the teacher's DDIM-64 FD) and loses at 8 (2.11x against 1.45x).
        TCD too: its eta, which decides it, is an argument of ``step`` that no config carries."""
        accepted = inspect.signature(DDIMScheduler.__init__).parameters  # not LCM's own keys: diffusers warns
        config = {key: value for key, value in exported.config.items() if key in accepted}
        return {"DDIMScheduler": DDIMScheduler.from_config(config, timestep_spacing="trailing")}

    def consistency_scalings(self, t, timestep_scaling):
        """LCM's c_skip, c_out at discrete timesteps t (``LCMScheduler.get_scalings_for_boundary_condition_discrete``):
        with s = t * scaling, c_skip = sd^2 / (s^2 + sd^2), c_out = s / sqrt(s^2 + sd^2); exactly (1, 0) at t = 0."""
        scaled = torch.as_tensor(t).double() * timestep_scaling
        c_skip = SIGMA_DATA**2 / (scaled**2 + SIGMA_DATA**2)
        c_out = scaled / (scaled**2 + SIGMA_DATA**2).sqrt()
        return c_skip.float(), c_out.float()


# The last sigma a flow consistency student samples from, at every k. 2 steps want it high, 4 steps low: on the
# 700-step default student of digits-flow-16, held-out noise seeds 10-15, 2 / 4 steps x the teacher's Euler-64 FD:
# 0.4: 1.68 / 1.28, 0.5: 1.40 / 1.39, 0.6: 1.32 / 1.49 (eval/RESULTS.md, "Methods table on digits-flow-16"). 0.5 is
# where alpha = sigma (SNR 1), the point LCMScheduler's 2-step grid samples on the cosine v teacher (t = 499), and a
# training point of every even teacher_grid.
CONSISTENCY_LAST_SIGMA = 0.5


def shifted(sigma, shift: float):
    """SD3's timestep shift (Esser et al. 2024, eq. 23): shift sigma / (1 + (shift - 1) sigma); 1 leaves it."""
    return shift * sigma / (1 + (shift - 1) * sigma)


class FlowPath(NoisePath):
    family = "rectified-flow"
    clean = 0.0
    prediction_types = ("flow",)

    def __init__(self, num_train_timesteps: int, shift: float = 1.0):
        super().__init__(num_train_timesteps)
        self.shift = float(shift)
        self._grids: dict[int, list[float]] = {}

    def alpha_sigma(self, t):
        sigma = (torch.as_tensor(t).float() / self.num_train_timesteps).clamp(0, 1)
        return 1 - sigma, sigma

    def training_timesteps(self, device="cpu"):
        """FlowMatchEulerDiscreteScheduler's table: sigma_i = shift((i + 1) / T), called at t = sigma_i T."""
        fractions = torch.arange(1, self.num_train_timesteps + 1, device=device, dtype=torch.float32)
        return shifted(fractions / self.num_train_timesteps, self.shift) * self.num_train_timesteps

    def midpoint(self, t, s):
        return (t + s) / 2

    def multistep_scheduler(self, teacher_scheduler, k, prediction_type, clip_sample):
        """FlowMatch Euler on sigma = 1, 1 - 1/k, ..., 1/k (then 0): uniform in sigma, so the grids of k and 2k nest.
        ``shift_terminal`` = 1/k stretches diffusers' default grid (which ends at sigma = 1/T, a step that does
        nothing) onto it; at k = 1 the grid is sigma = 1 alone and needs no stretch."""
        return FlowMatchEulerDiscreteScheduler(num_train_timesteps=self.num_train_timesteps, shift=1.0,
                                               use_dynamic_shifting=False, shift_terminal=1.0 / k if k > 1 else None)

    def grid(self, k):
        """Read off the exported scheduler once per k (progressive asks for two grids in every loss)."""
        if k not in self._grids:
            self._grids[k] = self.sampled_grid(self.multistep_scheduler(None, k, "flow", None), k)
        return list(self._grids[k])

    def consistency_grid(self, points):
        """The boundary t = 1 (sigma = 1/T, where f is the identity), then sigma = j / N."""
        total = self.num_train_timesteps
        return [1.0] + [j * total / points for j in range(1, points + 1)]

    def consistency_scheduler(self, teacher_scheduler, points, prediction_type, clip_sample, timestep_scaling):
        """FlowMatchLCM on sigmas log-uniform from 1 to ``CONSISTENCY_LAST_SIGMA`` (k = 2: 1, 0.5; k = 4: 1, 0.79,
        0.63, 0.5). Its default grid, linspace(1, 1/T, k), ends every k on a step at sigma = 1/T that does nothing
        (2 steps sample as 1). The end comes from the config's ``sigma_min`` / ``sigma_max``, which diffusers'
        exponential-sigma conversion reads (and its loader calls "ignored" in a warning, wrongly); it applies to
        sigmas a pipeline passes too, so FluxPipeline samples the same grid as DDPMPipeline and SD3's pipeline."""
        scheduler = FlowMatchLCMScheduler(num_train_timesteps=self.num_train_timesteps, shift=1.0,
                                          use_exponential_sigmas=True)
        scheduler.register_to_config(sigma_min=CONSISTENCY_LAST_SIGMA, sigma_max=1.0)
        return scheduler

    def consistency_scalings(self, t, timestep_scaling):
        """FlowMatchLCMScheduler takes x0 = z - sigma v as it is: f(z, sigma -> 0) = z holds by the parameterisation."""
        t = torch.as_tensor(t)  # on t's device, as the VP scalings are
        return torch.zeros_like(t, dtype=torch.float32), torch.ones_like(t, dtype=torch.float32)

    def card(self):
        return {**super().card(), "shift": self.shift}


def is_flow_scheduler(scheduler) -> bool:
    """Whether a scheduler runs rectified flow: diffusers' FlowMatch schedulers, or a DPM-Solver / UniPC on flow
    sigmas (``use_flow_sigmas``, as SANA ships; such a scheduler also carries VP ``alphas_cumprod`` it never uses)."""
    config = getattr(scheduler, "config", {})
    return type(scheduler).__name__.startswith("FlowMatch") or bool(config.get("use_flow_sigmas", False))


def flow_shift(config: dict, image_seq_len: int | None) -> float:
    """The static shift of a flow scheduler config: ``shift`` (``flow_shift`` on a DPM-Solver / UniPC), or for
    dynamic shifting (Flux) exp(mu) (or mu, for linear time shifts) at the teacher's image sequence length, mu
    interpolated as FluxPipeline does."""
    if not config.get("use_dynamic_shifting", False):
        return float(config.get("shift", config.get("flow_shift", 1.0)))
    base_len, max_len = config.get("base_image_seq_len", 256), config.get("max_image_seq_len", 4096)
    base, top = config.get("base_shift", 0.5), config.get("max_shift", 1.15)
    length = image_seq_len or base_len
    mu = base + (top - base) * (length - base_len) / (max_len - base_len)
    return mu if config.get("time_shift_type", "exponential") == "linear" else math.exp(mu)


def training_scheduler(prediction_type: str, num_train_timesteps: int, shift: float, beta_schedule: str,
                       clip_sample: bool):
    """The scheduler a new teacher of this parameterisation is trained and exported with: FlowMatch Euler (with
    ``shift``) for rectified flow, else DDIM with the trailing grid on ``beta_schedule``."""
    if prediction_type == "flow":
        return FlowMatchEulerDiscreteScheduler(num_train_timesteps=num_train_timesteps, shift=shift)
    return DDIMScheduler(num_train_timesteps=num_train_timesteps, beta_schedule=beta_schedule,
                         prediction_type=prediction_type, clip_sample=clip_sample, timestep_spacing="trailing",
                         set_alpha_to_one=True)
