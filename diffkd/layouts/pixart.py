"""PixArt-Sigma (Chen et al. 2024): a DiT (``PixArtTransformer2DModel``) on a DDPM-family (VP) schedule with a
learned variance, cross-attending to T5's states under their attention mask.

The states come from ``PixArtSigmaPipeline.encode_prompt`` with what a plain ``pipe(prompt)`` call passes (its
``clean_caption`` and ``max_sequence_length`` defaults); the unconditional branch is the empty negative prompt. The
mask travels as a row column beside the states; the network takes no resolution or aspect-ratio inputs (the Sigma
pipeline passes None), and where its output has twice the latent channels the first half is the prediction, as the
pipeline reads it. PixArt-Alpha's 1024 px transformer, which does take resolution and aspect-ratio inputs, is not
matched. ``PixArtSigmaPipeline`` cannot load LoRA adapters, so its students are full ones.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from diffkd.layouts.base import Columns, Layout, call_default, masked_text_columns, prediction_half

PIXART_LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")


class PixArtLayout(Layout):
    name = "pixart"
    evaluated = False
    component = "transformer"
    lora_targets = PIXART_LORA_TARGETS

    @classmethod
    def matches(cls, pipeline) -> bool:
        network = getattr(pipeline, "transformer", None)
        return type(network).__name__ == "PixArtTransformer2DModel" and not network.use_additional_conditions

    def forward(self, network: nn.Module, z: torch.Tensor, t: torch.Tensor, hidden: torch.Tensor | None,
                labels: torch.Tensor | None, timestep_cond: torch.Tensor | None,
                added: dict[str, torch.Tensor] | None) -> torch.Tensor:
        out = network(z, encoder_hidden_states=hidden, encoder_attention_mask=added["encoder_attention_mask"],
                      timestep=t, added_cond_kwargs={"resolution": None, "aspect_ratio": None}, return_dict=False)[0]
        return prediction_half(out, z)

    def encode(self, pipeline, prompts: Sequence[str], device: torch.device, latent_size: int
               ) -> tuple[Columns, Columns]:
        embeds, mask, negative, negative_mask = pipeline.encode_prompt(
            list(prompts), do_classifier_free_guidance=True, device=device,
            clean_caption=call_default(pipeline, "clean_caption"),
            max_sequence_length=call_default(pipeline, "max_sequence_length"))
        return masked_text_columns(embeds, mask, negative, negative_mask)
