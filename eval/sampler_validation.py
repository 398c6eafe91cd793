"""How far the sampler choice's validation FD can be trusted: a finished consistency run's exported student scored
by the run's own validation machinery (``diffkd.api.scoring``: its reference, feature network and noise stream)
under several scheduler classes, sample counts and validation noise seeds.

    python eval/sampler_validation.py RUN [--samplers LCMScheduler,DDPMScheduler,DDIMScheduler] [--steps 2,4,8]
        [--samples 1024] [--seeds 0]

Each scheduler is built by ``from_config`` of the exported one. Prints one line per (seed, sample count): the FD of
each scheduler at each k.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import diffusers
import yaml

from diffkd.api import prepare, scoring
from diffkd.config import parse_config


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run")
    parser.add_argument("--samplers", default="LCMScheduler,DDPMScheduler,DDIMScheduler")
    parser.add_argument("--steps", default="2,4,8")
    parser.add_argument("--samples", default="1024")
    parser.add_argument("--seeds", default="0", help="validation noise seeds (a run's train.seed)")
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
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
