"""Issue 14 benchmark: progressive students of the epsilon-prediction digits teacher (teachers/digits-eps-16)
against its training-free solvers, over several evaluation seeds.

Each seed is one sweep (the same noise through every setting): the teacher with DDIM, DPM-Solver++ and UniPC at
1, 2, 4, 8 steps and its DDIM-64 reference, and every student at the same k. The figures of merit are the
students' FD at 4 steps over the teacher's DDIM-64 FD and over the best solver's FD at 4 steps, averaged over
the seeds; a student's training time is read from its run's training_summary.json.

    python eval/eps_teacher.py --student runs/eps-progressive/student [--student ...] --seeds 0,1,2,3 --write-results
"""

from __future__ import annotations

import argparse
import json
import logging
import shlex
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from results_file import machine, write_section

from diffkd.evaluation import EvalConfig, evaluate
from diffkd.evaluation.report import fmt, markdown_table

SAMPLERS = ["ddim", "dpmsolver++", "unipc"]
STEPS = [1, 2, 4, 8]
TARGET_STEPS = 4


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher", default="teachers/digits-eps-16")
    parser.add_argument("--student", action="append", default=[], help="student pipeline folder (repeatable)")
    parser.add_argument("--seeds", default="0,1,2,3")
    parser.add_argument("--num-samples", type=int, default=1000)
    parser.add_argument("--output", default=str(Path(__file__).parent / "out" / "eps-teacher"))
    parser.add_argument("--write-results", action="store_true", help="rewrite this benchmark's eval/RESULTS.md section")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")

    started = time.perf_counter()
    sweeps = {}
    for seed in [int(s) for s in args.seeds.split(",")]:
        sweeps[seed] = evaluate(EvalConfig(
            pipelines=[args.teacher, *args.student], teacher=args.teacher, steps=STEPS, samplers=SAMPLERS,
            reference_steps=64, reference="digits", feature="digits-classifier", num_samples=args.num_samples,
            batch_size=250, seed=seed, lpips=False, output=f"{args.output}/seed{seed}")).to_dict()
    seconds = time.perf_counter() - started
    text = section(sweeps, args, seconds)
    print(text)
    if args.write_results:
        write_section("eps-teacher", text)
    return 0


def fd_of(results: dict, model: str, sampler: str, steps: int) -> float:
    return next(r["fd"] for r in results["rows"] if r["model"] == model and r["sampler"] == sampler
                and r["steps"] == steps and not r["is_reference"])


def reference_fd(results: dict) -> float:
    return next(r["fd"] for r in results["rows"] if r["is_reference"])


def section(sweeps: dict[int, dict], args: argparse.Namespace, seconds: float) -> str:
    seeds = list(sweeps)
    first = sweeps[seeds[0]]
    teacher = next(m["name"] for m in first["models"] if m["name"] == Path(args.teacher).name)
    students = [Path(s).parent.name for s in args.student]
    mean = {}
    quality_header = ["model", "sampler", *[f"k={k}" for k in STEPS]]
    quality_body = []
    for sampler in SAMPLERS:
        quality_body.append([teacher, sampler, *[fmt(_mean([fd_of(sweeps[s], teacher, sampler, k) for s in seeds]))
                                                 for k in STEPS]])
    for student in students:
        quality_body.append([student, "own", *[fmt(_mean([fd_of(sweeps[s], student, "own", k) for s in seeds]))
                                               for k in STEPS]])
    quality_body.append([teacher, "ddim-64 (reference)", fmt(_mean([reference_fd(sweeps[s]) for s in seeds])),
                         "", "", ""])

    ratio_header = ["student, 4 steps", *[f"seed {s}" for s in seeds], "mean / DDIM-64 (target <= 1.25)",
                    "mean / best solver at 4 (target <= 0.67)", "training s"]
    ratio_body = []
    for student, folder in zip(students, args.student):
        per_seed, to_reference, to_solver = [], [], []
        for s in seeds:
            fd = fd_of(sweeps[s], student, "own", TARGET_STEPS)
            best = min(fd_of(sweeps[s], teacher, sampler, TARGET_STEPS) for sampler in SAMPLERS)
            to_reference.append(fd / reference_fd(sweeps[s]))
            to_solver.append(fd / best)
            per_seed.append(f"{fmt(fd)} ({to_reference[-1]:.2f}x, {to_solver[-1]:.2f}x)")
        mean[student] = (_mean(to_reference), _mean(to_solver))
        ratio_body.append([student, *per_seed, f"{mean[student][0]:.2f}x", f"{mean[student][1]:.2f}x",
                           _training_seconds(Path(folder).parent)])

    command = "python eval/eps_teacher.py " + " ".join(
        [f"--teacher {shlex.quote(args.teacher)}", *[f"--student {shlex.quote(s)}" for s in args.student],
         f"--seeds {args.seeds}", f"--num-samples {args.num_samples}", "--write-results"])
    return "\n".join([
        "## Epsilon-prediction teacher (issue 14)", "",
        f"- command: `{command}` ({seconds:.0f} s wall)",
        f"- machine: {machine()}, shared with other developers' jobs",
        (f"- FD (digits classifier), {args.num_samples} samples per setting, seeds {args.seeds} (the same noise "
         "through every setting of a seed); solvers set up as their users would for this teacher "
         "(diffkd/sampling.py: trailing spacing, no clipping or thresholding since the teacher does not "
         "clip, second order, ending on sigma = 0)"), "",
        "Mean FD over the seeds:", "",
        markdown_table(quality_header, quality_body), "",
        "Each seed's 4-step FD (ratio to that seed's DDIM-64, ratio to that seed's best solver at 4 steps):", "",
        markdown_table(ratio_header, ratio_body),
    ])


def _training_seconds(run: Path) -> str:
    summary = run / "training_summary.json"
    if not summary.is_file():
        return "-"
    return f"{sum(json.loads(summary.read_text())['round_seconds'].values()):.0f}"


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


if __name__ == "__main__":
    raise SystemExit(main())
