"""Benchmark of issue 2: how close does each k-step sampler get to the teacher's DDIM-64 output, same noise?

Distils the embedded default to k = 2 and k = 4 (configs/digits-progressive.yaml), then sweeps the students and the
teacher with DDIM, DPM-Solver++ and UniPC at those k, and writes the 'progressive-fidelity' section of
eval/RESULTS.md. Targets: the student beats every training-free sampler by >= 5 dB PSNR at k = 2, >= 1 dB at k = 4.

    python eval/progressive_fidelity.py [--device cpu] [--num-samples 1000] [--work runs/bench-progressive]
    [--skip-distill]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from results_file import machine, write_section

from diffkd.api import distill
from diffkd.config import load_config
from diffkd.evaluation import EvalConfig, evaluate

CONFIG = "configs/digits-progressive.yaml"
TARGET_DB = {2: 5.0, 4: 1.0}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--num-samples", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", default="runs/bench-progressive")
    parser.add_argument("--skip-distill", action="store_true",
                        help="evaluate the students already in --work/k2 and --work/k4 (e.g. distilled in parallel)")
    args = parser.parse_args()
    work, started = Path(args.work), time.perf_counter()

    shared = ["run_eval=false", f"train.device={args.device}", f"train.seed={args.seed}"]
    base = load_config(CONFIG, shared)  # every k distils the same teacher with the same steps per round
    students, rounds = {}, {}
    for k in TARGET_DB:
        students[k] = str(work / f"k{k}" / "student")
        if not args.skip_distill:
            distill(load_config(CONFIG, [f"method.final_steps={k}", *shared]), work / f"k{k}", overwrite=True)
        rounds[k] = json.loads((work / f"k{k}" / "training_summary.json").read_text())["round_seconds"]

    teacher = base.teacher.source
    results = evaluate(EvalConfig(pipelines=[teacher, *students.values()], teacher=teacher, steps=list(TARGET_DB),
                                  num_samples=args.num_samples, device=args.device, seed=args.seed,
                                  output=str(work / "eval"))).to_dict()
    write_section("progressive-fidelity", report(results, students, rounds, args, time.perf_counter() - started,
                                                 base.method.steps_per_round))


def report(results: dict, students: dict[int, str], rounds: dict[int, dict], args, seconds: float,
           steps_per_round: int) -> str:
    rows = results["rows"]
    reference = next(r for r in rows if r["is_reference"])
    lines = [
        "## Progressive distillation: fidelity to the teacher's DDIM-64 output (issue 2)", "",
        f"- machine: {machine()}; device `{args.device}`",
        (f"- command: `python eval/progressive_fidelity.py --device {args.device} --num-samples {args.num_samples}"
         + (f" --skip-distill` (seed {args.seed}; {seconds / 60:.1f} min of evaluation; the students were distilled "
            "beforehand by the same config)" if args.skip_distill else
            f"` (seed {args.seed}; {seconds / 60:.1f} min in all)")),
        (f"- {args.num_samples} samples per setting, same noise for every setting; PSNR in dB to the teacher's "
        f"{reference['sampler']}-{reference['steps']} output (per image on [0, 1] after uint8 rounding, averaged); "
        f"speed-up = teacher "
        f"{reference['sampler']}-{reference['steps']} time / setting time, same batch."), "",
        ("| k | student | teacher DDIM | DPM-Solver++ | UniPC | student − best solver | target | met | "
        "student ms/image | speed-up vs DDIM-64 |"),
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    names = {m["source"]: m["name"] for m in results["models"]}
    for k, folder in students.items():
        student = next(r for r in rows if r["model"] == names[folder] and r["steps"] == k)
        solvers = {r["sampler"]: r["psnr"] for r in rows if r["role"] == "teacher" and r["steps"] == k
                   and not r["is_reference"]}
        margin = student["psnr"] - max(solvers.values())
        lines.append(f"| {k} | {student['psnr']:.2f} | {solvers.get('ddim', float('nan')):.2f} | "
                     f"{solvers.get('dpmsolver++', float('nan')):.2f} | {solvers.get('unipc', float('nan')):.2f} | "
                     f"{margin:+.2f} | ≥ {TARGET_DB[k]:+.1f} | {'yes' if margin >= TARGET_DB[k] else 'NO'} | "
                     f"{student['ms_per_image']:.3f} | {student['speedup']:.1f}× |")
    lines += ["", f"Distillation wall time per halving (seconds, {steps_per_round} training steps each):", "",
              "| student | " + " | ".join(next(iter(rounds.values()))) + " |",
              "|---|" + "---|" * len(next(iter(rounds.values())))]
    for k, seconds_per_round in rounds.items():
        cells = [f"{seconds_per_round.get(name, float('nan')):.0f}" for name in next(iter(rounds.values()))]
        lines.append(f"| k = {k} | " + " | ".join(cells) + " |")
    lines += ["", f"Full report: `{args.work}/eval/report.html` (not committed)."]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
