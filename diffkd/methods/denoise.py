"""Plain diffusion training (Ho et al. 2020, with v-prediction by default): how the embedded teacher is made.

It runs through the same trainer, checkpoints and export as the distillation methods, so the teacher that ships
with the project is reproducible with ``diffkd train-teacher configs/digits-teacher.yaml``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers import DDIMPipeline, DDIMScheduler, UNet2DModel
from torch import nn

from diffkd import schedule
from diffkd.config import Config, MethodConfig, check, check_choice
from diffkd.data import load_images
from diffkd.io import LoadedPipeline, denoiser_of
from diffkd.methods.base import ExportSpec, LossTerms, Method, Round


@dataclass
class DenoiseConfig(MethodConfig):
    """A small pixel-space UNet2DModel and its noise schedule."""

    name: str = "denoise"
    num_steps: int = 3000
    sample_size: int = 16
    channels: int = 1
    block_out_channels: list[int] = (32, 64, 64)
    layers_per_block: int = 1
    attention_at_lowest: bool = True
    prediction_type: str = "v_prediction"
    beta_schedule: str = "squaredcos_cap_v2"
    num_train_timesteps: int = 1000
    clip_sample: bool = True
    sample_steps: int = 64

    def __post_init__(self):
        check(self.num_steps >= 1, f"method.num_steps must be >= 1; got {self.num_steps}")
        check(self.sample_size >= 4, f"method.sample_size must be >= 4; got {self.sample_size}")
        check(len(self.block_out_channels) >= 1, "method.block_out_channels needs at least one entry")
        check_choice("method.prediction_type", self.prediction_type, schedule.PREDICTION_TYPES)
        check_choice("method.beta_schedule", self.beta_schedule, ("linear", "scaled_linear", "squaredcos_cap_v2"))


class DenoisingTraining(Method):
    name = "denoise"
    config_class = DenoiseConfig
    needs_teacher = False

    @classmethod
    def template(cls, config: Config) -> LoadedPipeline:
        """A fresh pipeline (random UNet + scheduler) that plays the teacher's role of a template to export."""
        o = config.method
        levels = len(o.block_out_channels)
        down = ["DownBlock2D"] * levels
        up = ["UpBlock2D"] * levels
        if o.attention_at_lowest:
            down[-1], up[0] = "AttnDownBlock2D", "AttnUpBlock2D"
        torch.manual_seed(config.train.seed)
        unet = UNet2DModel(sample_size=o.sample_size, in_channels=o.channels, out_channels=o.channels,
                           block_out_channels=tuple(o.block_out_channels), layers_per_block=o.layers_per_block,
                           down_block_types=tuple(down), up_block_types=tuple(up),
                           norm_num_groups=min(32, min(o.block_out_channels)))
        scheduler = DDIMScheduler(num_train_timesteps=o.num_train_timesteps, beta_schedule=o.beta_schedule,
                                  prediction_type=o.prediction_type, clip_sample=o.clip_sample,
                                  timestep_spacing="trailing", set_alpha_to_one=True)
        pipeline = DDIMPipeline(unet, scheduler)
        return LoadedPipeline("new", pipeline, denoiser_of(pipeline))

    def rounds(self) -> list[Round]:
        return [Round("denoise", self.options.num_steps)]

    def dataset(self) -> dict[str, torch.Tensor]:
        return {"x0": load_images(self.config.data.source, self.options.sample_size, self.options.channels,
                                  self.config.data.resize, self.config.data.convert)}

    def loss(self, batch: dict[str, torch.Tensor], student: nn.Module, generator: torch.Generator) -> LossTerms:
        x = batch["x0"]
        model = self.teacher.denoiser
        t = torch.randint(0, model.num_train_timesteps, (x.shape[0],), generator=generator).to(x.device)
        eps = torch.randn(x.shape, generator=generator).to(x.device)
        alpha, sigma = model.alpha_sigma(t)
        z = schedule.broadcast(alpha, x) * x + schedule.broadcast(sigma, x) * eps
        target = schedule.from_x0_eps(x, eps, alpha, sigma, model.prediction_type)
        return LossTerms({"denoise": (student(z, t).sample - target).pow(2).mean()})

    def export_spec(self) -> ExportSpec:
        return ExportSpec(self.teacher.scheduler, self.options.sample_steps, self.options.prediction_type)
