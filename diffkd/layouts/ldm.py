"""Unconditional latent diffusion (LDMPipeline, as CompVis/ldm-celebahq-256 ships): a UNet2DModel on the latents
of a VQModel the pipeline keeps as ``vqvae``.

Everything but the autoencoder's name is the base layout's. The VQModel's decoder quantises the latents it is given
(LDMPipeline decodes so), and the Denoiser encodes images to its latents before quantisation, as LDM trained on
them.
"""

from __future__ import annotations

from diffkd.layouts.base import Layout


class LDMLayout(Layout):
    name = "ldm"
    autoencoder_component = "vqvae"

    @classmethod
    def matches(cls, pipeline) -> bool:
        # LDMTextToImagePipeline also holds a vqvae, with an LDMBert text encoder whose prompts diffkd cannot encode
        return (getattr(pipeline, "unet", None) is not None and getattr(pipeline, "vqvae", None) is not None
                and getattr(pipeline, "bert", None) is None)
