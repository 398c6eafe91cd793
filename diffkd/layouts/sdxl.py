"""Stable Diffusion XL: a UNet conditioned on two text encoders' concatenated states plus ``added_cond_kwargs``, the
second encoder's pooled embedding (``text_embeds``) and the micro-conditioning ``time_ids`` (original size, crop,
target size; Podell et al. 2023, sec. 2.2).

Both come from ``StableDiffusionXLPipeline``'s own ``encode_prompt`` and ``_get_add_time_ids``, at the size the
student is distilled at with no crop, as the pipeline conditions a plain ``pipe(prompt)`` call; the unconditional
branch is the pipeline's own negative (zeros where ``force_zeros_for_empty_prompt``, as SDXL base ships).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from diffkd.layouts.base import ADDED, Columns, Layout


class SDXLLayout(Layout):
    name = "sdxl"
    evaluated = False

    @classmethod
    def matches(cls, pipeline) -> bool:
        return getattr(pipeline, "unet", None) is not None and hasattr(pipeline, "text_encoder_2") \
            and hasattr(pipeline, "_get_add_time_ids")

    def encode(self, pipeline, prompts: Sequence[str], device: torch.device, latent_size: int
               ) -> tuple[Columns, Columns]:
        embeds, negative, pooled, negative_pooled = pipeline.encode_prompt(
            list(prompts), device=device, num_images_per_prompt=1, do_classifier_free_guidance=True)
        side = latent_size * self.vae_scale(pipeline)
        projection = (pipeline.text_encoder_2.config.projection_dim if pipeline.text_encoder_2 is not None
                      else int(pooled.shape[-1]))
        time_ids = pipeline._get_add_time_ids((side, side), (0, 0), (side, side), embeds.dtype,
                                              text_encoder_projection_dim=projection).to(device)
        rows = len(prompts)
        return ({"encoder_hidden_states": embeds, f"{ADDED}text_embeds": pooled,
                 f"{ADDED}time_ids": time_ids.expand(rows, -1)},
                {"uncond_encoder_hidden_states": negative[:1], f"uncond_{ADDED}text_embeds": negative_pooled[:1],
                 f"uncond_{ADDED}time_ids": time_ids})
