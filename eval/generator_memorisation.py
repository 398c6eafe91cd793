"""Does a generator student memorise its teacher-sample cache? PSNR of its one-pass output on pairs it trained on
against pairs it never saw, both against the teacher's own sampler (the cache's sampler and step count).

A wide gap means more pairs, not more steps. Works on a run's checkpoints (weights as saved at that step) and on
its exported student; the run's config.yaml names the teacher, the cache and the student's parameterisation.
Unconditional teachers only.

    python eval/generator_memorisation.py --run runs/gen6k/generator CKPT_OR_STUDENT [...]
"""

from __future__ import annotations

import argparse
import copy
from pathlib import Path

import torch
from safetensors.torch import load_file

from diffkd import sample_cache
from diffkd.config import load_config
from diffkd.evaluation.features import to_uint8
from diffkd.evaluation.sweep import psnr
from diffkd.io import load_pipeline
from diffkd.models import Denoiser
from diffkd.sampling import ddim_sample

FRESH_SEED_OFFSET = 1  # fresh noise: the cache's own noise, the next seed


def student_of(path: Path, teacher: Denoiser, prediction_type: str) -> Denoiser:
    """An exported student folder, or a checkpoint's raw student weights on the teacher's architecture."""
    if (path / "unet").is_dir():
        return load_pipeline(str(path)).denoiser
    unet = copy.deepcopy(teacher.unet)
    unet.load_state_dict(load_file(path / "student.safetensors"))
    return Denoiser(unet, teacher.alphas_cumprod, prediction_type, teacher.clip_sample)


@torch.no_grad()
def mean_psnr(model: Denoiser, noise: torch.Tensor, reference: torch.Tensor, steps: int) -> float:
    images = torch.cat([ddim_sample(model, chunk, steps) for chunk in noise.split(64)])
    return psnr(to_uint8(images), to_uint8(reference)).mean().item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", required=True, help="the distill output folder (holds config.yaml)")
    parser.add_argument("models", nargs="+", help="checkpoint folders and/or the exported student folder")
    parser.add_argument("--num-pairs", type=int, default=256)
    args = parser.parse_args()

    config = load_config(Path(args.run) / "config.yaml")
    o = config.method
    pipeline = load_pipeline(config.teacher.source)
    teacher = pipeline.denoiser
    cache = sample_cache.ensure(pipeline, args.num_pairs, o.teacher_sampler, o.teacher_steps, o.sample_seed,
                                o.cache or None, progress=False)
    seen = cache.load(args.num_pairs)
    fresh_noise = sample_cache.pair_noise(o.sample_seed + FRESH_SEED_OFFSET, 0, args.num_pairs, seen["noise"].shape[1:])
    with torch.no_grad():
        fresh_reference = torch.cat([sample_cache.teacher_sample(pipeline, chunk, o.teacher_sampler, o.teacher_steps,
                                                                 None) for chunk in fresh_noise.split(64)])
    prediction_type = teacher.prediction_type if o.student_prediction_type == "teacher" else o.student_prediction_type
    print(f"PSNR (dB, per image, uint8, mean of {args.num_pairs}) to the teacher's {o.teacher_sampler}-"
          f"{o.teacher_steps}: | model | training pairs | fresh noise | gap |")
    for path in map(Path, args.models):
        model = student_of(path, teacher, prediction_type)
        on_seen = mean_psnr(model, seen["noise"], seen["sample"], o.student_steps)
        on_fresh = mean_psnr(model, fresh_noise, fresh_reference, o.student_steps)
        print(f"| {path} | {on_seen:.1f} | {on_fresh:.1f} | {on_seen - on_fresh:.1f} |")


if __name__ == "__main__":
    main()
