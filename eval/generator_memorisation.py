"""Does a generator student memorise its teacher-sample cache? PSNR of its one-pass output on pairs it trained on
against pairs it never saw, both against the teacher's own sampler (the cache's sampler and step count).

A wide gap means more pairs, not more steps. Works on a run's checkpoints (weights as saved at that step) and on
its exported student; the run's config.yaml names the teacher, the cache and the student's parameterisation.
Unconditional teachers only. ``--fd REFERENCE`` adds the same split in sample quality: FD to the real set of the
teacher's and the student's images on each noise set (use ``--num-pairs 1000`` or more: FD is biased on few).

    python eval/generator_memorisation.py --run runs/gen6k/generator CKPT_OR_STUDENT [...] [--fd digits]
"""

from __future__ import annotations

import argparse
import copy
from pathlib import Path

import torch
from safetensors.torch import load_file

from diffkd import sample_cache
from diffkd.config import load_config
from diffkd.evaluation.features import load_feature_network, to_uint8
from diffkd.evaluation.reference import auto_feature, default_cache_dir, load_real_set
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
    return teacher.like(unet, prediction_type)


@torch.no_grad()
def one_pass(model: Denoiser, noise: torch.Tensor, steps: int) -> torch.Tensor:
    return torch.cat([ddim_sample(model, chunk, steps) for chunk in noise.split(64)])


def mean_psnr(images: torch.Tensor, reference: torch.Tensor) -> float:
    return psnr(to_uint8(images), to_uint8(reference)).mean().item()


class RealFD:
    """FD of generated images to a real set, with the sweep's feature network and statistics cache."""

    def __init__(self, reference: str, image_size: int, channels: int):
        self.feature = load_feature_network(auto_feature(reference))
        self.real = load_real_set(reference, self.feature, image_size, channels, default_cache_dir())

    def __call__(self, images: torch.Tensor) -> float:
        return self.real.frechet_distance(self.feature(to_uint8(images)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", required=True, help="the distill output folder (holds config.yaml)")
    parser.add_argument("models", nargs="+", help="checkpoint folders and/or the exported student folder")
    parser.add_argument("--num-pairs", type=int, default=256)
    parser.add_argument("--fd", metavar="REFERENCE", help="also FD to this real set ('digits', a folder, a .safetensors)")
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
    fd = RealFD(args.fd, pipeline.image_size, pipeline.image_channels) if args.fd else None
    if fd is not None:
        print(f"FD to {args.fd}, teacher's {o.teacher_sampler}-{o.teacher_steps}: training pairs "
              f"{fd(seen['sample']):.2f}, fresh noise {fd(fresh_reference):.2f}")
    for path in map(Path, args.models):
        model = student_of(path, teacher, prediction_type)
        on_seen, on_fresh = one_pass(model, seen["noise"], o.student_steps), one_pass(model, fresh_noise, o.student_steps)
        psnr_seen, psnr_fresh = mean_psnr(on_seen, seen["sample"]), mean_psnr(on_fresh, fresh_reference)
        line = f"| {path} | {psnr_seen:.1f} | {psnr_fresh:.1f} | {psnr_seen - psnr_fresh:.1f} |"
        if fd is not None:
            line += f" FD training pairs {fd(on_seen):.2f}, fresh noise {fd(on_fresh):.2f} |"
        print(line)


if __name__ == "__main__":
    main()
