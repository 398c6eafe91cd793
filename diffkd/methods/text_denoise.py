"""The second stage of a small text-to-image teacher: a UNet2DConditionModel trained on the first stage's latents.

Plain epsilon-prediction diffusion training (Ho et al. 2020) in the latent space of a frozen VAE, conditioned on
each image's caption through a text encoder: a frozen CLIP text tower trained contrastively beforehand, as Stable
Diffusion's (``method.text_encoder``), or one trained with the UNet (LDM's text-to-image model, Rombach et al. 2022,
sec. 4.3). Trained with the UNet, the glyphs teacher's encoder learnt the colour words and left the character
tokens near their random start (its output moved 16% for another character, 59-99% for another colour;
eval/glyphs_prompt_sensitivity.py): that teacher drew the right colours and the character at chance. A tenth of
the rows get the empty prompt instead, so that the one network also predicts unconditionally, which
classifier-free guidance needs (Ho & Salimans 2022). The export is a StableDiffusionPipeline folder holding the
trained UNet beside its text encoder.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch

from diffkd import schedule, text_pipeline
from diffkd.conditioning import captioned_rows, training_latents
from diffkd.config import Config
from diffkd.errors import DiffkdError
from diffkd.io import LoadedPipeline, denoiser_of, load_pipeline
from diffkd.losses.terms import LossTerms
from diffkd.method_options import TextDenoiseConfig
from diffkd.methods.base import ExportSpec, Method, Network, Round
from diffkd.weights import locate_hf_model


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
        text_encoder, tokenizer = parts.pipeline.text_encoder, parts.pipeline.tokenizer
        if o.text_encoder:
            text_encoder, tokenizer = pretrained_text_encoder(o.text_encoder)
        latent_size = parts.image_size // parts.pipeline.vae_scale_factor
        torch.manual_seed(config.train.seed)
        unet = text_pipeline.build_unet(latent_size, vae.config.latent_channels, o.block_out_channels,
                                        o.layers_per_block, text_encoder.config.hidden_size,
                                        o.attention_head_dim, o.cross_attention, o.text_time_embedding)
        scheduler = text_pipeline.build_scheduler(o.beta_start, o.beta_end, o.beta_schedule, o.prediction_type,
                                                  o.num_train_timesteps)
        pipeline = text_pipeline.assemble(vae, text_encoder, tokenizer, unet, scheduler)
        return LoadedPipeline("new", pipeline, denoiser_of(pipeline))

    def __init__(self, config: Config, teacher: LoadedPipeline, student: torch.nn.Module):
        super().__init__(config, teacher, student)
        trained = not self.options.text_encoder  # a pretrained encoder stays frozen
        self.text_encoder = teacher.pipeline.text_encoder.requires_grad_(trained).train(trained)

    def networks(self) -> dict[str, Network]:
        """The UNet (exported) and, unless it is a frozen pretrained one, the text encoder, both with the export
        EMA, so the saved pair is the averaged pair."""
        student = {"student": Network(self.student, exported=True, export_ema=True)}
        if self.options.text_encoder:
            return student
        return {**student, "text_encoder": Network(self.text_encoder, export_ema=True)}

    def rounds(self) -> list[Round]:
        return [Round("text-denoise", self.options.num_steps)]

    def dataset(self) -> dict[str, torch.Tensor]:
        """Latents of the training images (the VAE's mode, scaled), each row's caption as token ids, and the empty
        prompt's ids in every row (the caption-dropout branch). A captioned set on disk is streamed."""
        streamed = captioned_rows(self.teacher, self.config.data, self._encode)
        if streamed is not None:
            return streamed
        latents, captions = training_latents(self.teacher, self.config.data)
        if captions is None:
            raise DiffkdError(f"data.source {self.config.data.source!r} has no captions: the text-denoise method "
                              "trains on each image's own caption; use data.source: glyphs")
        ids = self._token_ids([*captions, ""])
        return {"x0": latents, "input_ids": ids[:-1], "uncond_input_ids": ids[-1:].expand(len(captions), -1)}

    @torch.no_grad()
    def _encode(self, pixels: torch.Tensor, captions: list[str]) -> dict[str, torch.Tensor]:
        """One streamed batch as ``dataset``'s in-memory rows look."""
        latents = self.teacher.denoiser.encode(pixels.to(self.teacher.unet.device)).cpu()
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
        index = torch.randint(0, model.num_train_timesteps, (x.shape[0],), generator=generator).to(x.device)
        t = model.path.timesteps_at(index)
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
        return ExportSpec(self.teacher.scheduler, o.sample_steps, o.prediction_type,
                          card={"stage": "text-denoise", "components": o.components,
                                "caption_dropout": o.caption_dropout,
                                "text_encoder": o.text_encoder or "trained with the UNet"})


def pretrained_text_encoder(name_or_path: str):
    """The text tower and tokenizer of a CLIP folder or cached hub id, as Stable Diffusion takes CLIP ViT-L/14's
    (``CLIPTextModel`` reads the text half of a ``CLIPModel`` checkpoint); never downloads."""
    from transformers import CLIPTextModel, CLIPTokenizer

    folder = locate_hf_model(name_or_path, "method.text_encoder", "method.text_encoder")
    try:
        with _quiet_transformers():
            encoder = CLIPTextModel.from_pretrained(folder, local_files_only=True)  # the image tower is left out
        tokenizer = CLIPTokenizer.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError) as error:
        raise DiffkdError(f"method.text_encoder {name_or_path!r} is not a CLIP model with its tokenizer ({error}); "
                          "make one with `python -m diffkd.evaluation.glyphs_clip --seed 1 --output DIR`") from None
    return encoder.requires_grad_(False).eval(), tokenizer


@contextlib.contextmanager
def _quiet_transformers():
    """transformers reports every image-tower weight a CLIPModel checkpoint holds as unexpected; they are, here."""
    from transformers.utils import logging as transformers_logging

    verbosity, bar = transformers_logging.get_verbosity(), transformers_logging.is_progress_bar_enabled()
    transformers_logging.set_verbosity_error()
    transformers_logging.disable_progress_bar()
    try:
        yield
    finally:
        transformers_logging.set_verbosity(verbosity)
        if bar:
            transformers_logging.enable_progress_bar()

