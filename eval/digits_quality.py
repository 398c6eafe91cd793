"""digits-16 quality benchmark (DESIGN.md §4): FD on the digits classifier vs steps, students against the teacher's
DDIM, DPM-Solver++ and UniPC at the same k, the teacher's DDIM-64 and the real-vs-real noise floor.

    python eval/digits_quality.py --teacher teachers/digits-16 --student runs/digits-progressive/student \
        [--student ...] [--write-results]

Writes the full report to eval/out/digits-quality/ and, with --write-results, its section of eval/RESULTS.md.
"""

from __future__ import annotations

import argparse
import logging
import shlex
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from results_file import machine, write_section

from diffkd.evaluation import EvalConfig, evaluate
from diffkd.evaluation.report import fmt, markdown_table, steps_table


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher", default="teachers/digits-16")
    parser.add_argument("--student", action="append", default=[], help="student pipeline folder (repeatable)")
    parser.add_argument("--num-samples", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", default=str(Path(__file__).parent / "out" / "digits-quality"))
    parser.add_argument("--write-results", action="store_true", help="rewrite this benchmark's eval/RESULTS.md section")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")

    started, cpu_started = time.perf_counter(), time.process_time()
    results = evaluate(EvalConfig(
        pipelines=[args.teacher, *args.student], teacher=args.teacher, steps=[1, 2, 4, 8],
        samplers=["ddim", "dpmsolver++", "unipc"], reference_steps=64, reference="digits",
        feature="digits-classifier", num_samples=args.num_samples, batch_size=250, seed=args.seed, lpips=False,
        output=args.output)).to_dict()
    seconds, cpu_seconds = time.perf_counter() - started, time.process_time() - cpu_started
    header, body = steps_table(results)
    print(markdown_table(header, body))
    print(f"{len(results['rows'])} settings x {args.num_samples} samples in {seconds:.0f} s "
          f"({cpu_seconds:.0f} CPU s)")
    if args.write_results:
        write_section("digits-quality", section(results, seconds, cpu_seconds, args))
    return 0


def section(results: dict, seconds: float, cpu_seconds: float, args: argparse.Namespace) -> str:
    header, body = steps_table(results)
    feature = results["protocol"]["feature_network"]
    reference = next(r for r in results["rows"] if r["is_reference"])
    split = results["noise_floor"]["split"]
    speed = [f"{r['model']} {r['sampler']}-{r['steps']}: {fmt(r['speedup'])}x" for r in results["rows"]
             if r["role"] == "student"]
    command = "python eval/digits_quality.py " + " ".join(
        [f"--teacher {shlex.quote(args.teacher)}", *[f"--student {shlex.quote(s)}" for s in args.student],
         f"--num-samples {args.num_samples}", f"--seed {args.seed}", "--write-results"])
    return "\n".join([
        "## digits-16 quality: FD (digits classifier) vs steps", "",
        f"- command: `{command}`",
        f"- machine: {machine()}",
        (f"- {args.num_samples} samples per setting, seed {args.seed}, the same noise through every setting; "
        f"real set: the 1,797 digits at 16x16; feature network: the shipped digits classifier "
        f"(test accuracy {feature.get('test_accuracy')}, sha256 {feature['weights_sha256'][:12]}); "
        "lower is better"), "",
        markdown_table(header, body), "",
        (f"- noise floor: FD between two disjoint halves of the real set ({' vs '.join(map(str, split))} images); "
         "FD's small-sample bias is larger there than for 1,000 samples vs 1,797 real images, so a good model "
         "can score below it"),
        f"- students' speed-up over the teacher's DDIM-{reference['steps']} (ms/image, same run): "
        + ("; ".join(speed) if speed else "no student in this run"),
        (f"- the whole command took {seconds:.0f} s wall, {cpu_seconds:.0f} s CPU over all threads "
         f"({len(results['rows'])} settings; the machine is shared, so wall time depends on its load); full report: "
        "eval/out/digits-quality/report.html (not committed)"),
    ])


if __name__ == "__main__":
    raise SystemExit(main())
