"""A distilled digits student's FD at k steps over several evaluation seeds, without re-sampling the teacher: each
seed's DDIM-64 reference FD comes from a methods-table run (eval/methods_table.py writes one results.json per seed),
and the student is sampled with its own exported scheduler on the same noise (sweep.batch_noise), so its ratios are
the methods table's. A screening tool for recipe changes: a four-seed student costs 7 passes per image here against
92 for the whole table.

    python eval/student_seeds.py --student NAME=RUN [--student ...] [--steps 1,2,4] [--seeds 0,1,2,3]
        [--reference eval/out/methods-table] [--grid 999,499,-1 ...] [--samplers LCMScheduler,DDPMScheduler]

--grid also samples the student's UNet by DDIM on that timestep grid (ending -1, the clean sample): which step of
a multi-step student is the weak one. --samplers: one row per scheduler class, each built by ``from_config`` of the
exported one (default: the exported one alone).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import diffusers
import torch

sys.path.insert(0, str(Path(__file__).parent))

from methods_table import named_run

from diffkd.evaluation.features import load_feature_network, to_uint8
from diffkd.evaluation.formatting import fmt, markdown_table
from diffkd.evaluation.reference import default_cache_dir, load_real_set
from diffkd.evaluation.sweep import batch_noise
from diffkd.io import load_pipeline
from diffkd.models import Denoiser
from diffkd.sampling import ddim_sample, scheduler_sample


def reference_fd(folder: Path, seed: int) -> tuple[float, int]:
    """The teacher's reference FD of one seed's methods-table results, and its sample count."""
    results = json.loads((folder / f"seed{seed}" / "results.json").read_text())
    row = next(r for r in results["rows"] if r["is_reference"])
    return row["fd"], row["num_samples"]


def own_scheduler(pipe):
    """A sampler ``(model, noise, steps)`` with a fresh copy of the pipeline's exported scheduler per call."""
    return with_scheduler(pipe.scheduler)


def with_scheduler(scheduler):
    """A sampler ``(model, noise, steps)`` with a fresh copy of ``scheduler`` per call."""
    return lambda model, noise, steps: scheduler_sample(model, type(scheduler).from_config(scheduler.config),
                                                        noise, steps, None)


@torch.no_grad()
def sampled_fd(model: Denoiser, sample, steps: int, seed: int, num_samples: int, feature, real,
               batch: int = 250) -> float:
    """FD of ``num_samples`` images of ``sample(model, noise, steps)``, on the sweep's noise of ``seed``."""
    shape = (model.unet.config.in_channels, model.unet.config.sample_size, model.unet.config.sample_size)
    features = []
    for index, start in enumerate(range(0, num_samples, batch)):
        noise = batch_noise(shape, seed, index, min(batch, num_samples - start), torch.device("cpu"))
        features.append(feature(to_uint8(model.decode(sample(model, noise, steps)))))
    return real.frechet_distance(torch.cat(features))


def on_grid(grid: list[int]):
    """A sampler ``(model, noise, steps)`` that runs DDIM on ``grid`` whatever ``steps`` says."""
    return lambda model, noise, steps: ddim_sample(model, noise, len(grid) - 1, grid=grid)


def mean_ratio(fds: list[float], references: list[float]) -> float:
    """The methods table's ratio: the mean FD over the seeds over the mean reference FD."""
    return sum(fds) / sum(references)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--student", action="append", default=[], metavar="NAME=RUN", required=True)
    parser.add_argument("--steps", default="1,2,4")
    parser.add_argument("--seeds", default="0,1,2,3")
    parser.add_argument("--reference", default=str(Path(__file__).parent / "out" / "methods-table"),
                        help="an eval/methods_table.py output folder (seedN/results.json)")
    parser.add_argument("--teacher", help="sample this teacher's DDIM-64 reference here instead of --reference's")
    parser.add_argument("--num-samples", type=int, default=1000, help="with --teacher (else the reference's count)")
    parser.add_argument("--grid", action="append", default=[], help="also DDIM on this grid, e.g. 999,499,-1")
    parser.add_argument("--samplers", default="", help="scheduler classes to sample with (default: the exported)")
    args = parser.parse_args()
    steps, seeds = [int(k) for k in args.steps.split(",")], [int(s) for s in args.seeds.split(",")]
    feature = load_feature_network("digits-classifier")
    if args.teacher:
        teacher = load_pipeline(args.teacher)
        real = load_real_set("digits", feature, teacher.image_size, teacher.image_channels, default_cache_dir())
        references = {seed: (sampled_fd(teacher.denoiser, ddim_sample, 64, seed, args.num_samples, feature, real),
                             args.num_samples) for seed in seeds}
        print("teacher DDIM-64 FD per seed:", {seed: fmt(fd) for seed, (fd, _) in references.items()}, flush=True)
    else:
        references = {seed: reference_fd(Path(args.reference), seed) for seed in seeds}
    reference_fds = [references[seed][0] for seed in seeds]
    body = []
    rows = [(name, run, sampler) for name, run in (named_run(s) for s in args.student)
            for sampler in (args.samplers.split(",") if args.samplers else [""])]
    for name, run, sampler in rows:
        pipe = load_pipeline(str(Path(run) / "student"))
        real = load_real_set("digits", feature, pipe.image_size, pipe.image_channels, default_cache_dir())
        if sampler:
            pipe.pipeline.scheduler = getattr(diffusers, sampler).from_config(pipe.pipeline.scheduler.config)
            name = f"{name} ({sampler})"
        samplers = {f"k={k}": (own_scheduler(pipe.pipeline), k) for k in steps}
        samplers |= {f"grid {grid}": (on_grid([int(t) for t in grid.split(",")]), 0) for grid in args.grid}
        fds = {column: [sampled_fd(pipe.denoiser, sample, k, seed, references[seed][1], feature, real)
                        for seed in seeds] for column, (sample, k) in samplers.items()}
        body.append([name] + [f"{fmt(mean_ratio(fds[c], reference_fds))}x "
                              f"({', '.join(fmt(fd / ref) for fd, ref in zip(fds[c], reference_fds))})" for c in fds])
        print(markdown_table(["student"] + [f"{c}: mean FD / mean DDIM-64 (per seed)" for c in samplers], body),
              flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
