"""A flow consistency student's FD at k = 2 and 4 with its FlowMatchLCM grid ending at each sigma of --ends, on noise
seeds the evaluation does not use: how ``diffkd.paths.CONSISTENCY_LAST_SIGMA`` was chosen.

    python eval/flow_grid_end.py --run runs/flow-consistency --teacher teachers/digits-flow-16 \
        [--ends default,0.4,0.5,0.6] [--seeds 10,11,12,13,14,15] [--num-samples 1000]

"default" is diffusers' own grid, linspace(1, 1/T, k). Each seed's reference is the teacher's Euler-64 FD on that
seed's noise (sampled here); the ratio is the mean FD over the mean reference, as in eval/student_seeds.py.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from diffusers import FlowMatchLCMScheduler

sys.path.insert(0, str(Path(__file__).parent))

from student_seeds import mean_ratio, sampled_fd

from diffkd.evaluation.features import load_feature_network
from diffkd.evaluation.formatting import markdown_table
from diffkd.evaluation.reference import default_cache_dir, load_real_set
from diffkd.io import load_pipeline
from diffkd.sampling import ddim_sample, scheduler_sample


def grid_sampler(path, end: str):
    """A sampler ``(model, noise, steps)`` with a fresh FlowMatchLCM whose grid ends at ``end``."""
    def scheduler():
        if end == "default":
            return FlowMatchLCMScheduler(num_train_timesteps=path.num_train_timesteps)
        built = path.consistency_scheduler(None, 50, "flow", None, 10.0)
        built.register_to_config(sigma_min=float(end))
        return built
    return lambda model, noise, steps: scheduler_sample(model, scheduler(), noise, steps)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", required=True)
    parser.add_argument("--teacher", required=True)
    parser.add_argument("--ends", default="default,0.4,0.5,0.6")
    parser.add_argument("--seeds", default="10,11,12,13,14,15")
    parser.add_argument("--num-samples", type=int, default=1000)
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    feature = load_feature_network("digits-classifier")
    teacher, student = load_pipeline(args.teacher), load_pipeline(str(Path(args.run) / "student"))
    real = load_real_set("digits", feature, teacher.image_size, teacher.image_channels, default_cache_dir())
    references = [sampled_fd(teacher.denoiser, ddim_sample, 64, seed, args.num_samples, feature, real)
                  for seed in seeds]
    print("teacher Euler-64 FD per seed:", [round(fd, 2) for fd in references], flush=True)
    body = []
    for end in args.ends.split(","):
        sample = grid_sampler(student.denoiser.path, end)
        ratios = [mean_ratio([sampled_fd(student.denoiser, sample, k, seed, args.num_samples, feature, real)
                              for seed in seeds], references) for k in (2, 4)]
        body.append([end, *(f"{r:.2f}x" for r in ratios), f"{sum(ratios):.2f}"])
        print(markdown_table(["grid end", "k = 2", "k = 4", "sum"], body), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
