"""Size and per-step speed of a shipped config's compact student against its teacher, without training.

Builds the student that ``diffkd distill CONFIG`` would build (``diffkd.students.build_student``: the same
architecture, the same initial tensors) and prints its parameter count, how its tensors start from the teacher's,
and one sampling step's latency of teacher and student, interleaved in one run (fastest of ``--repeats``). The
architecture, not training, fixes size and speed, so this reproduces the size and speed-up figures of a distilled
compact student in seconds.

    python eval/student_size.py [--config configs/digits-compact-progressive.yaml] [--batch-size 64] [--repeats 20]
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from results_file import machine

from diffkd.config import load_config
from diffkd.io import load_pipeline
from diffkd.students import build_student, per_step_latency

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/digits-compact-progressive.yaml")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    config = load_config(ROOT / args.config)
    teacher = load_pipeline(str(ROOT / config.teacher.source)).unet.eval()
    print(f"machine: {machine('cpu')}")
    for narrow_init in ("slice", "fresh"):
        options = dataclasses.replace(config.student, narrow_init=narrow_init, latency_batch_size=0)
        student, report = build_student(teacher, options)
        total = report["copied"] + report["sliced"] + report["initialised"]
        print(f"narrow_init={narrow_init}: of {total} tensors {report['copied']} copied, {report['sliced']} sliced, "
              f"{report['initialised']} fresh")
    teacher_params, student_params = report["parameters"]
    print(f"parameters: student {student_params:,} vs teacher {teacher_params:,} "
          f"({100 * student_params / teacher_params:.0f}%)")
    latency = per_step_latency(teacher, student.eval(), args.batch_size, repeats=args.repeats)
    print(f"one sampling step at batch {args.batch_size} (fastest of {args.repeats}, interleaved): "
          f"student {latency['student']:.1f} ms vs teacher {latency['teacher']:.1f} ms, {latency['speedup']:.2f}x faster")


if __name__ == "__main__":
    main()
