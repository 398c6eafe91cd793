"""How big a LoRA student's adapter file is next to the UNet it adapts.

The UNet is built on the meta device from a config (no weights, no download): Stable Diffusion 1.5's by default, or
the UNet config of a local pipeline folder (``--unet teachers/glyphs-32``). The adapters go on diffkd's default
targets (LCM-LoRA's layers) or on ``--targets``. Both would be stored in the same dtype, so the ratio of parameter
counts is the ratio of file bytes. Usage:
``python eval/lora_size.py [--unet PIPELINE_FOLDER] [--targets to_q,to_k,...] [RANK ...]``.
"""

from __future__ import annotations

import argparse

import torch
from diffusers import UNet2DConditionModel

from diffkd.config import LORA_TARGETS, LoraOptions
from diffkd.lora import lora_student
from diffkd.trainer import trainable

SD15_UNET = {"sample_size": 64, "in_channels": 4, "out_channels": 4, "cross_attention_dim": 768,
             "attention_head_dim": 8, "block_out_channels": (320, 640, 1280, 1280), "layers_per_block": 2}


def adapter_share(rank: int, unet_config: dict = SD15_UNET, targets: tuple[str, ...] = LORA_TARGETS
                  ) -> tuple[int, int]:
    """(UNet parameters, adapter parameters) at ``rank`` on ``targets``."""
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(unet_config)
        student = lora_student(unet, LoraOptions(rank=rank, target_modules=list(targets)))
    return sum(p.numel() for p in unet.parameters()), sum(p.numel() for p in trainable(student))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("ranks", nargs="*", type=int, default=[4, 16, 64])
    parser.add_argument("--unet", help="a pipeline folder whose unet/config.json to use (default: SD-1.5's shape)")
    parser.add_argument("--targets", help="comma-separated target modules (default: diffkd's, LCM-LoRA's layers)")
    args = parser.parse_args()
    config = UNet2DConditionModel.load_config(args.unet, subfolder="unet") if args.unet else SD15_UNET
    targets = tuple(args.targets.split(",")) if args.targets else LORA_TARGETS
    print("| rank | UNet parameters | adapter parameters | adapter / UNet | fp16 adapter MB |")
    print("|---|---|---|---|---|")
    for rank in args.ranks:
        base, adapters = adapter_share(rank, config, targets)
        print(f"| {rank} | {base:,} | {adapters:,} | {adapters / base:.2%} | {2 * adapters / 1e6:.1f} |")


if __name__ == "__main__":
    main()
