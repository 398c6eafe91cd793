"""How big a LoRA student's adapter file is next to the UNet it adapts, for Stable Diffusion 1.5's UNet shape.

The UNet is built from SD-1.5's config on the meta device (no weights, no download); the adapters are diffkd's
default targets (LCM-LoRA's layers). Both would be stored in the same dtype, so the ratio of parameter counts is the
ratio of file bytes. Usage: ``python eval/lora_size.py [RANK ...]``.
"""

from __future__ import annotations

import sys

import torch
from diffusers import UNet2DConditionModel

from diffkd.config import LoraOptions
from diffkd.lora import lora_student
from diffkd.trainer import trainable

SD15_UNET = {"sample_size": 64, "in_channels": 4, "out_channels": 4, "cross_attention_dim": 768,
             "attention_head_dim": 8, "block_out_channels": (320, 640, 1280, 1280), "layers_per_block": 2}


def adapter_share(rank: int) -> tuple[int, int]:
    """(UNet parameters, adapter parameters) at ``rank`` on the default targets."""
    with torch.device("meta"):
        unet = UNet2DConditionModel(**SD15_UNET)
        student = lora_student(unet, LoraOptions(rank=rank))
    return sum(p.numel() for p in unet.parameters()), sum(p.numel() for p in trainable(student))


def main(ranks: list[int]) -> None:
    print("| rank | UNet parameters | adapter parameters | adapter / UNet | fp16 adapter MB |")
    print("|---|---|---|---|---|")
    for rank in ranks:
        base, adapters = adapter_share(rank)
        print(f"| {rank} | {base:,} | {adapters:,} | {adapters / base:.2%} | {2 * adapters / 1e6:.1f} |")


if __name__ == "__main__":
    main([int(r) for r in sys.argv[1:]] or [4, 16, 64])
