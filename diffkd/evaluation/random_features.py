"""A feature network for images no shipped classifier reads (RGB photo patches, textures): a seeded random CNN.

Randomly initialised convolutional embeddings separate image distributions well enough to rank generators on
domains far from ImageNet (Naeem et al. 2020, "Reliable Fidelity and Diversity Metrics", section 5), and this one
needs neither a download nor a training run: its weights are a pure function of ``RANDOM_CONV_SEED``, drawn here
with an explicit generator, so every machine builds the same network. It is reported as "FD (random conv)".

``LatentRandomConvFeatures`` is the same network reading a latent teacher's latents (any channel count) instead of
decoded images: in-run validation of a latent student then skips the autoencoder's decoder, 29% of validation's
time on the panel's latent teacher and more at SDXL's 1024 px (eval/RESULTS.md, "Validation in latent space").
"""

from __future__ import annotations

import itertools
import math

import torch
import torch.nn.functional as F
from torch import nn

RANDOM_CONV_SEED = 20261206
RANDOM_CONV_SIZE = 16  # images are resized to 16 px: the panel's size, and cheap for larger ones


class RandomConvFeatures(nn.Module):
    """uint8 images (grey repeated to RGB) -> [-1, 1] at 16 px -> three random 3x3 conv + ReLU stages (He-scaled, so
    activations keep their scale), each pooled to 2x2 and concatenated: 4 x (32 + 64 + 64) = 640 features that mix
    colour, edges and larger structure."""

    def __init__(self, seed: int = RANDOM_CONV_SEED, channels: int = 3):
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        widths = (channels, 32, 64, 64)
        self.convs = nn.ModuleList()
        for index, (fan_in, fan_out) in enumerate(itertools.pairwise(widths)):
            conv = nn.Conv2d(fan_in, fan_out, 3, padding=1, stride=1 if index == 0 else 2)
            with torch.no_grad():
                conv.weight.copy_(torch.randn(conv.weight.shape, generator=generator) * math.sqrt(2 / (fan_in * 9)))
                conv.bias.zero_()
            self.convs.append(conv.requires_grad_(False))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.float() / 127.5 - 1
        if x.shape[1] == 1:
            x = x.repeat(1, 3, 1, 1)
        return self.embed(x)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-2:] != (RANDOM_CONV_SIZE, RANDOM_CONV_SIZE):
            x = F.interpolate(x, size=(RANDOM_CONV_SIZE, RANDOM_CONV_SIZE), mode="bilinear", antialias=True,
                              align_corners=False)
        pooled = []
        for conv in self.convs:
            x = F.relu(conv(x))
            pooled.append(F.adaptive_avg_pool2d(x, 2).flatten(1))
        return torch.cat(pooled, 1)


class LatentRandomConvFeatures(RandomConvFeatures):
    """The random network on a latent teacher's latents as they are (unit variance by the autoencoder's scaling
    factor), resized to 16 px like images: its first layer reads ``channels`` latent channels."""

    def __init__(self, channels: int, seed: int = RANDOM_CONV_SEED):
        super().__init__(seed, channels)

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        return self.embed(latents.float())
