"""Same students from the multi-network trainer (issue 17) as from the one-network trainer it replaced.

Extracts the code at ``--old`` (``git archive``) into a scratch folder, runs the same short configs through the old
tree's CLI and this one's (one after the other, one thread each) and compares the exported UNets tensor by tensor
(``torch.equal``). The configs cover what the trainer does for today's methods: progressive on the fidelity
benchmark's config shortened (64 -> 4 in four rounds of 8 steps, batch 16, EMA), a compact student whose feature-KD
projections train beside it with gradient accumulation, the generator with its teacher-sample cache, and teacher
training (denoise).

    python eval/trainer_equivalence.py [--old 5c7d6b9] [--work /tmp/diffkd-equivalence] [--write]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).parent))

from results_file import machine, write_section

ROOT = Path(__file__).resolve().parents[1]
TEACHER = ROOT / "teachers" / "digits-16"
COMMON = [f"teacher.source={TEACHER}", "run_eval=false", "train.device=cpu", "train.batch_size=16",
          "train.checkpoint_every=4", "train.ema_decay=0.9", "train.log_every=1"]
RUNS = {  # name: (command, config, --set overrides)
    "progressive 64 -> 4, 8 steps a round": (
        "distill", "configs/digits-progressive.yaml", [*COMMON, "method.steps_per_round=8", "train.warmup_steps=2"]),
    "progressive, compact student (width 0.5), output + feature KD, accumulation 2": (
        "distill", "configs/digits-progressive.yaml",
        [*COMMON, "method.start_steps=4", "method.final_steps=2", "method.steps_per_round=8",
         "student.architecture=compact", "student.width_multiplier=0.5", "losses.feature_kd=0.1",
         "losses.output_kd=0.5", "train.gradient_accumulation_steps=2"]),
    "generator, 32 DDIM-4 pairs, 8 steps": (
        "distill", "configs/digits-generator.yaml",
        [*COMMON, "method.num_steps=8", "method.num_samples=32", "method.teacher_steps=4"]),
    "denoise (teacher training), 12 steps": (
        "train-teacher", "configs/digits-teacher.yaml",
        ["train.device=cpu", "method.num_steps=12", "train.batch_size=16", "train.checkpoint_every=4",
         "train.ema_decay=0.9"]),
}


def run(tree: Path, name: str, output: Path) -> Path:
    command, config, sets = RUNS[name]
    if command == "distill" and "generator" in config:
        sets = [*sets, f"method.cache={output}-cache"]
    argv = [sys.executable, "-m", "diffkd", command, str(tree / config), "--output", str(output)]
    for assignment in sets:
        argv += ["--set", assignment]
    env = {**os.environ, "PYTHONPATH": str(tree), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(argv, capture_output=True, text=True, env=env, cwd=tree, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"{name} on {tree}: {result.stderr[-2000:]}")
    folder = "pipeline" if command == "train-teacher" else "student"
    return output / folder / "unet" / "diffusion_pytorch_model.safetensors"


def compare(a: Path, b: Path) -> str:
    left, right = load_file(a), load_file(b)
    if left.keys() != right.keys():
        return "different tensors"
    differing = [k for k in left if not torch.equal(left[k], right[k])]
    return f"bit-identical ({len(left)} tensors)" if not differing else f"{len(differing)} of {len(left)} differ"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--old", default="5c7d6b9", help="the commit with the one-network trainer")
    parser.add_argument("--work", default="/tmp/diffkd-equivalence")
    parser.add_argument("--write", action="store_true", help="update the section in eval/RESULTS.md")
    args = parser.parse_args()
    work, started = Path(args.work), time.perf_counter()
    shutil.rmtree(work, ignore_errors=True)
    old = work / "old-tree"
    old.mkdir(parents=True)
    archive = subprocess.run(["git", "archive", args.old], cwd=ROOT, capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(old)], input=archive, check=True)
    rows = []
    for index, name in enumerate(RUNS):
        result = compare(run(old, name, work / f"old-{index}"), run(ROOT, name, work / f"new-{index}"))
        rows.append(f"| {name} | {result} |")
        print(f"{name}: {result}", flush=True)
    command = " ".join(["python eval/trainer_equivalence.py", *sys.argv[1:]])
    text = "\n".join([
        "## The multi-network trainer gives the same students (issue 17)", "",
        f"- machine: {machine('cpu')}, shared with other jobs; every run single-threaded",
        (f"- command: `{command}` ({(time.perf_counter() - started) / 60:.1f} min; seed 0); old trainer: commit "
         f"`{args.old}`; teacher: `teachers/digits-16`, batch 16, EMA 0.9, checkpoint every 4"),
        "- each config run by the old tree's CLI and this one's; the exported UNets compared tensor by tensor", "",
        "| run | new vs old student |", "|---|---|", *rows])
    print(text)
    if args.write:
        write_section("trainer-equivalence", text)


if __name__ == "__main__":
    main()
