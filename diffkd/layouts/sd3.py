"""Stable Diffusion 3 / 3.5: an MMDiT (``SD3Transformer2DModel``, Esser et al. 2024) on rectified flow, called with
the joint text sequence (two CLIP encoders' states beside T5's, or zeros where ``text_encoder_3`` is None) as
``encoder_hidden_states`` and the two CLIP encoders' pooled embeddings as ``pooled_projections``.

Both come from ``StableDiffusion3Pipeline.encode_prompt`` with the pipeline's defaults (256 T5 tokens), as a plain
``pipe(prompt)`` call makes them; the unconditional branch is its negative (the empty prompt encoded). The network
is called at t = sigma * 1000, the scheduler's timesteps, as the pipeline calls it.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from diffkd.layouts.base import ADDED, Columns, Layout

# MMDiT's attention and feed-forward projections (diffusers' SD3 DreamBooth-LoRA targets, joint blocks included).
SD3_LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")


class SD3Layout(Layout):
    name = "sd3"
    evaluated = False
    component = "transformer"
    lora_targets = SD3_LORA_TARGETS

    @classmethod
    def matches(cls, pipeline) -> bool:
        return type(getattr(pipeline, "transformer", None)).__name__ == "SD3Transformer2DModel"

    def forward(self, network: nn.Module, z: torch.Tensor, t: torch.Tensor, hidden: torch.Tensor | None,
                labels: torch.Tensor | None, timestep_cond: torch.Tensor | None,
                added: dict[str, torch.Tensor] | None) -> torch.Tensor:
        return network(hidden_states=z, timestep=t, encoder_hidden_states=hidden,
                       pooled_projections=added["pooled_projections"], return_dict=False)[0]

    def encode(self, pipeline, prompts: Sequence[str], device: torch.device, latent_size: int
               ) -> tuple[Columns, Columns]:
        prompts = list(prompts)
        embeds, negative, pooled, negative_pooled = pipeline.encode_prompt(
            prompts, prompts, prompts, device=device, num_images_per_prompt=1, do_classifier_free_guidance=True)
        return ({"encoder_hidden_states": embeds, f"{ADDED}pooled_projections": pooled},
                {"uncond_encoder_hidden_states": negative[:1], f"uncond_{ADDED}pooled_projections": negative_pooled[:1]})
