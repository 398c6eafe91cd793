"""Plain diffusion training (Ho et al. 2020, with v-prediction by default; rectified flow with ``prediction_type:
flow``, Liu et al. 2022): how the embedded teachers are made, in pixel space or on the latents of a VQ
autoencoder (``method.components``, the ``vq`` method's export: an unconditional latent diffusion teacher).

It runs through the same trainer, checkpoints and export as the distillation methods, so the teacher that ships
with the project is reproducible with ``diffkd train-teacher configs/digits-teacher.yaml``.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import DDIMPipeline, DDIMScheduler, DDPMPipeline, LDMPipeline, UNet2DModel

from diffkd import schedule
from diffkd.conditioning import training_latents
from diffkd.config import Config
from diffkd.data import load_images
from diffkd.errors import DiffkdError
from diffkd.io import LoadedPipeline, denoiser_of, load_pipeline
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
        """A fresh pipeline (random UNet + scheduler) that plays the teacher's role of a template to export: pixel
        space, or ``method.components``' autoencoder with a UNet on its latents."""
        o = config.method
        autoencoder = latent_parts(o.components, config.teacher.trust_remote_code) if o.components else None
        side, channels = ((o.sample_size, o.channels) if autoencoder is None
                          else (autoencoder.latent_size, autoencoder.latent_shape[0]))
        levels = len(o.block_out_channels)
        down = ["DownBlock2D"] * levels
        up = ["UpBlock2D"] * levels
        if o.attention_at_lowest:
            down[-1], up[0] = "AttnDownBlock2D", "AttnUpBlock2D"
        torch.manual_seed(config.train.seed)
        unet = UNet2DModel(sample_size=side, in_channels=channels, out_channels=channels,
                           block_out_channels=tuple(o.block_out_channels), layers_per_block=o.layers_per_block,
                           down_block_types=tuple(down), up_block_types=tuple(up),
                           norm_num_groups=min(32, min(o.block_out_channels)))
        scheduler = training_scheduler(o.prediction_type, o.num_train_timesteps, o.shift, o.beta_schedule,
                                       o.clip_sample)
        if autoencoder is not None:
            pipeline = LDMPipeline(vqvae=autoencoder.denoiser.vae.requires_grad_(False).eval(), unet=unet,
                                   scheduler=scheduler)
        else:  # DDIMPipeline turns any scheduler into DDIM; DDPMPipeline's loop runs a flow scheduler's own steps
            pipeline = (DDIMPipeline if isinstance(scheduler, DDIMScheduler) else DDPMPipeline)(unet, scheduler)
        return LoadedPipeline("new", pipeline, denoiser_of(pipeline))

    def rounds(self) -> list[Round]:
        return [Round("denoise", self.options.num_steps)]

    def dataset(self) -> dict[str, torch.Tensor]:
        if self.teacher.latent:
            return {"x0": training_latents(self.teacher, self.config.data)[0]}
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


def latent_parts(components: str, trust_remote_code: bool = False) -> LoadedPipeline:
    """``method.components``: the unconditional latent pipeline the ``vq`` method exports, whose autoencoder the
    UNet is trained under."""
    if not (Path(components).expanduser() / "model_index.json").is_file():
        raise DiffkdError(f"method.components {components!r} is not a pipeline folder: train its autoencoder first "
                          "(diffkd train-teacher with method.name: vq) and point method.components at the pipeline "
                          "folder it exports")
    parts = load_pipeline(components, trust_remote_code=trust_remote_code)
    if not isinstance(parts.pipeline, LDMPipeline):
        raise DiffkdError(f"method.components {components!r} is a {type(parts.pipeline).__name__}: point it at the "
                          "LDMPipeline the vq method exports (a text pipeline's UNet is trained by text-denoise)")
    return parts
