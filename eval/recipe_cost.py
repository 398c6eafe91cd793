"""Cost of one progressive-distillation step of the google/ddpm-cifar10-32 shape on this machine, for planning a
run of configs/cifar10-progressive.yaml: a random UNet of that exact configuration (35.7 M parameters, saved
locally: the hub is not reachable here) distilled for a few steps at a small batch through ``diffkd.api.distill``.

    python eval/recipe_cost.py [--batch-size 8] [--steps 3] [--work runs/recipe-cost]

Prints parameters, seconds per optimiser step (mean over the round, first step included), peak resident memory
and the size of checkpoints/ after the run.
"""

from __future__ import annotations

import argparse
import json
import logging
import resource
import shutil
from pathlib import Path

import torch
from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel
from PIL import Image

from diffkd.api import distill
from diffkd.config import load_config

ROOT = Path(__file__).resolve().parents[1]


def cifar_teacher(folder: Path) -> Path:
    """google/ddpm-cifar10-32's UNet configuration with random weights, and its DDPM schedule."""
    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=32, in_channels=3, out_channels=3, layers_per_block=2,
                       block_out_channels=(128, 256, 256, 256), dropout=0.1,
                       down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
                       up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"))
    DDPMPipeline(unet=unet, scheduler=DDPMScheduler(num_train_timesteps=1000)).save_pretrained(folder)
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--work", default="runs/recipe-cost")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    teacher = cifar_teacher(work / "teacher")
    images = work / "images"
    images.mkdir()
    for index in range(2 * args.batch_size):
        Image.new("RGB", (32, 32), color=(7 * index % 256, 90, 160)).save(images / f"{index}.png")
    config = load_config(ROOT / "configs/cifar10-progressive.yaml", [
        f"teacher.source={teacher}", f"data.source={images}", "method.start_steps=8", "method.final_steps=4",
        f"method.steps_per_round={args.steps}", f"train.batch_size={args.batch_size}", "train.warmup_steps=0",
        "train.mixed_precision='no'", "train.device=cpu", "run_eval=false"])
    folder = distill(config, work / "run")
    seconds = sum(json.loads((work / "run" / "training_summary.json").read_text())["round_seconds"].values())
    parameters = sum(p.numel() for p in DDPMPipeline.from_pretrained(folder).unet.parameters())
    peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    checkpoints = sum(p.stat().st_size for p in (work / "run" / "checkpoints").rglob("*") if p.is_file()) / 2**20
    print(f"parameters {parameters / 1e6:.1f} M; batch {args.batch_size}; {args.steps} steps in {seconds:.1f} s = "
          f"{seconds / args.steps:.1f} s/step ({seconds / args.steps / args.batch_size:.2f} s per image); "
          f"peak RSS {peak_gb:.1f} GB; checkpoints/ {checkpoints:.0f} MB after the run; torch threads "
          f"{torch.get_num_threads()}")


if __name__ == "__main__":
    main()
