"""CLIPScore (Hessel et al. 2021) through torchmetrics, from a local CLIP folder, a cached hub id, or the small
glyphs CLIP that diffkd ships (``glyphs-clip``)."""

from __future__ import annotations

import torch
from torch import nn

from diffkd.errors import DiffkdError
from diffkd.evaluation.glyphs_clip import COMMAND, GLYPHS_CLIP
from diffkd.weights import locate_hf_model

GLYPHS_CLIP_NAME = "glyphs-clip"
REAL_CLIP = "openai/clip-vit-large-patch14"


def auto_clip_model(name: str, reference: str) -> str:
    """What eval.clip_model 'auto' means: the shipped glyphs CLIP for the glyphs reference (a real CLIP knows
    nothing of 32 px glyphs), torchmetrics' default ViT-L/14 otherwise."""
    if name != "auto":
        return name
    return GLYPHS_CLIP_NAME if reference == "glyphs" else REAL_CLIP


def locate_clip(name_or_path: str, purpose: str = "CLIPScore") -> str:
    """The folder of CLIP ``name_or_path``, never downloading; one line naming what is missing and where it goes."""
    if name_or_path == GLYPHS_CLIP_NAME:
        if not (GLYPHS_CLIP / "config.json").is_file():
            raise DiffkdError(f"{purpose} needs the glyphs CLIP, missing from {GLYPHS_CLIP}: run `{COMMAND}` to make "
                              "it there, or pass another CLIP with eval.clip_model")
        return str(GLYPHS_CLIP)
    return locate_hf_model(name_or_path, purpose, "eval.clip_model")


class ProjectedCLIP(nn.Module):
    """transformers >= 5 returns model outputs from ``get_*_features``; torchmetrics' CLIPScore expects the projected
    embeddings as tensors (it divides by their norm). This hands it ``pooler_output``, which is that projection."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.config = model.config

    def get_image_features(self, *args, **kwargs) -> torch.Tensor:
        return _tensor(self.model.get_image_features(*args, **kwargs))

    def get_text_features(self, *args, **kwargs) -> torch.Tensor:
        return _tensor(self.model.get_text_features(*args, **kwargs))


def _tensor(output) -> torch.Tensor:
    return output if isinstance(output, torch.Tensor) else output.pooler_output


def clip_score_metric(name_or_path: str):
    """A torchmetrics CLIPScore on the CLIP model ``name_or_path``, loaded without network access."""
    from torchmetrics.multimodal.clip_score import CLIPScore
    from transformers import CLIPModel, CLIPProcessor

    folder = locate_clip(name_or_path)
    return CLIPScore(model_name_or_path=lambda: (
        ProjectedCLIP(CLIPModel.from_pretrained(folder, local_files_only=True).eval()),
        CLIPProcessor.from_pretrained(folder, local_files_only=True)))
