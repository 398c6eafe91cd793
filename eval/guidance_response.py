"""How much a guidance-embedded student's samples respond to w, against the teacher's classifier-free guidance.

    python eval/guidance_response.py --teacher teachers/glyphs-32 --student RUN/student [--student-steps 4] \
        [--ws 2,6] [--teacher-steps 50] [--num-prompts 64] [--seed 0]

Both pipelines start from the same initial latents for the same glyphs captions (half held-out combinations). The
teacher samples with CFG and DDIM (trailing spacing) at each w, the student with its own scheduler and one pass a
step. The figures (response, alignment, error at each w: diffkd.evaluation.guidance_response) compare their final
latents (what the UNet produces, before the VAE). FD and CLIP score over w (eval/glyphs_students.py) show whether a
student follows w only in the aggregate; this shows it per sample, in minutes, and works on a student exported at
any step count.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from diffusers import DDIMScheduler, StableDiffusionPipeline

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "eval"))

from glyphs_metrics import prompts as glyphs_prompts

from diffkd.evaluation.guidance_response import response_figures


def sample_latents(pipe: StableDiffusionPipeline, captions: list[str], noise: torch.Tensor, w: float,
                   steps: int) -> torch.Tensor:
    with torch.no_grad():
        out = pipe(captions, latents=noise.clone(), guidance_scale=w, num_inference_steps=steps,
                   output_type="latent")
    return out.images


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher", default="teachers/glyphs-32")
    parser.add_argument("--student", required=True, help="a guidance-embedded student pipeline folder")
    parser.add_argument("--student-steps", type=int, default=4)
    parser.add_argument("--teacher-steps", type=int, default=50)
    parser.add_argument("--ws", default="2,6")
    parser.add_argument("--num-prompts", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    ws = [float(w) for w in args.ws.split(",")]
    if len(ws) < 2:
        parser.error("--ws needs at least two guidance scales")

    teacher = StableDiffusionPipeline.from_pretrained(args.teacher, safety_checker=None)
    teacher.scheduler = DDIMScheduler.from_config(teacher.scheduler.config, timestep_spacing="trailing")
    student = StableDiffusionPipeline.from_pretrained(args.student, safety_checker=None)
    if student.unet.config.time_cond_proj_dim is None:
        sys.exit(f"{args.student}: its UNet has no guidance input (time_cond_proj_dim); this measures "
                 "guidance-embedded students")
    for pipe in (teacher, student):
        pipe.set_progress_bar_config(disable=True)
    captions = glyphs_prompts(args.num_prompts, args.seed + 1)
    shape = (len(captions), teacher.unet.config.in_channels, teacher.unet.config.sample_size,
             teacher.unet.config.sample_size)
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(args.seed))
    teacher_latents = {w: sample_latents(teacher, captions, noise, w, args.teacher_steps) for w in ws}
    student_latents = {w: sample_latents(student, captions, noise, w, args.student_steps) for w in ws}
    figures = response_figures(student_latents, teacher_latents)
    print(f"student {args.student} ({args.student_steps} steps) vs teacher CFG DDIM-{args.teacher_steps}, "
          f"{len(captions)} prompts, w = {args.ws}")
    print(" | ".join(f"{name} {value:.3f}" for name, value in figures.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
