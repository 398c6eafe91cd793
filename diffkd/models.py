"""Teacher and student as one kind of object: a denoising network plus the schedule and conditioning it needs.

Every method talks to a ``Denoiser``; it never cares whether the network predicts eps, v or x, whether it lives
in a VAE's latent space, or whether classifier-free guidance is folded in. That keeps methods short and lets
later teachers (class-conditional, text-to-image, latent) plug in without touching them.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from diffusers import UNet2DConditionModel
from torch import nn

from diffkd import schedule
from diffkd.layouts.base import Layout
from diffkd.paths import NoisePath, VPPath


@dataclass
class Conditioning:
    """What a conditional UNet takes besides (z, t); all None for an unconditional teacher.

    With ``guidance_scale`` > 1 the teacher runs classifier-free guidance (Ho & Salimans 2022) between
    ``encoder_hidden_states``/``class_labels`` and their unconditional counterparts; a guidance-distilled student
    (Meng et al. 2023) is then trained to give the guided output in one conditional pass. ``guidance_scale`` may be
    a tensor, one w per sample; ``timestep_cond`` is a guidance-embedded UNet's embedding of its w (diffusers'
    ``timestep_cond``, see ``diffkd.guidance_embedding``). ``added`` / ``uncond_added`` are a layout's further
    per-sample inputs by name (SDXL's ``text_embeds`` and ``time_ids``, SD3's and Flux's ``pooled_projections``, a
    guidance-distilled network's ``guidance``): methods pass them along untouched, the layout feeds them to the network.
    """

    encoder_hidden_states: torch.Tensor | None = None
    class_labels: torch.Tensor | None = None
    uncond_encoder_hidden_states: torch.Tensor | None = None
    uncond_class_labels: torch.Tensor | None = None
    guidance_scale: float | torch.Tensor = 1.0
    timestep_cond: torch.Tensor | None = None
    added: dict[str, torch.Tensor] | None = None
    uncond_added: dict[str, torch.Tensor] | None = None

    @property
    def guided(self) -> bool:
        per_sample = isinstance(self.guidance_scale, torch.Tensor)
        return (per_sample or self.guidance_scale != 1.0) and (
            self.uncond_encoder_hidden_states is not None or self.uncond_class_labels is not None)

    def unguided(self) -> Conditioning:
        """The same conditioning for a student that has guidance baked in: one conditional pass."""
        return replace(self, guidance_scale=1.0, uncond_encoder_hidden_states=None, uncond_class_labels=None,
                       uncond_added=None)

    def select(self, index: torch.Tensor) -> Conditioning:
        """Rows ``index`` of every per-sample tensor (for splitting a batch)."""
        return Conditioning(**{k: _rows(v, index) for k, v in self.__dict__.items()})


def _rows(value, index: torch.Tensor):
    if isinstance(value, dict):
        return {k: _rows(v, index) for k, v in value.items()}
    return value[index] if isinstance(value, torch.Tensor) else value


class Denoiser:
    """A denoising network (a UNet, or a layout's transformer) with its noise path, parameterisation, (optional) VAE
    and the layout that calls it.

    ``unet`` may be swapped for a wrapped version (DDP) by the trainer; everything here only calls it, through
    ``layout`` (``diffkd.layouts``: how this pipeline family feeds its network). The network is called at the path's
    timesteps as they are (integer t for a VP path, sigma * T for rectified flow); latents are always (B, C, H, W),
    a layout that packs them (Flux) packs and unpacks inside its call.
    """

    def __init__(self, unet: nn.Module, path: NoisePath | torch.Tensor, prediction_type: str,
                 clip_sample: float | None = None, vae: nn.Module | None = None, layout: Layout | None = None):
        """``path`` may be a DDPM-family ``alphas_cumprod`` tensor, taken as its variance-preserving path; without
        ``layout`` the network is called as a plain diffusers UNet."""
        if prediction_type not in schedule.PREDICTION_TYPES:
            raise ValueError(f"prediction_type must be one of {schedule.PREDICTION_TYPES}, got {prediction_type!r}")
        self.unet = unet
        self.path = VPPath(path) if isinstance(path, torch.Tensor) else path
        self.prediction_type = prediction_type
        self.clip_sample = clip_sample
        self.vae = vae
        self.layout = layout or Layout()

    def like(self, unet: nn.Module, prediction_type: str | None = None, clip: bool = True) -> Denoiser:
        """Another network on this model's path (a student, a fake score): same clip unless ``clip`` is False."""
        return Denoiser(unet, self.path, prediction_type or self.prediction_type, self.clip_sample if clip else None,
                        layout=self.layout)

    @property
    def num_train_timesteps(self) -> int:
        return self.path.num_train_timesteps

    def alpha_sigma(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.path.alpha_sigma(t)

    def output(self, z: torch.Tensor, t: torch.Tensor, cond: Conditioning | None = None) -> torch.Tensor:
        """The raw network output in this model's parameterisation, guided when ``cond`` asks for it."""
        cond = cond or Conditioning()
        t = t.expand(z.shape[0]) if t.ndim == 0 else t
        forward = self.layout.forward
        if not cond.guided:
            return forward(self.unet, z, t, cond.encoder_hidden_states, cond.class_labels, cond.timestep_cond,
                           cond.added)
        hidden = _cat_pair(cond.uncond_encoder_hidden_states, cond.encoder_hidden_states)
        labels = _cat_pair(cond.uncond_class_labels, cond.class_labels)
        extra = None if cond.timestep_cond is None else torch.cat([cond.timestep_cond, cond.timestep_cond])
        added = None if cond.added is None else {k: _cat_pair((cond.uncond_added or {}).get(k), v)
                                                 for k, v in cond.added.items()}
        uncond, conditional = forward(self.unet, torch.cat([z, z]), torch.cat([t, t]), hidden, labels, extra,
                                      added).chunk(2)
        w = cond.guidance_scale
        w = schedule.broadcast(w.to(z.device), z) if isinstance(w, torch.Tensor) else w
        return uncond + w * (conditional - uncond)

    def x0_eps(self, z: torch.Tensor, t: torch.Tensor, cond: Conditioning | None = None
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """Predicted clean sample and noise at (z, t)."""
        t = t.expand(z.shape[0]) if t.ndim == 0 else t
        alpha, sigma = self.alpha_sigma(t)
        out = self.output(z, t, cond).float()
        return schedule.to_x0_eps(out, z.float(), alpha, sigma, self.prediction_type)

    def ddim_step(self, z: torch.Tensor, t: torch.Tensor, s: torch.Tensor, cond: Conditioning | None = None
                  ) -> torch.Tensor:
        """z_t -> z_s by one deterministic DDIM step of this model."""
        x0, eps = self.x0_eps(z, t, cond)
        alpha_s, sigma_s = self.alpha_sigma(s.expand(z.shape[0]) if s.ndim == 0 else s)
        return schedule.ddim_step(x0, eps, alpha_s, sigma_s, self.clip_sample)

    # Latent teachers: images in [-1, 1] <-> the space the UNet works in.
    # SD3's and Flux's VAEs also shift: z = (E(x) - shift) * scale, as their pipelines decode z / scale + shift.
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        if self.vae is None:
            return images
        scale, shift = self.vae.config.scaling_factor, self.vae.config.get("shift_factor")
        latents = autoencoder_latents(self.vae, images)
        return (latents if shift is None else latents - shift) * scale

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        if self.vae is None:
            return latents
        scale, shift = self.vae.config.scaling_factor, self.vae.config.get("shift_factor")
        latents = latents.to(self.vae.dtype) / scale
        return self.vae.decode(latents if shift is None else latents + shift).sample.float()


def _cat_pair(uncond: torch.Tensor | None, cond: torch.Tensor | None) -> torch.Tensor | None:
    if cond is None:
        return None
    return torch.cat([uncond if uncond is not None else torch.zeros_like(cond), cond])


def dummy_inputs(unet: nn.Module, batch_size: int, sample_size: int | None = None) -> dict:
    """Zero inputs of the right shapes for one UNet pass (for timing and for probing feature widths)."""
    config = unet.config
    size = sample_size or config.sample_size
    size = tuple(size) if isinstance(size, (list, tuple)) else (size, size)
    parameter = next(unet.parameters())
    device, dtype = parameter.device, parameter.dtype
    inputs = {"sample": torch.zeros(batch_size, config.in_channels, *size, device=device, dtype=dtype),
              "timestep": torch.full((batch_size,), 500, device=device, dtype=torch.long)}
    if isinstance(unet, UNet2DConditionModel):
        inputs["encoder_hidden_states"] = torch.zeros(batch_size, 1, config.cross_attention_dim, device=device,
                                                      dtype=dtype)
    if config.get("num_class_embeds"):
        inputs["class_labels"] = torch.zeros(batch_size, device=device, dtype=torch.long)
    return inputs


def autoencoder_latents(autoencoder: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """The autoencoder's latents of ``images`` before any scaling: a Gaussian posterior's mode (AutoencoderKL), a
    deterministic latent (SANA's AutoencoderDC), or a VQ encoder's latents before quantisation (VQModel, whose
    decoder quantises: LDMPipeline decodes so)."""
    encoded = autoencoder.encode(images.to(autoencoder.dtype))
    if hasattr(encoded, "latent_dist"):
        return encoded.latent_dist.mode().float()
    return (encoded.latents if hasattr(encoded, "latents") else encoded.latent).float()
