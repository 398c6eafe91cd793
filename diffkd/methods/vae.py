"""The first stage of a small text-to-image teacher: its autoencoder, and a fresh text encoder.

Latent diffusion (Rombach et al. 2022) trains the UNet on the latents of a fixed autoencoder; this method trains
that AutoencoderKL on the data (L1 reconstruction plus a small KL to N(0, I), their eq. 25 without the perceptual
and adversarial terms, which a 32 px two-colour glyph does not need) and exports it inside a
StableDiffusionPipeline, beside the tokenizer and text encoder the UNet stage (``text-denoise``) will read.

The text encoder is made here at its seeded random initialisation (the captions are a small closed grammar, every
word its own token); the next stage trains it with the UNet or replaces it with a pretrained CLIP text tower
(``text-denoise``'s ``text_encoder``).
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
from diffusers import AutoencoderKL

from diffkd import text_pipeline
from diffkd.config import Config
from diffkd.data import load_training_set
from diffkd.errors import DiffkdError
from diffkd.io import LoadedPipeline, denoiser_of, is_local_reference
from diffkd.losses.terms import LossTerms
from diffkd.method_options import VaeConfig
from diffkd.methods.base import ExportSpec, Method, Network, Round
from diffkd.models import autoencoder_latents

SCALE_IMAGES = 2048  # images whose latents set the scaling factor


class VaeTraining(Method):
    name = "vae"
    config_class = VaeConfig
    needs_teacher = False

    def __init__(self, config: Config, teacher: LoadedPipeline, student: torch.nn.Module):
        super().__init__(config, teacher, student)
        self.vae = teacher.pipeline.vae.requires_grad_(True).train()
        if self.options.decoder_only:
            self.vae.encoder.requires_grad_(False).eval()
            self.vae.quant_conv.requires_grad_(False)

    @classmethod
    def template(cls, config: Config) -> LoadedPipeline:
        """Fresh parts, seeded: the VAE to train (or ``init_from``'s, to train further), the seeded text encoder and
        tokenizer, a placeholder UNet."""
        o = config.method
        torch.manual_seed(config.train.seed)
        tokenizer = text_pipeline.build_tokenizer(text_pipeline.caption_words(), o.max_tokens)
        text_encoder = text_pipeline.build_text_encoder(tokenizer, o.text_hidden_size, o.text_layers, o.text_heads)
        if o.init_from:
            vae = load_vae(o.init_from)
        else:
            vae = text_pipeline.build_vae(o.sample_size, o.block_out_channels, o.latent_channels, o.layers_per_block)
        latent_size = o.sample_size // 2 ** (len(o.block_out_channels) - 1)
        placeholder = text_pipeline.build_unet(latent_size, o.latent_channels, [8], 1, o.text_hidden_size, 8, [True])
        scheduler = text_pipeline.build_scheduler(0.00085, 0.012, "scaled_linear", "epsilon", 1000)
        pipeline = text_pipeline.assemble(vae, text_encoder, tokenizer, placeholder, scheduler)
        return LoadedPipeline("new", pipeline, denoiser_of(pipeline))

    def networks(self) -> dict[str, Network]:
        return {"vae": Network(self.vae, exported=True, export_ema=True)}

    def rounds(self) -> list[Round]:
        return [Round("vae", self.options.num_steps)]

    def dataset(self) -> dict[str, torch.Tensor]:
        return {"x0": self._images()}

    def _images(self) -> torch.Tensor:
        return load_training_set(self.config.data, self.options.sample_size, 3)[0]

    def loss(self, phase: str, batch: dict[str, torch.Tensor], generator: torch.Generator) -> LossTerms:
        x = batch["x0"]
        posterior = self.vae.encode(x).latent_dist
        noise = torch.randn(posterior.mean.shape, generator=generator).to(x.device)
        reconstruction = self.vae.decode(posterior.mean + posterior.std * noise).sample
        return LossTerms({"l1": (reconstruction - x).abs().mean(),
                          "kl": self.options.kl_weight * posterior.kl().mean()})

    def export_spec(self) -> ExportSpec:
        return unit_variance_export(self.vae, self._images(), self.teacher.scheduler, "vae", "vae")


@torch.no_grad()
def unit_variance_export(autoencoder: torch.nn.Module, images: torch.Tensor, scheduler, stage: str,
                         component: str) -> ExportSpec:
    """The export of an autoencoder stage, its ``scaling_factor`` set to 1 / the standard deviation of its latents
    on the first ``SCALE_IMAGES`` images, so the UNet sees unit-variance inputs (Rombach et al. 2022, sec. G:
    Stable Diffusion's 0.18215 was found the same way)."""
    images = images[:SCALE_IMAGES].to(autoencoder.device)
    latents = torch.cat([autoencoder_latents(autoencoder, chunk) for chunk in images.split(256)])
    scale = float(1 / latents.float().std())
    autoencoder.register_to_config(scaling_factor=scale)
    autoencoder.eval()
    return ExportSpec(scheduler, 50, "epsilon", card={"stage": stage, "scaling_factor": scale}, component=component)


def load_vae(source: str) -> AutoencoderKL:
    """``method.init_from``'s VAE: a missing folder, a folder without a ``vae/`` or a hub id not in the local cache is
    one line (diffusers' own error is a 45-line hub traceback after minutes of retries)."""
    if is_local_reference(source) and not (Path(source).expanduser() / "vae").is_dir():
        where = "does not exist" if not Path(source).expanduser().exists() else "has no vae/ folder"
        raise DiffkdError(f"method.init_from {source!r} {where}: point it at a pipeline folder this stage exported "
                          "(one with vae/)")
    try:
        with warnings.catch_warnings():  # the hub client's deprecation notices would make the refusal three lines
            warnings.simplefilter("ignore")
            return AutoencoderKL.from_pretrained(source, subfolder="vae", use_safetensors=True,
                                                 local_files_only=not is_local_reference(source))
    except (OSError, ValueError) as error:
        reason = " ".join(str(error).split())[:160]
        raise DiffkdError(f"method.init_from {source!r}: could not load its VAE ({reason}); point it at a pipeline "
                          "folder with vae/ (a hub id is read from the local Hugging Face cache, never downloaded "
                          "mid-run)") from None
