"""Which schedulers a diffkd student may be swapped to: sample an exported student through the plain diffusers
pipeline with each scheduler class built by ``from_config`` from the student's own scheduler (what a diffusers user
does to swap), and score the samples with the digits classifier's Fréchet distance against the real digits.

A swap works when its FD at every k stays near the exported scheduler's; a scheduler that re-noises to its own
sigmas, or that multi-step-extrapolates a model which jumps straight to x0, gives noise (FD in the hundreds).

    python eval/scheduler_swaps.py STUDENT_FOLDER [--samples 500] [--steps 1,2,4,8]

prints a markdown table (rows: schedulers; columns: k) for eval/RESULTS.md.
"""

from __future__ import annotations

import argparse
import importlib
import platform
import sys
import warnings

import torch
from diffusers import DiffusionPipeline

from diffkd.evaluation.features import load_feature_network, to_uint8
from diffkd.evaluation.frechet import frechet_distance, gaussian_stats
from diffkd.evaluation.reference import default_cache_dir, load_real_set

CANDIDATES = ("LCMScheduler", "TCDScheduler", "DDIMScheduler", "DDPMScheduler", "EulerDiscreteScheduler",
              "EulerAncestralDiscreteScheduler", "DPMSolverMultistepScheduler", "DPMSolverSinglestepScheduler",
              "UniPCMultistepScheduler", "HeunDiscreteScheduler")


def sample_fd(pipe, steps: int, count: int, feature, real) -> float | str:
    """FD of ``count`` samples at ``steps`` (seed 0), or the error's class when the scheduler refuses."""
    generator = torch.Generator().manual_seed(0)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            images = pipe(batch_size=count, num_inference_steps=steps, generator=generator, output_type="pt").images
    except Exception as error:  # noqa: BLE001 - the table reports a scheduler's refusal as such
        return type(error).__name__
    pixels = to_uint8(torch.as_tensor(images) * 2 - 1)
    mu, sigma = gaussian_stats(feature(pixels))
    return frechet_distance(mu, sigma, real.mu, real.sigma)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("student")
    parser.add_argument("--samples", type=int, default=500)
    parser.add_argument("--steps", default="1,2,4,8")
    args = parser.parse_args(argv)
    steps = [int(k) for k in args.steps.split(",")]
    pipe = DiffusionPipeline.from_pretrained(args.student)
    pipe.set_progress_bar_config(disable=True)
    own = pipe.scheduler
    size, channels = pipe.unet.config.sample_size, pipe.unet.config.in_channels
    feature = load_feature_network("digits-classifier")
    real = load_real_set("digits", feature, size, channels, default_cache_dir())
    module = importlib.import_module("diffusers")
    print(f"student {args.student}; {args.samples} samples per cell, seed 0; {platform.processor() or 'cpu'}, "
          f"torch {torch.__version__}; command: python eval/scheduler_swaps.py {' '.join(argv or sys.argv[1:])}\n")
    print("| scheduler (from_config of the student's) | " + " | ".join(f"k={k}" for k in steps) + " |")
    print("|---|" + "---:|" * len(steps))
    for name in CANDIDATES:
        pipe.scheduler = getattr(module, name).from_config(own.config)
        cells = [sample_fd(pipe, k, args.samples, feature, real) for k in steps]
        text = [f"{c:.1f}" if isinstance(c, float) else c for c in cells]
        print(f"| {name} | " + " | ".join(text) + " |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
