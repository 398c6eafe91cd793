"""How far the sampler choice's validation FD can be trusted: a finished consistency run's exported student scored
by the run's own validation machinery (``diffkd.api.scoring``: its reference, feature network and noise stream)
under several scheduler classes, sample counts and validation noise seeds.

    python eval/sampler_validation.py RUN [--samplers LCMScheduler,DDPMScheduler,DDIMScheduler] [--steps 2,4,8]
        [--samples 1024] [--seeds 0] [--spread]

Each scheduler is built by ``from_config`` of the exported one. Prints one line per (seed, sample count): the FD of
each scheduler at each k. ``--spread`` also prints the standard deviation of each scheduler's k-step samples in the
teacher's latent space (pixels for a pixel teacher) beside the training set's: a student whose few-step samples are
far wider than the data is amplifying its error somewhere on its grid.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import diffusers
import torch
import yaml

from diffkd.api import prepare, scoring
from diffkd.conditioning import training_latents
from diffkd.config import parse_config
from diffkd.sampling import scheduler_sample


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run")
    parser.add_argument("--samplers", default="LCMScheduler,DDPMScheduler,DDIMScheduler")
    parser.add_argument("--steps", default="2,4,8")
    parser.add_argument("--samples", default="1024")
    parser.add_argument("--seeds", default="0", help="validation noise seeds (a run's train.seed)")
    parser.add_argument("--spread", action="store_true", help="also the samples' standard deviation per k")
    args = parser.parse_args()
    run = Path(args.run)
    config = parse_config(yaml.safe_load((run / "config.yaml").read_text()))
    config.train.validate_steps = [int(k) for k in args.steps.split(",")]
    teacher, method, _ = prepare(config)
    pipe = diffusers.DiffusionPipeline.from_pretrained(run / "student")
    method.student.load_state_dict(pipe.unet.state_dict())
    spec = method.export_spec()
    schedulers = {name: getattr(diffusers, name).from_config(pipe.scheduler.config)
                  for name in args.samplers.split(",")}
    with tempfile.TemporaryDirectory() as scratch:
        for seed in map(int, args.seeds.split(",")):
            for samples in map(int, args.samples.split(",")):
                config.train.seed, config.train.validate_samples = seed, samples
                validator = scoring(config, teacher, spec, Path(scratch))
                figures = {name: {k: round(fd, 1) for k, fd in validator(method.student, scheduler).items()}
                           for name, scheduler in schedulers.items()}
                print(f"seed {seed}, {samples} samples: {figures}", flush=True)
                if args.spread:
                    print(f"  spread: {spread(teacher, method, validator.noise, schedulers, validator.steps)}")
    if args.spread:
        print(f"  training set spread: {training_latents(teacher, config.data)[0].std().item():.3g}")
    return 0


@torch.no_grad()
def spread(teacher, method, noise: torch.Tensor, schedulers: dict, steps: tuple[int, ...]) -> dict:
    """Standard deviation of each scheduler's k-step samples of ``noise``, in the space the student samples."""
    model = teacher.denoiser.like(method.student, method.prediction_type)
    return {name: {k: round(scheduler_sample(model, type(scheduler).from_config(scheduler.config), noise, k)
                            .std().item(), 3) for k in steps} for name, scheduler in schedulers.items()}


if __name__ == "__main__":
    raise SystemExit(main())
