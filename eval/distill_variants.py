"""Benchmark of issue 4 on digits-16: generator and compact students, each with and without feature alignment.

Trains every variant from its shipped config (configs/digits-*.yaml), then evaluates all of them in one sweep with
the teacher (same noise, same classifier features, teacher DDIM-64 as the fidelity reference) and times one
sampling step of each student against the teacher's in one interleaved run. Writes OUTPUT/summary.md and
OUTPUT/summary.json; the sweep's own report lands in OUTPUT/eval/.

    python eval/distill_variants.py --output runs/variants [--device cpu] [--variants generator,compact]
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from results_file import machine

from diffkd.api import distill
from diffkd.config import load_config
from diffkd.evaluation import EvalConfig, evaluate
from diffkd.io import load_pipeline
from diffkd.students import count_parameters, per_step_latency

log = logging.getLogger("distill_variants")

ROOT = Path(__file__).resolve().parent.parent
VARIANTS = {  # name -> (config, steps the student samples with)
    "generator": ("digits-generator.yaml", 1),
    "generator-features": ("digits-generator-features.yaml", 1),
    "compact": ("digits-compact-progressive.yaml", 4),
    "compact-features": ("digits-compact-progressive-features.yaml", 4),
}


QUICK = {  # --quick: a smoke run of the whole pipeline in a minute, numbers meaningless
    "generator": ["method.num_steps=5", "method.num_samples=64", "method.teacher_steps=4"],
    "progressive": ["method.steps_per_round=3", "method.start_steps=8"],
}


def train(name: str, output: Path, device: str, overrides: list[str], quick: bool) -> tuple[Path, float]:
    config_file, _ = VARIANTS[name]
    method = "generator" if "generator" in config_file else "progressive"
    extra = [*QUICK[method], f"method.cache={output / 'cache'}"] if quick and method == "generator" else \
        QUICK[method] if quick else []
    config = load_config(ROOT / "configs" / config_file,
                         [f"train.device={device}", "run_eval=false", *extra, *overrides])
    started = time.perf_counter()
    folder = distill(config, output / name, overwrite=True)
    return folder, time.perf_counter() - started


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", required=True)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma list of {', '.join(VARIANTS)}")
    parser.add_argument("--num-samples", type=int, default=1000, help="generated images per setting")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="config override for every variant (e.g. train.seed=1)")
    parser.add_argument("--quick", action="store_true", help="smoke run: a few steps per variant")
    parser.add_argument("--latency-device", default="cpu", help="where one step is timed (the protocol's CPU)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    output = Path(args.output)
    names = [n.strip() for n in args.variants.split(",") if n.strip()]
    teacher_source = str(ROOT / "teachers" / "digits-16")

    folders, seconds = {}, {}
    for name in names:
        folders[name], seconds[name] = train(name, output, args.device, args.overrides, args.quick)
        log.info("%s trained in %.0f s", name, seconds[name])

    steps = sorted({VARIANTS[n][1] for n in names} | {1, 2, 4})
    results = evaluate(EvalConfig(pipelines=[teacher_source, *map(str, folders.values())], teacher=teacher_source,
                                  steps=steps, samplers=["ddim"], num_samples=args.num_samples,
                                  device=args.device, output=str(output / "eval")))
    teacher = load_pipeline(teacher_source, device=args.latency_device).unet
    summary = {"machine": machine(args.device), "latency_machine": machine(args.latency_device),
               "command": "python eval/distill_variants.py " + " ".join(sys.argv[1:] if argv is None else argv), "variants": {},
               "teacher_rows": [r for r in results.rows if r["role"] == "teacher"],
               "noise_floor": results.noise_floor}
    for name, folder in folders.items():
        k = VARIANTS[name][1]
        row = next(r for r in results.rows if r["model"] == _model_name(results, folder) and r["steps"] == k)
        student = load_pipeline(str(folder), device=args.latency_device).unet
        summary["variants"][name] = {
            "config": VARIANTS[name][0], "steps": k, "fd": row["fd"], "psnr": row["psnr"],
            "train_seconds": round(seconds[name], 1), "parameters": count_parameters(student),
            "teacher_parameters": count_parameters(teacher),
            "latency": per_step_latency(teacher, student, batch_size=64, repeats=20),
        }
    (output / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
    (output / "summary.md").write_text(markdown(summary))
    print(markdown(summary))
    return 0


def _model_name(results, folder: Path) -> str:
    return next(m["name"] for m in results.models if Path(m["source"]).resolve() == Path(folder).resolve())


def markdown(summary: dict) -> str:
    reference = next((r for r in summary["teacher_rows"] if r["is_reference"]), None)
    lines = [f"Machine (training, sampling): {summary['machine']}; step latency on {summary['latency_machine']}.",
             f"Command: `{summary['command']}`", ""]
    if reference is not None:
        lines.append(f"Teacher DDIM-{reference['steps']}: FD {reference['fd']:.2f}.")
    for row in summary["teacher_rows"]:
        if not row["is_reference"]:
            lines.append(f"Teacher {row['sampler']}-{row['steps']}: FD {row['fd']:.2f}, PSNR {row['psnr']:.1f} dB.")
    if summary["noise_floor"]:
        lines.append(f"Real-vs-real noise floor: FD {summary['noise_floor']['fd']:.2f}.")
    lines += ["", ("| variant | steps | FD | FD / teacher DDIM-64 | PSNR to DDIM-64 (dB) | params (% of teacher) | "
              "step speed-up (batch 64) | train time (s) |"), "|---|---|---|---|---|---|---|---|"]
    for name, v in summary["variants"].items():
        ratio = v["fd"] / reference["fd"] if reference else float("nan")
        lines.append(f"| {name} | {v['steps']} | {v['fd']:.2f} | {ratio:.2f} | {v['psnr']:.1f} | "
                     f"{v['parameters']:,} ({100 * v['parameters'] / v['teacher_parameters']:.0f}%) | "
                     f"{v['latency']['speedup']:.2f}x | {v['train_seconds']:.0f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
