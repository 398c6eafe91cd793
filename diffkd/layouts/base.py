"""The layout adapter of UNet pipelines, and the interface every layout fills in.

A layout is how one pipeline family calls its network and conditions it: which pipeline component is the network,
how a text prompt becomes its conditioning (always the pipeline's own ``encode_prompt``), which further inputs the
network takes beside (z, t) and how latents are shaped for it. The Denoiser calls its network only through a layout,
so methods never ask which family a teacher is; adding a family is one more module in this package.

This base class is Stable Diffusion 1.x/2.x and the unconditional DDPM/DDIM UNets: a UNet2D(Condition)Model called
with ``encoder_hidden_states`` (and ``class_labels``, ``timestep_cond`` when given), the empty prompt as the
unconditional branch of classifier-free guidance.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence

import torch
from torch import nn

from diffkd.config import LORA_TARGETS

Columns = dict[str, torch.Tensor]
ADDED = "added_"  # row columns the network takes by name (Conditioning.added); "uncond_" + ADDED: their CFG pair


def unet_forward(unet: nn.Module, z: torch.Tensor, t: torch.Tensor, hidden: torch.Tensor | None,
                 labels: torch.Tensor | None, timestep_cond: torch.Tensor | None = None,
                 added: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
    """One pass of a diffusers UNet (2D or 2D-condition), passing only the conditioning it was given (``added``:
    SDXL's ``added_cond_kwargs``)."""
    kwargs = {}
    if hidden is not None:
        kwargs["encoder_hidden_states"] = hidden
    if labels is not None:
        kwargs["class_labels"] = labels
    if timestep_cond is not None:
        kwargs["timestep_cond"] = timestep_cond
    if added:
        kwargs["added_cond_kwargs"] = added
    return unet(z, t, **kwargs).sample


def call_default(pipeline, name: str):
    """The default of ``name`` in the pipeline's ``__call__``: what a plain ``pipe(prompt)`` call encodes with."""
    return inspect.signature(type(pipeline).__call__).parameters[name].default


def prediction_half(out: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """A DiT with a learned variance (PixArt, SANA) outputs twice the latent channels; its pipelines read the
    prediction from the first half, and so does diffkd."""
    return out.chunk(2, dim=1)[0] if out.shape[1] == 2 * z.shape[1] else out


def masked_text_columns(embeds: torch.Tensor, mask: torch.Tensor, negative: torch.Tensor,
                        negative_mask: torch.Tensor) -> tuple[Columns, Columns]:
    """Row columns of a text encoder read under its attention mask (T5, Gemma: PixArt, SANA), the mask passed to the
    network by name, and one shared unconditional row."""
    return ({"encoder_hidden_states": embeds, f"{ADDED}encoder_attention_mask": mask},
            {"uncond_encoder_hidden_states": negative[:1], f"uncond_{ADDED}encoder_attention_mask": negative_mask[:1]})


class Layout:
    """Stable Diffusion 1.x/2.x (and unconditional UNet pipelines); subclasses override what their family does
    differently."""

    name = "sd"
    component = "unet"  # the pipeline component that is the network (and that a student replaces)
    autoencoder_component = "vae"  # the component between images and latents (absent from a pixel pipeline)
    lora_targets: tuple[str, ...] = tuple(LORA_TARGETS)  # LCM-LoRA's layers of this family's network
    evaluated = True  # whether diffkd's evaluation sweep samples this family's pipelines (SD's encode_prompt call)

    @classmethod
    def matches(cls, pipeline) -> bool:
        return getattr(pipeline, "unet", None) is not None

    def network(self, pipeline) -> nn.Module:
        return getattr(pipeline, self.component)

    def latent_channels(self, pipeline) -> int:
        return self.network(pipeline).config.in_channels

    def latent_size(self, pipeline, image_size: int | None = None) -> int:
        """Side of the network's (unpacked) latents: ``image_size`` pixels through the VAE, or by default the
        network's own ``sample_size``, what the pipeline samples when no height is given."""
        if image_size is not None:
            return image_size // self.vae_scale(pipeline)
        size = self.network(pipeline).config.sample_size
        return size[0] if isinstance(size, (list, tuple)) else size

    def autoencoder(self, pipeline) -> nn.Module | None:
        return getattr(pipeline, self.autoencoder_component, None)

    def vae_scale(self, pipeline) -> int:
        """Pixels per latent side: the pipeline's own ``vae_scale_factor``, or, where it keeps none (LDMPipeline),
        what the autoencoder's levels make (each but the last halves the side, as diffusers computes it)."""
        autoencoder = self.autoencoder(pipeline)
        if autoencoder is None:
            return 1
        return getattr(pipeline, "vae_scale_factor", None) or 2 ** (len(autoencoder.config.block_out_channels) - 1)

    def forward(self, network: nn.Module, z: torch.Tensor, t: torch.Tensor, hidden: torch.Tensor | None,
                labels: torch.Tensor | None, timestep_cond: torch.Tensor | None,
                added: dict[str, torch.Tensor] | None) -> torch.Tensor:
        """The network's output at (z, t) in the path's parameterisation, latents (B, C, H, W) in and out."""
        return unet_forward(network, z, t, hidden, labels, timestep_cond, added)

    def encode(self, pipeline, prompts: Sequence[str], device: torch.device, latent_size: int
               ) -> tuple[Columns, Columns]:
        """(one row per prompt, one shared row for the unconditional branch) of conditioning columns, made by the
        pipeline's own ``encode_prompt``; the empty prompt is SD's unconditional branch."""
        encode = pipeline.encode_prompt
        return ({"encoder_hidden_states": encode(list(prompts), device, 1, False)[0]},
                {"uncond_encoder_hidden_states": encode([""], device, 1, False)[0]})

    def check_guidance(self, network: nn.Module, guidance_scale: float, guidance_range: object | None) -> None:
        """Refuse a guidance setting this family does not have (raise DiffkdError); CFG families take any."""
