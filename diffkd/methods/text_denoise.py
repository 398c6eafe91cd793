"""The second stage of a small text-to-image teacher: a UNet2DConditionModel trained on the first stage's latents.

Plain epsilon-prediction diffusion training (Ho et al. 2020) in the latent space of a frozen VAE, conditioned on
each image's caption through a text encoder trained with it (as LDM's text-to-image model, Rombach et al. 2022,
sec. 4.3; a frozen random encoder left the glyphs teacher ignoring its prompts), with a tenth of the rows given the
empty prompt instead so that the one network also predicts unconditionally, which classifier-free guidance needs
(Ho & Salimans 2022). The export is a StableDiffusionPipeline folder holding both trained networks.
"""

from __future__ import annotations

from pathlib import Path

import torch

from diffkd import schedule, text_pipeline
from diffkd.conditioning import training_latents
from diffkd.config import Config
from diffkd.errors import DiffkdError
from diffkd.io import LoadedPipeline, denoiser_of, load_pipeline
from diffkd.losses.terms import LossTerms
from diffkd.method_options import TextDenoiseConfig
from diffkd.methods.base import ExportSpec, Method, Network, Round


class TextDenoisingTraining(Method):
    name = "text-denoise"
    config_class = TextDenoiseConfig
    needs_teacher = False

    @classmethod
    def template(cls, config: Config) -> LoadedPipeline:
        """``method.components``' VAE, text encoder and tokenizer with a fresh seeded UNet and the schedule."""
        o = config.method
        if not (Path(o.components).expanduser() / "model_index.json").is_file():
            raise DiffkdError(f"method.components {o.components!r} is not a pipeline folder: train it first "
                              "(diffkd train-teacher configs/glyphs-vae.yaml --output runs/glyphs-vae) and point "
                              "method.components at its pipeline folder")
        parts = load_pipeline(o.components, trust_remote_code=config.teacher.trust_remote_code)
        if not parts.latent or not parts.text_conditioned:
            raise DiffkdError(f"method.components {o.components!r} has no VAE or no text encoder: point it at the "
                              "pipeline the vae method exports (diffkd train-teacher configs/glyphs-vae.yaml)")
        vae = parts.pipeline.vae.requires_grad_(False).eval()
        latent_size = parts.image_size // parts.pipeline.vae_scale_factor
        torch.manual_seed(config.train.seed)
        unet = text_pipeline.build_unet(latent_size, vae.config.latent_channels, o.block_out_channels,
                                        o.layers_per_block, parts.pipeline.text_encoder.config.hidden_size,
                                        o.attention_head_dim, o.cross_attention, o.text_time_embedding)
        scheduler = text_pipeline.build_scheduler(o.beta_start, o.beta_end, o.beta_schedule, o.prediction_type,
                                                  o.num_train_timesteps)
        pipeline = text_pipeline.assemble(vae, parts.pipeline.text_encoder, parts.pipeline.tokenizer, unet, scheduler)
        return LoadedPipeline("new", pipeline, denoiser_of(pipeline))

    def __init__(self, config: Config, teacher: LoadedPipeline, student: torch.nn.Module):
        super().__init__(config, teacher, student)
        self.text_encoder = teacher.pipeline.text_encoder.requires_grad_(True).train()

    def networks(self) -> dict[str, Network]:
        """The UNet (exported) and the text encoder, both with the export EMA, so the saved pair is the averaged
        pair."""
        return {"student": Network(self.student, exported=True, export_ema=True),
                "text_encoder": Network(self.text_encoder, export_ema=True)}

    def rounds(self) -> list[Round]:
        return [Round("text-denoise", self.options.num_steps)]

    def dataset(self) -> dict[str, torch.Tensor]:
        """Latents of the training images (the VAE's mode, scaled), each row's caption as token ids, and the empty
        prompt's ids in every row (the caption-dropout branch)."""
        latents, captions = training_latents(self.teacher, self.config.data)
        if captions is None:
            raise DiffkdError(f"data.source {self.config.data.source!r} has no captions: the text-denoise method "
                              "trains on each image's own caption; use data.source: glyphs")
        ids = self._token_ids([*captions, ""])
        return {"x0": latents, "input_ids": ids[:-1], "uncond_input_ids": ids[-1:].expand(len(captions), -1)}

    def _token_ids(self, captions: list[str]) -> torch.Tensor:
        """The ids StableDiffusionPipeline.encode_prompt gives the text encoder: padded to the model's length."""
        tokenizer = self.teacher.pipeline.tokenizer
        return tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                         return_tensors="pt").input_ids

    def loss(self, phase: str, batch: dict[str, torch.Tensor], generator: torch.Generator) -> LossTerms:
        x = batch["x0"]
        model = self.teacher.denoiser
        t = torch.randint(0, model.num_train_timesteps, (x.shape[0],), generator=generator).to(x.device)
        eps = torch.randn(x.shape, generator=generator).to(x.device)
        if self.options.noise_offset:
            offset = torch.randn(*x.shape[:2], 1, 1, generator=generator).to(x.device)
            eps = eps + self.options.noise_offset * offset
        dropped = (torch.rand(x.shape[0], generator=generator) < self.options.caption_dropout).to(x.device)
        ids = torch.where(dropped[:, None], batch["uncond_input_ids"], batch["input_ids"])
        hidden = self.text_encoder(ids)[0]
        alpha, sigma = model.alpha_sigma(t)
        z = schedule.broadcast(alpha, x) * x + schedule.broadcast(sigma, x) * eps
        target = schedule.from_x0_eps(x, eps, alpha, sigma, model.prediction_type)
        prediction = self.student(z, t, encoder_hidden_states=hidden).sample
        return LossTerms({"denoise": (prediction - target).pow(2).mean()})

    def export_spec(self) -> ExportSpec:
        o = self.options
        self.text_encoder.requires_grad_(False).eval()
        return ExportSpec(self.teacher.scheduler, o.sample_steps, o.prediction_type,
                          card={"stage": "text-denoise", "components": o.components,
                                "caption_dropout": o.caption_dropout, "text_encoder": "trained with the UNet"})
