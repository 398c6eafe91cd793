"""Per-row conditioning tensors for training batches, and the Conditioning a batch implies.

Text teachers get their prompts encoded once, up front, with the pipeline's own ``encode_prompt`` (the empty
prompt as the unconditional branch); unconditional teachers get nothing, and every method stays the same.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from diffkd.errors import DiffkdError
from diffkd.io import LoadedPipeline
from diffkd.models import Conditioning


def read_prompts(prompts: Sequence[str], prompts_file: str | None, option: str = "data.prompts_file") -> list[str]:
    """``prompts`` followed by the lines of ``prompts_file`` (blank lines skipped); ``option`` names the file's
    setting in the error a missing file gets."""
    prompts = list(prompts)
    if prompts_file:
        file = Path(prompts_file).expanduser()
        if not file.is_file():
            raise DiffkdError(f"{option} {prompts_file!r} not found: give a text file, one prompt a line")
        prompts += [line.strip() for line in file.read_text().splitlines() if line.strip()]
    return prompts


@torch.no_grad()
def encode_rows(teacher: LoadedPipeline, prompts: Sequence[str], num_rows: int) -> dict[str, torch.Tensor]:
    """Conditioning columns for ``num_rows`` training rows (``prompts`` are cycled over the rows)."""
    if not teacher.text_conditioned:
        return {}
    if not prompts:
        raise DiffkdError("the teacher is text-conditioned but no prompts were given: set data.prompts or "
                          "data.prompts_file")
    prompts = list(prompts)
    device = teacher.unet.device
    embeds, negative = teacher.pipeline.encode_prompt(prompts, device, 1, True, [""] * len(prompts))
    rows = torch.arange(num_rows) % len(prompts)
    return {"encoder_hidden_states": embeds.cpu()[rows], "uncond_encoder_hidden_states": negative.cpu()[rows]}


def batch_conditioning(batch: dict[str, torch.Tensor], guidance_scale: float) -> Conditioning:
    """The teacher's conditioning for a batch drawn from rows made by ``encode_rows``."""
    return Conditioning(encoder_hidden_states=batch.get("encoder_hidden_states"),
                        uncond_encoder_hidden_states=batch.get("uncond_encoder_hidden_states"),
                        class_labels=batch.get("class_labels"), guidance_scale=guidance_scale)
