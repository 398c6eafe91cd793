"""How a consistency student's k-step quality depends on its multistep sampler (ratios to the teacher's
DDIM-64 FD).

The exported LCMScheduler re-noises each step's x0 with fresh noise; TCDScheduler (Zheng et al. 2024) first
takes a deterministic step to (1 - eta) of the next timestep with the same x0 and its implied noise, then
re-noises only the rest (eta = 1 is LCM's re-noising, eta = 0 deterministic DDIM); DDPMScheduler is the
ancestral posterior step, DDIMScheduler the deterministic one on its own trailing grid. Each sampler is the
student's folder with its scheduler swapped by ``from_config`` (what a diffusers user does), scored by
``diffkd evaluate``'s machinery at k = 2 and 4 over evaluation seeds and divided by the teacher's per-seed
DDIM-64 FD. TCD's eta is an argument of ``step``, not of its config: ``DDPMPipeline`` passes none, so its
default (0.3) is what a pixel student's user gets; ``tcd-ETA`` with another value patches that default for
this measurement.

    python eval/consistency_samplers.py STUDENT --teacher TEACHER --reference REF [--feature F]
        [--samplers lcm,ddpm,tcd-0.3,tcd-0.1,tcd-0.0,ddim] [--seeds 0,1,2,3] [--num-samples 1000]
        [--output DIR]

Each sampler is built from the exported scheduler's config (LCM's own keys, when the run exported DDPM or DDIM,
fall back to their defaults: 50 grid points and scaling 10, the default recipe's). Prints a markdown table (one
row per sampler) for eval/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from contextlib import contextmanager
from pathlib import Path
from statistics import mean

sys.path.insert(0, str(Path(__file__).parent))

from panel import ratios  # the panel's: student FD over the teacher's DDIM-64 FD of the same seed

ROOT = Path(__file__).resolve().parent.parent
SCHEDULERS = {"lcm": "LCMScheduler", "tcd": "TCDScheduler", "ddpm": "DDPMScheduler", "ddim": "DDIMScheduler"}


def swapped(student: Path, sampler: str, folder: Path) -> Path:
    """``student`` if it was exported with ``sampler``'s scheduler class, else a copy whose pipeline loads that class
    from its own scheduler config, in a DDPMPipeline (a DDIMPipeline would turn any scheduler into DDIM)."""
    name = SCHEDULERS[sampler.split("-")[0]]
    if name == json.loads((student / "scheduler" / "scheduler_config.json").read_text())["_class_name"]:
        return student
    if not folder.is_dir():
        shutil.copytree(student, folder)
        index = json.loads((folder / "model_index.json").read_text())
        config = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
        index["scheduler"], config["_class_name"] = ["diffusers", name], name
        index["_class_name"] = "DDPMPipeline"
        (folder / "model_index.json").write_text(json.dumps(index, indent=2))
        (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(config, indent=2))
    return folder


@contextmanager
def tcd_eta(sampler: str):
    """TCDScheduler.step's default eta set to the sampler's (``tcd-0.1``), restored afterwards."""
    from diffusers import TCDScheduler

    defaults = TCDScheduler.step.__defaults__
    if sampler.startswith("tcd-"):
        TCDScheduler.step.__defaults__ = (float(sampler.split("-", 1)[1]), *defaults[1:])
    try:
        yield
    finally:
        TCDScheduler.step.__defaults__ = defaults


def main() -> int:
    from diffkd.eval_options import EvalConfig
    from diffkd.evaluation.sweep import evaluate

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("student")
    parser.add_argument("--teacher", required=True)
    parser.add_argument("--reference", required=True, help="real images: digits, or a folder")
    parser.add_argument("--feature", default="auto")
    parser.add_argument("--samplers", default="lcm,ddpm,tcd-0.3,tcd-0.1,tcd-0.0,ddim")
    parser.add_argument("--seeds", default="0,1,2,3")
    parser.add_argument("--num-samples", type=int, default=1000)
    parser.add_argument("--output", default=str(ROOT / "eval" / "out" / "consistency-samplers"))
    args = parser.parse_args()
    out, student = Path(args.output), Path(args.student)
    lines = ["| sampler | seeds | k=2 / DDIM-64 | k=4 / DDIM-64 | k=4 per seed |", "|---|---|---|---|---|"]
    for sampler in args.samplers.split(","):
        pipeline = swapped(student, sampler, out / sampler)
        figures = []
        for seed in map(int, args.seeds.split(",")):
            with tcd_eta(sampler):
                results = evaluate(EvalConfig(
                    pipelines=[str(pipeline)], teacher=args.teacher, steps=[2, 4], samplers=["ddim"],
                    reference=args.reference, feature=args.feature, num_samples=args.num_samples, seed=seed,
                    fidelity=False, output=str(out / f"{sampler}-seed{seed}")))
            figure = ratios(results.to_dict())
            figures.append((figure["student_2"], figure["student_4"]))
        lines.append(f"| {sampler} | {len(figures)} | {mean(f[0] for f in figures):.2f} | "
                     f"{mean(f[1] for f in figures):.2f} | {' / '.join(f'{f[1]:.2f}' for f in figures)} |")
        print(lines[-1], flush=True)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
