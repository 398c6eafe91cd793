"""Issue 20's glyphs-32 benchmarks: guidance-embedded 4-step students (progressive, consistency) and a rank-16 LoRA
student of the glyphs teacher, against the teacher with classifier-free guidance at the same w.

    python eval/glyphs_students.py --teacher teachers/glyphs-32 [--train] [--runs runs] [--ws 2,4,6] \
        [--recipes glyphs-lora-consistency,...] [--plot-only] [--eval-args "--num-samples 400 --feature ..."]

--train distils the three recipes (configs/glyphs-guidance-progressive.yaml, glyphs-guidance-consistency.yaml,
glyphs-lora-consistency.yaml) into RUNS/<recipe> first. Then, for each student and each w, it counts the UNet passes
per image of the student and of the teacher (forward hooks on StableDiffusionPipeline, 4 steps / 64 steps), compares
the LoRA adapter file with the teacher's UNet file in bytes, and runs ``diffkd eval`` of the student beside the
teacher's CFG DDIM-64 at that w (FD, CLIP score: whatever --eval-args and the eval section make available), writing
each report to RUNS/<recipe>/eval-w<w>/. A fixed-w student (the LoRA one) is evaluated at its own w only.
"""

from __future__ import annotations

import argparse
import json
import logging
import shlex
import subprocess
import sys
from pathlib import Path

import diffusers
import torch
import yaml
from diffusers import StableDiffusionPipeline

from diffkd.evaluation.text_report import plot_fd_vs_clip

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "eval"))

from glyphs_metrics import prompts as glyphs_prompts

RECIPES = ("glyphs-guidance-progressive", "glyphs-guidance-consistency", "glyphs-lora-consistency")
log = logging.getLogger("glyphs_students")


def passes_per_image(pipe: StableDiffusionPipeline, prompt: str, w: float, steps: int, images: int = 2) -> float:
    """UNet forward passes per image (a CFG step doubles the batch, so it counts two)."""
    seen: list[int] = []
    handle = pipe.unet.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append((args[0] if args else kwargs["sample"]).shape[0]), with_kwargs=True)
    try:
        with torch.no_grad():
            pipe(prompt, guidance_scale=w, num_inference_steps=steps, num_images_per_prompt=images, output_type="np")
    finally:
        handle.remove()
    return sum(seen) / images


def student_pipeline(teacher: str, run: Path) -> StableDiffusionPipeline:
    """A run's student as a user loads it: the folder itself, or the teacher with the LoRA folder and the scheduler
    the adapters were trained for."""
    folder = run / "student"
    if not (folder / "pytorch_lora_weights.safetensors").is_file():
        return StableDiffusionPipeline.from_pretrained(folder)
    pipe = StableDiffusionPipeline.from_pretrained(teacher)
    pipe.load_lora_weights(folder)
    scheduler_class = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())["_class_name"]
    pipe.scheduler = getattr(diffusers, scheduler_class).from_pretrained(folder, subfolder="scheduler")
    return pipe


def lora_share(teacher: str, run: Path) -> float | None:
    adapter = run / "student" / "pytorch_lora_weights.safetensors"
    unet = Path(teacher) / "unet" / "diffusion_pytorch_model.safetensors"
    return adapter.stat().st_size / unet.stat().st_size if adapter.is_file() else None


def plot_over_w(run: Path) -> Path | None:
    """One FD-vs-CLIP figure from the run's per-w evaluations (each evaluates student and teacher at one w)."""
    evaluations = sorted(run.glob("eval-w*/results.json"))
    if len(evaluations) < 2:
        return None
    results = [json.loads(path.read_text()) for path in evaluations]
    merged = {**results[0], "rows": [row for result in results for row in result["rows"]]}
    figure = plot_fd_vs_clip(merged)
    figure.axes[0].set_title(f"{run.name}: FD vs CLIP score over w (teacher: CFG, 2 passes a step)")
    path = run / "fd_vs_clip_over_w.png"
    figure.savefig(path, dpi=120, bbox_inches="tight")
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", default="teachers/glyphs-32")
    parser.add_argument("--runs", default="runs")
    parser.add_argument("--ws", default="2,4,6")
    parser.add_argument("--prompt", default="a", help="prompt of the pass count (any caption: passes do not depend on it)")
    parser.add_argument("--train", action="store_true", help="distil the three recipes first")
    parser.add_argument("--num-prompts", type=int, default=200,
                        help="glyphs captions (half training, half held-out combinations) each `diffkd eval` samples")
    parser.add_argument("--eval-args", default="", help="extra arguments for each `diffkd eval`")
    parser.add_argument("--recipes", default=",".join(RECIPES), help="which of the three recipes to train / evaluate")
    parser.add_argument("--plot-only", action="store_true",
                        help="only draw each run's FD-vs-CLIP curve over w from its existing evaluations")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    ws = [float(w) for w in args.ws.split(",")]
    runs = Path(args.runs)
    recipes = args.recipes.split(",")
    if unknown := sorted(set(recipes) - set(RECIPES)):
        parser.error(f"--recipes {unknown} are not among {', '.join(RECIPES)}")
    if args.plot_only:
        for recipe in recipes:
            log.info("%s: %s", recipe, plot_over_w(runs / recipe) or "fewer than two evaluations, no curve")
        return
    diffkd = [sys.executable, "-m", "diffkd"]
    if args.train:
        for recipe in recipes:
            path = ROOT / "configs" / f"{recipe}.yaml"
            subprocess.run([*diffkd, "distill", str(path), "--output",
                            str(runs / recipe), "--set", f"teacher.source={args.teacher}"], check=True)
    prompts_file = runs / "glyphs-prompts.txt"
    prompts_file.parent.mkdir(parents=True, exist_ok=True)
    prompts_file.write_text("\n".join(glyphs_prompts(args.num_prompts, seed=1)) + "\n")
    teacher = StableDiffusionPipeline.from_pretrained(args.teacher)
    teacher.set_progress_bar_config(disable=True)
    prompt = args.prompt
    print("| student | w | student passes / image (4 steps) | teacher passes / image (CFG, 64 steps) | "
          "adapter / UNet bytes |")
    print("|---|---|---|---|---|")
    for recipe in recipes:
        run = runs / recipe
        if not (run / "student").is_dir():
            log.warning("no %s: run with --train first", run / "student")
            continue
        card = yaml.safe_load((run / "student" / "README.md").read_text().split("---")[1])
        fixed = float(card.get("guidance_scale", 1.0))
        student = student_pipeline(args.teacher, run)
        student.set_progress_bar_config(disable=True)
        share = lora_share(args.teacher, run)
        for w in ([fixed] if fixed > 1 else ws):
            sampled_at = 1.0 if fixed > 1 else w  # a fixed-w student has its w distilled in
            print(f"| {recipe} | {w:g} | {passes_per_image(student, prompt, sampled_at, 4):g} | "
                  f"{passes_per_image(teacher, prompt, w, 64):g} | {'-' if share is None else f'{share:.2%}'} |")
            evaluated = run / ("student-fused" if share is not None else "student")
            subprocess.run([*diffkd, "eval", "--pipeline", str(evaluated), "--teacher", args.teacher, "--steps", "4",
                            "--reference-steps", "64", "--guidance-scale", str(w), "--output",
                            str(run / f"eval-w{w:g}"), "--prompts-file", str(prompts_file),
                            "--num-samples", str(args.num_prompts), "--reference", "glyphs",
                            *shlex.split(args.eval_args)], check=True)
        if fixed <= 1:
            log.info("FD vs CLIP over w: %s", plot_over_w(run))


if __name__ == "__main__":
    main()
