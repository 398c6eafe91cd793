"""CLIPScore (Hessel et al. 2021) through torchmetrics, from a local CLIP folder or a cached hub id only."""

from __future__ import annotations

import torch
from torch import nn

from diffkd.weights import locate_hf_model


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

    folder = locate_hf_model(name_or_path, "CLIPScore", "eval.clip_model")
    return CLIPScore(model_name_or_path=lambda: (
        ProjectedCLIP(CLIPModel.from_pretrained(folder, local_files_only=True).eval()),
        CLIPProcessor.from_pretrained(folder, local_files_only=True)))
