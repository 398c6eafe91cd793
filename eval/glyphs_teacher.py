"""glyphs-32 teacher check: the VAE's reconstruction error, and at DDIM-k over guidance scales how often a sample's
colours are the ones its prompt asks for, on held-out and training combinations, plus a prompt x scale grid.

    python eval/glyphs_teacher.py --teacher teachers/glyphs-32 [--guidance 1,2,3,5] [--num-prompts 100] \
        [--splits heldout,train]

The colours are read by a fixed rule, not a learned classifier: every pixel goes to its nearest palette colour,
the background is the commonest colour of the border, the foreground the commonest other colour among pixels that
are close to a palette colour (anti-aliased edges are mixtures and are left out). The rule's own accuracy on real
glyphs is printed beside the figures. Character accuracy needs the attribute classifier of ``diffkd eval``; the
grid shows the characters.
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

import numpy as np
import torch
from diffusers import StableDiffusionPipeline
from PIL import Image

from diffkd import glyphs

PALETTE = torch.tensor([glyphs.COLOURS[name] for name in glyphs.COLOUR_NAMES], dtype=torch.float32)
PURE = 30.0  # RGB distance under which a pixel counts as one palette colour (the closest two are 81 apart; an
# anti-aliased red/blue edge pixel is 58 from purple, so it must not count)


def read_colours(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(foreground, background) palette indices of N x 3 x H x W images in [0, 1]."""
    pixels = images.permute(0, 2, 3, 1).float() * 255
    distance = (pixels[..., None, :] - PALETTE).norm(dim=-1)  # N x H x W x colours
    nearest, closest = distance.min(dim=-1).values, distance.argmin(dim=-1)
    border = torch.cat([closest[:, 0], closest[:, -1], closest[:, :, 0], closest[:, :, -1]], dim=1)
    background = border.mode(dim=1).values
    foreground = []
    for colours, near, bg in zip(closest, nearest, background):
        counts = torch.bincount(colours[(near < PURE) & (colours != bg)], minlength=len(PALETTE))
        foreground.append(int(counts.argmax()))
    return torch.tensor(foreground), background


def colour_accuracy(images: torch.Tensor, items: list[glyphs.Glyph]) -> dict[str, float]:
    foreground, background = read_colours(images)
    want_fg = torch.tensor([glyphs.COLOUR_NAMES.index(g.foreground) for g in items])
    want_bg = torch.tensor([glyphs.COLOUR_NAMES.index(g.background) for g in items])
    fg, bg = foreground == want_fg, background == want_bg
    return {"foreground": fg.float().mean().item(), "background": bg.float().mean().item(),
            "both": (fg & bg).float().mean().item()}


@torch.no_grad()
def reconstruction(pipe: StableDiffusionPipeline, images: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
    """decode(encode(x)) of images in [-1, 1], its mean absolute error (0-1 scale) and mean PSNR."""
    out = torch.cat([pipe.vae.decode(pipe.vae.encode(chunk).latent_dist.mode()).sample.clamp(-1, 1)
                     for chunk in images.split(250)])
    error = (out - images) / 2
    mse = error.pow(2).mean(dim=(1, 2, 3))
    return out, {"mae": error.abs().mean().item(), "psnr": (10 * torch.log10(1 / mse)).mean().item()}


def sample(pipe: StableDiffusionPipeline, prompts: list[str], steps: int, scale: float, seed: int,
           batch_size: int) -> torch.Tensor:
    images = []
    for start in range(0, len(prompts), batch_size):
        generator = torch.Generator().manual_seed(seed + start)
        out = pipe(prompts[start:start + batch_size], num_inference_steps=steps, guidance_scale=scale,
                   generator=generator, output_type="pt").images
        images.append(out.cpu())
    return torch.cat(images)


def save_grid(rows: list[torch.Tensor], path: Path) -> None:
    """rows of N x 3 x H x W images in [0, 1], one row per guidance scale."""
    grid = torch.cat([torch.cat(list(row), dim=2) for row in rows], dim=1)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray((grid.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)).resize(
        (grid.shape[2] * 2, grid.shape[1] * 2), Image.Resampling.NEAREST).save(path)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher", default="teachers/glyphs-32")
    parser.add_argument("--guidance", default="1,2,3,5", help="guidance scales, comma-separated")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--num-prompts", type=int, default=100, help="prompts per split")
    parser.add_argument("--splits", default="heldout,train", help="prompt splits, comma-separated")
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", default=str(Path(__file__).parent / "out" / "glyphs-teacher"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    pipe = StableDiffusionPipeline.from_pretrained(args.teacher, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)

    real = glyphs.glyph_set(args.num_prompts * 5, seed=1, split="heldout")
    items = glyphs.glyphs(args.num_prompts * 5, seed=1, split="heldout")
    rule = colour_accuracy(real.images / 2 + 0.5, items)
    decoded, vae = reconstruction(pipe, real.images)
    vae_colours = colour_accuracy(decoded / 2 + 0.5, items)
    print(f"colour rule on {len(items)} real held-out glyphs: {rule}")
    print(f"VAE on the same glyphs: mean abs error {vae['mae']:.4f} (0-1 scale), PSNR {vae['psnr']:.2f} dB, "
          f"colours read back {vae_colours['both']:.3f}")

    print(f"| split | w | DDIM-{args.steps} fg colour | background | both | seconds |")
    print("|---|---|---|---|---|---|")
    grid_rows = []
    for split in args.splits.split(","):
        prompts_items = glyphs.glyphs(args.num_prompts, seed=2, split=split)
        prompts = [g.caption for g in prompts_items]
        for scale in [float(w) for w in args.guidance.split(",")]:
            started = time.perf_counter()
            with torch.no_grad():
                images = sample(pipe, prompts, args.steps, scale, args.seed, args.batch_size)
            seconds = time.perf_counter() - started
            accuracy = colour_accuracy(images, prompts_items)
            print(f"| {split} | {scale:g} | {accuracy['foreground']:.3f} | {accuracy['background']:.3f} | "
                  f"{accuracy['both']:.3f} | {seconds:.0f} |", flush=True)
            if split == "heldout":
                grid_rows.append(images[:16])
    save_grid(grid_rows, Path(args.output) / "grid.png")
    print("grid prompts (columns):", [g.caption for g in glyphs.glyphs(16, seed=2, split="heldout")])
    print(f"grid: {Path(args.output) / 'grid.png'} (rows: w = {args.guidance})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
