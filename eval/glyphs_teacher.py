"""glyphs-32 teacher check: how much of a glyph survives the teacher's VAE, the ceiling on what any sampler of the
teacher (or any student) can draw, read by the same glyphs classifier that scores prompt accuracy.

    python eval/glyphs_teacher.py --teacher teachers/glyphs-32 [--count 1000]

Prints the reconstruction error of held-out glyphs (seed 1) and the classifier's accuracy on the originals and on
their reconstructions. Sampling quality and prompt accuracy over guidance scales are ``eval/glyphs_metrics.py``'s.
"""

from __future__ import annotations

import argparse

import torch
from diffusers import StableDiffusionPipeline

from diffkd import glyphs
from diffkd.evaluation.glyphs_classifier import (
    ATTRIBUTES,
    load_glyphs_classifier,
    read_attributes,
    uint8_images,
)


@torch.no_grad()
def reconstruction(pipe: StableDiffusionPipeline, images: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
    """decode(encode(x)) of images in [-1, 1], its mean absolute error (0-1 scale) and mean PSNR."""
    out = torch.cat([pipe.vae.decode(pipe.vae.encode(chunk).latent_dist.mode()).sample.clamp(-1, 1)
                     for chunk in images.split(250)])
    error = (out - images) / 2
    mse = error.pow(2).mean(dim=(1, 2, 3))
    return out, {"mae": error.abs().mean().item(), "psnr": (10 * torch.log10(1 / mse)).mean().item()}


def attribute_accuracy(images: torch.Tensor, labels: dict[str, torch.Tensor]) -> dict[str, float]:
    """The glyphs classifier's per-attribute accuracy on images in [-1, 1]."""
    classifier, _ = load_glyphs_classifier()
    read = read_attributes(classifier, uint8_images(images))
    return {name: round(float((read[name] == labels[name]).float().mean()), 4) for name in ATTRIBUTES}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher", default="teachers/glyphs-32")
    parser.add_argument("--count", type=int, default=1000, help="held-out glyphs (seed 1) to reconstruct")
    args = parser.parse_args()
    pipe = StableDiffusionPipeline.from_pretrained(args.teacher, local_files_only=True)
    real = glyphs.glyph_set(args.count, seed=1, split="heldout")
    decoded, error = reconstruction(pipe, real.images)
    print(f"VAE on {args.count} held-out glyphs (seed 1): mean abs error {error['mae']:.4f} (0-1 scale), "
          f"PSNR {error['psnr']:.2f} dB")
    print(f"glyphs classifier on the originals: {attribute_accuracy(real.images, real.labels)}")
    print(f"glyphs classifier on the reconstructions: {attribute_accuracy(decoded, real.labels)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
