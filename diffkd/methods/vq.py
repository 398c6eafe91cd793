"""The first stage of an unconditional latent teacher: a VQModel, exported inside an LDMPipeline.

Latent diffusion's unconditional models (Rombach et al. 2022; CompVis/ldm-celebahq-256) sample the latents of a
VQ autoencoder whose decoder quantises them. This method trains that VQModel on the data with VQGAN's objective
(Esser et al. 2021) less its perceptual and GAN terms, which 16 px patches do not need: L1 reconstruction plus the
quantiser's codebook and commitment terms (diffusers' VectorQuantizer, beta 0.25). ``denoise`` with
``method.components`` then trains the UNet on its latents.
"""

from __future__ import annotations

import torch
from diffusers import DDIMScheduler, LDMPipeline, UNet2DModel, VQModel

from diffkd.config import Config
from diffkd.data import load_images
from diffkd.io import LoadedPipeline, denoiser_of
from diffkd.losses.terms import LossTerms
from diffkd.method_options import VqConfig
from diffkd.methods.base import ExportSpec, Method, Network, Round
from diffkd.methods.vae import unit_variance_export


class VqTraining(Method):
    name = "vq"
    config_class = VqConfig
    needs_teacher = False

    def __init__(self, config: Config, teacher: LoadedPipeline, student: torch.nn.Module):
        super().__init__(config, teacher, student)
        self.vqvae = teacher.pipeline.vqvae.requires_grad_(True).train()

    @classmethod
    def template(cls, config: Config) -> LoadedPipeline:
        """A fresh seeded VQModel beside a placeholder UNet (the denoise stage replaces it) and a DDIM scheduler."""
        o = config.method
        torch.manual_seed(config.train.seed)
        levels = len(o.block_out_channels)
        vqvae = VQModel(in_channels=o.channels, out_channels=o.channels, block_out_channels=tuple(o.block_out_channels),
                        down_block_types=("DownEncoderBlock2D",) * levels, up_block_types=("UpDecoderBlock2D",) * levels,
                        layers_per_block=o.layers_per_block, latent_channels=o.latent_channels,
                        num_vq_embeddings=o.num_vq_embeddings, vq_embed_dim=o.latent_channels,
                        norm_num_groups=min(32, min(o.block_out_channels)), sample_size=o.sample_size)
        latent_size = o.sample_size // 2 ** (levels - 1)
        placeholder = UNet2DModel(sample_size=latent_size, in_channels=o.latent_channels,
                                  out_channels=o.latent_channels, block_out_channels=(8,), layers_per_block=1,
                                  down_block_types=("DownBlock2D",), up_block_types=("UpBlock2D",), norm_num_groups=8)
        pipeline = LDMPipeline(vqvae=vqvae, unet=placeholder, scheduler=DDIMScheduler(clip_sample=False))
        return LoadedPipeline("new", pipeline, denoiser_of(pipeline))

    def networks(self) -> dict[str, Network]:
        return {"vqvae": Network(self.vqvae, exported=True, export_ema=True)}

    def rounds(self) -> list[Round]:
        return [Round("vq", self.options.num_steps)]

    def dataset(self) -> dict[str, torch.Tensor]:
        return {"x0": self._images()}

    def _images(self) -> torch.Tensor:
        o = self.options
        return load_images(self.config.data.source, o.sample_size, o.channels, self.config.data.resize,
                           self.config.data.convert)

    def loss(self, phase: str, batch: dict[str, torch.Tensor], generator: torch.Generator) -> LossTerms:
        x = batch["x0"]
        decoded = self.vqvae(x)
        return LossTerms({"l1": (decoded.sample - x).abs().mean(), "quantiser": decoded.commit_loss.mean()})

    def export_spec(self) -> ExportSpec:
        return unit_variance_export(self.vqvae, self._images(), self.teacher.scheduler, "vq", "vqvae")
