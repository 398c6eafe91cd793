"""SANA (Xie et al. 2024): a linear-attention DiT (``SanaTransformer2DModel``) on rectified flow over a deep-compression
autoencoder's latents, cross-attending to a Gemma-2 decoder's states under their attention mask.

The states come from ``SanaPipeline.encode_prompt`` with what a plain ``pipe(prompt)`` call passes: its default
"complex human instruction" prepended to the prompt (the pipeline keeps the first and the last 299 states) and the
empty negative prompt, unprefixed, as the unconditional branch. The mask travels as a row column beside the states.
The network is called at the scheduler's timestep times its ``timestep_scale``, and where its output has twice the
latent channels (a learned variance) the first half is the prediction, as the pipeline reads it. SANA ships a
DPM-Solver on flow sigmas (``use_flow_sigmas``, ``flow_prediction``); ``diffkd.io.noise_path_of`` reads that as the
rectified-flow path it is.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from diffkd.layouts.base import Columns, Layout, call_default, masked_text_columns, prediction_half

# The linear self-attention, the cross-attention and the projections of SANA's blocks (diffusers' SANA LoRA targets).
SANA_LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")


class SanaLayout(Layout):
    name = "sana"
    evaluated = False
    component = "transformer"
    lora_targets = SANA_LORA_TARGETS

    @classmethod
    def matches(cls, pipeline) -> bool:
        return type(getattr(pipeline, "transformer", None)).__name__ == "SanaTransformer2DModel"

    def forward(self, network: nn.Module, z: torch.Tensor, t: torch.Tensor, hidden: torch.Tensor | None,
                labels: torch.Tensor | None, timestep_cond: torch.Tensor | None,
                added: dict[str, torch.Tensor] | None) -> torch.Tensor:
        out = network(z, encoder_hidden_states=hidden, encoder_attention_mask=added["encoder_attention_mask"],
                      timestep=t * network.config.timestep_scale, return_dict=False)[0]
        return prediction_half(out, z)

    def encode(self, pipeline, prompts: Sequence[str], device: torch.device, latent_size: int
               ) -> tuple[Columns, Columns]:
        embeds, mask, negative, negative_mask = pipeline.encode_prompt(
            list(prompts), do_classifier_free_guidance=True, device=device,
            complex_human_instruction=call_default(pipeline, "complex_human_instruction"))
        return masked_text_columns(embeds, mask, negative, negative_mask)
