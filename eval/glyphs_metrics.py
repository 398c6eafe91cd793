"""glyphs-32 text-to-image metrics: prompt accuracy (on training and held-out combinations), CLIP score from the
shipped glyphs CLIP and FD on the glyphs classifier, over guidance scales, samplers and steps, with UNet passes.

    python eval/glyphs_metrics.py --teacher teachers/glyphs-32 [--student runs/glyphs-progressive/student] \
        [--steps 50] [--samplers ddim] [--guidance-scales 1,2,3,5,7.5] [--write-results [--section NAME]]

Prompts are the captions of fresh glyphs, half from training combinations and half from held-out ones (alternating),
so both groups get the same number of samples. Writes the full report to eval/out/glyphs-metrics/ and, with
--write-results, its section of eval/RESULTS.md.
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
from diffkd.evaluation.formatting import markdown_table
from diffkd.evaluation.text_report import text_table
from diffkd.glyphs import glyphs


def prompts(count: int, seed: int) -> list[str]:
    """``count`` captions alternating between training and held-out combinations."""
    train = glyphs(count - count // 2, seed, "train")
    heldout = glyphs(count // 2, seed, "heldout")
    mixed = [g for pair in zip(train, heldout) for g in pair] + train[len(heldout):]
    return [g.caption for g in mixed]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher", default="teachers/glyphs-32")
    parser.add_argument("--student", action="append", default=[], help="student pipeline folder (repeatable)")
    parser.add_argument("--steps", default="50")
    parser.add_argument("--samplers", default="ddim")
    parser.add_argument("--guidance-scales", default="1,2,3,5,7.5")
    parser.add_argument("--guidance-scale", type=float, default=3.0, help="the reference run's (and the grid's)")
    parser.add_argument("--reference-steps", type=int, default=50)
    parser.add_argument("--num-samples", type=int, default=400)
    parser.add_argument("--batch-size", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", default=str(Path(__file__).parent / "out" / "glyphs-metrics"))
    parser.add_argument("--write-results", action="store_true", help="rewrite this benchmark's eval/RESULTS.md section")
    parser.add_argument("--section", default="glyphs-metrics", help="the RESULTS.md section --write-results rewrites")
    parser.add_argument("--title", default="Text-to-image metrics (issue 19)", help="that section's heading")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")

    started, cpu_started = time.perf_counter(), time.process_time()
    results = evaluate(EvalConfig(
        pipelines=[args.teacher, *args.student], teacher=args.teacher, steps=args.steps.split(","),
        samplers=args.samplers.split(","), reference_steps=args.reference_steps, reference="glyphs",
        num_samples=args.num_samples, batch_size=args.batch_size, seed=args.seed, lpips=False,
        prompts=prompts(args.num_samples, args.seed + 1), guidance_scale=args.guidance_scale,
        guidance_scales=args.guidance_scales.split(","), output=args.output)).to_dict()
    seconds, cpu_seconds = time.perf_counter() - started, time.process_time() - cpu_started
    header, body = text_table(results)
    print(markdown_table(header, body))
    print(f"{len(results['rows'])} settings x {args.num_samples} samples in {seconds:.0f} s ({cpu_seconds:.0f} CPU s)")
    if args.write_results:
        write_section(args.section, section(results, seconds, cpu_seconds, args))
    return 0


def section(results: dict, seconds: float, cpu_seconds: float, args: argparse.Namespace) -> str:
    header, body = text_table(results)
    protocol = results["protocol"]
    feature = protocol["feature_network"]
    command = "python eval/glyphs_metrics.py " + " ".join(
        [f"--teacher {shlex.quote(args.teacher)}", *[f"--student {shlex.quote(s)}" for s in args.student],
         f"--steps {args.steps}", f"--samplers {args.samplers}", f"--guidance-scales {args.guidance_scales}",
         f"--guidance-scale {args.guidance_scale}", f"--reference-steps {args.reference_steps}",
         f"--num-samples {args.num_samples}", f"--seed {args.seed}", "--write-results",
         f"--section {args.section}", f"--title {shlex.quote(args.title)}"])
    return "\n".join([
        f"## {args.title}", "",
        f"- command: `{command}`",
        f"- machine: {machine()}",
        (f"- {args.num_samples} samples per setting, prompts: captions of fresh glyphs (seed {args.seed + 1}), half "
         f"from training combinations, half from held-out ones; noise seed {args.seed}; real set: "
         f"{protocol['reference_set']['num_images']} glyphs (a tenth held out); FD on the shipped glyphs classifier "
         f"(held-out accuracy {feature.get('heldout_accuracy')}, sha256 {feature['weights_sha256'][:12]}); "
         f"CLIP score: {protocol['clip_score']}"), "",
        markdown_table(header, body), "",
        ("- prompt accuracy: the fraction of images whose character / foreground / background, read by the glyphs "
         "classifier, are the prompt's; 'all' needs the three at once; UNet passes: rows the UNet evaluated per "
         "image (a guided step is two)"),
        (f"- the whole command took {seconds:.0f} s wall, {cpu_seconds:.0f} s CPU over all threads "
         f"({len(results['rows'])} settings; the machine is shared, so wall time depends on its load); full report: "
         "eval/out/glyphs-metrics/report.html (not committed)"),
    ])


if __name__ == "__main__":
    raise SystemExit(main())
