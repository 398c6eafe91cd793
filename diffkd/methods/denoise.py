"""Plain diffusion training (Ho et al. 2020, with v-prediction by default; rectified flow with ``prediction_type:
flow``, Liu et al. 2022): how the embedded teachers are made.

It runs through the same trainer, checkpoints and export as the distillation methods, so the teacher that ships
with the project is reproducible with ``diffkd train-teacher configs/digits-teacher.yaml``.
"""

from __future__ import annotations

import torch
from diffusers import DDIMPipeline, DDIMScheduler, DDPMPipeline, UNet2DModel

from diffkd import schedule
from diffkd.config import Config
from diffkd.data import load_images
from diffkd.io import LoadedPipeline, denoiser_of
from diffkd.losses.terms import LossTerms
from diffkd.method_options import DenoiseConfig
from diffkd.methods.base import ExportSpec, Method, Round
from diffkd.paths import training_scheduler


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
        scheduler = training_scheduler(o.prediction_type, o.num_train_timesteps, o.shift, o.beta_schedule,
                                       o.clip_sample)
        # DDIMPipeline turns any scheduler into DDIM; DDPMPipeline's loop runs a flow scheduler's own steps
        pipeline = (DDIMPipeline if isinstance(scheduler, DDIMScheduler) else DDPMPipeline)(unet, scheduler)
        return LoadedPipeline("new", pipeline, denoiser_of(pipeline))

    def rounds(self) -> list[Round]:
        return [Round("denoise", self.options.num_steps)]

    def dataset(self) -> dict[str, torch.Tensor]:
        return {"x0": load_images(self.config.data.source, self.options.sample_size, self.options.channels,
                                  self.config.data.resize, self.config.data.convert)}

    def loss(self, phase: str, batch: dict[str, torch.Tensor], generator: torch.Generator) -> LossTerms:
        x = batch["x0"]
        model = self.teacher.denoiser
        index = torch.randint(0, model.num_train_timesteps, (x.shape[0],), generator=generator).to(x.device)
        t = model.path.timesteps_at(index)
        eps = torch.randn(x.shape, generator=generator).to(x.device)
        alpha, sigma = model.alpha_sigma(t)
        z = schedule.broadcast(alpha, x) * x + schedule.broadcast(sigma, x) * eps
        target = schedule.from_x0_eps(x, eps, alpha, sigma, model.prediction_type)
        return LossTerms({"denoise": (self.student(z, t).sample - target).pow(2).mean()})

    def export_spec(self) -> ExportSpec:
        return ExportSpec(self.teacher.scheduler, self.options.sample_steps, self.options.prediction_type)
