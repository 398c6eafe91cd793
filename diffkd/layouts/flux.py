"""Flux.1: an MMDiT (``FluxTransformer2DModel``) on rectified flow over 2x2-packed latents with rotary image and
text position ids, conditioned on T5's states (``encoder_hidden_states``) and CLIP's pooled embedding
(``pooled_projections``).

Flux-dev is guidance-distilled: it has no unconditional branch, its guidance scale is an input (``guidance``,
embedded beside the timestep), so its real score at w is one pass with w embedded, not classifier-free guidance.
``encode`` therefore returns no unconditional columns, and a batch's guidance scale reaches the network as the
``guidance`` input (``diffkd.conditioning.batch_conditioning``); a student keeps that input, so the exported
``FluxPipeline(prompt, guidance_scale=w)`` samples as it was trained. Flux-schnell has no guidance input and takes
w = 1 only. Packing, ids and prompt encoding are ``FluxPipeline``'s own helpers; the network is called at
t = sigma (the pipeline's timestep / 1000).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from diffusers import FluxPipeline
from torch import nn

from diffkd.errors import DiffkdError
from diffkd.layouts.base import ADDED, Columns, Layout

# The attention and feed-forward projections of Flux's double and single blocks (diffusers' Flux LoRA targets).
FLUX_LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
                     "proj_mlp", "proj_out")


class FluxLayout(Layout):
    name = "flux"
    evaluated = False
    component = "transformer"
    lora_targets = FLUX_LORA_TARGETS

    @classmethod
    def matches(cls, pipeline) -> bool:
        return type(getattr(pipeline, "transformer", None)).__name__ == "FluxTransformer2DModel"

    def latent_channels(self, pipeline) -> int:
        return self.network(pipeline).config.in_channels // 4  # packed 2x2

    def latent_size(self, pipeline, image_size: int | None = None) -> int:
        """FluxPipeline's latent side for ``image_size`` pixels (by default its 128 latents, 1024 px): even, since
        latents are packed 2x2."""
        scale = self.vae_scale(pipeline)
        if image_size is None:
            return 2 * (pipeline.default_sample_size // 2)
        return 2 * (image_size // (scale * 2))

    def forward(self, network: nn.Module, z: torch.Tensor, t: torch.Tensor, hidden: torch.Tensor | None,
                labels: torch.Tensor | None, timestep_cond: torch.Tensor | None,
                added: dict[str, torch.Tensor] | None) -> torch.Tensor:
        batch, channels, height, width = z.shape
        packed = FluxPipeline._pack_latents(z, batch, channels, height, width)
        image_ids = FluxPipeline._prepare_latent_image_ids(batch, height // 2, width // 2, z.device, z.dtype)
        text_ids = torch.zeros(hidden.shape[1], 3, device=z.device, dtype=hidden.dtype)
        guidance = added.get("guidance") if network.config.guidance_embeds else None
        out = network(hidden_states=packed, timestep=t / 1000, guidance=guidance, encoder_hidden_states=hidden,
                      pooled_projections=added["pooled_projections"], txt_ids=text_ids, img_ids=image_ids,
                      return_dict=False)[0]
        return FluxPipeline._unpack_latents(out, height, width, 1)

    def encode(self, pipeline, prompts: Sequence[str], device: torch.device, latent_size: int
               ) -> tuple[Columns, Columns]:
        embeds, pooled, _ = pipeline.encode_prompt(list(prompts), device=device, num_images_per_prompt=1)
        return {"encoder_hidden_states": embeds, f"{ADDED}pooled_projections": pooled}, {}

    def check_guidance(self, network: nn.Module, guidance_scale: float, guidance_range: object | None) -> None:
        if guidance_range is not None:
            raise DiffkdError("method.guidance draws classifier-free guidance scales, and Flux has no CFG: its "
                              "guidance is an embedded input the student keeps; drop method.guidance and set "
                              "method.guidance_scale (3.5 is FluxPipeline's default)")
        if not network.config.guidance_embeds and guidance_scale != 1.0:
            raise DiffkdError(f"method.guidance_scale={guidance_scale}: this Flux has no guidance input (schnell-"
                              "like, guidance_embeds=false) and no CFG branch; set method.guidance_scale=1")
