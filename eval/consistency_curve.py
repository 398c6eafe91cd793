"""FD vs training steps of a consistency run: each kept checkpoint's student (and the final export) sampled with the
run's exported LCMScheduler at k = 1, 2, 4, in one sweep beside the teacher's DDIM at the same k and its DDIM-64.

    python eval/consistency_curve.py --run runs/digits-consistency [--seed 0] [--num-samples 1000]

A checkpoint's student is its raw weights, or its export-EMA weights when the run kept an EMA (what the export at
that step would have written). Prints the table; the figures go into eval/RESULTS.md by hand with this command.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import tempfile
from pathlib import Path

from diffusers import DiffusionPipeline

from diffkd import checkpoint
from diffkd.evaluation import EvalConfig, evaluate
from diffkd.evaluation.report import fmt, markdown_table

STEPS = [1, 2, 4]


def export_checkpoint(run: Path, folder: Path, target: Path) -> Path:
    """The run's exported pipeline with the checkpoint's student weights (EMA ones where it has them)."""
    tensors, _ = checkpoint.load(folder)
    pipe = DiffusionPipeline.from_pretrained(run / "student")
    if "ema.student" in tensors:
        for index, parameter in enumerate(pipe.unet.parameters()):
            parameter.data.copy_(tensors["ema.student"][str(index)])
    else:
        pipe.unet.load_state_dict(tensors["student"])
    pipe.save_pretrained(target, safe_serialization=True)
    shutil.copy(run / "student" / "README.md", target / "README.md")
    return target


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", required=True)
    parser.add_argument("--teacher", default="teachers/digits-16")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num-samples", type=int, default=1000)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    run = Path(args.run)
    with tempfile.TemporaryDirectory() as scratch:
        students = {}
        for folder in checkpoint.complete(run / "checkpoints"):
            step = checkpoint.load(folder)[1]["progress"]["step"]
            if step:  # the end-of-round checkpoint holds what was exported
                students[f"step {step}"] = str(export_checkpoint(run, folder, Path(scratch) / f"step-{step}"))
        students["exported (last step)"] = str(run / "student")
        results = evaluate(EvalConfig(
            pipelines=[args.teacher, *students.values()], teacher=args.teacher, steps=STEPS, samplers=["ddim"],
            reference_steps=64, reference="digits", feature="digits-classifier", num_samples=args.num_samples,
            batch_size=250, seed=args.seed, lpips=False, output=f"{scratch}/eval")).to_dict()
    reference = next(r["fd"] for r in results["rows"] if r["is_reference"])
    body = []
    for label, source in students.items():
        name = next(m["name"] for m in results["models"] if m["source"] == source)
        fds = [next(r["fd"] for r in results["rows"] if r["model"] == name and r["sampler"] == "own"
                    and r["steps"] == k) for k in STEPS]
        body.append([label, *[f"{fmt(fd)} ({fd / reference:.2f}x)" for fd in fds]])
    print(f"teacher DDIM-64 FD {fmt(reference)}; seed {args.seed}, {args.num_samples} samples")
    print(markdown_table(["student", *[f"k={k}" for k in STEPS]], body))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
