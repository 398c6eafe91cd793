"""Does a glyphs text-to-image pipeline read each word of its prompt? Two measurements per pipeline folder:

    python eval/glyphs_prompt_sensitivity.py teachers/glyphs-32 [runs/glyphs-teacher/pipeline ...] [--count 200]

- text encoder: the relative change of its output (|h(a) - h(b)| / |h(a)|, the hidden states the UNet attends to)
  between a caption and the same caption with one attribute changed (the character, the foreground or the
  background colour), averaged over ``count`` training captions;
- samples: from the same starting noise, the mean pixel distance between the images of a caption and of the same
  caption naming another character, over the distance between two noises for one caption (DDIM-20, w = 3). Near 0:
  the character word does not change the drawing, whose shape comes from the noise.
"""

from __future__ import annotations

import argparse
import random

import torch
from diffusers import StableDiffusionPipeline

from diffkd.glyphs import CHARACTERS, COLOUR_NAMES, Glyph, glyphs


def variant(item: Glyph, attribute: str, rng: random.Random) -> Glyph:
    """``item`` with one attribute redrawn: a character of the same kind, or a colour the other one is not."""
    if attribute == "character":
        same_kind = [c for c in CHARACTERS if c.isdigit() == item.character.isdigit() and c != item.character]
        return Glyph(rng.choice(same_kind), item.foreground, item.background, item.family, item.style, item.template)
    taken = {item.foreground, item.background}
    colour = rng.choice([c for c in COLOUR_NAMES if c not in taken])
    if attribute == "foreground":
        return Glyph(item.character, colour, item.background, item.family, item.style, item.template)
    return Glyph(item.character, item.foreground, colour, item.family, item.style, item.template)


@torch.no_grad()
def hidden_states(pipe: StableDiffusionPipeline, captions: list[str]) -> torch.Tensor:
    """What the UNet attends to: the pipeline's own prompt encoding."""
    return pipe.encode_prompt(captions, "cpu", 1, do_classifier_free_guidance=False)[0]


def encoder_sensitivity(pipe: StableDiffusionPipeline, items: list[Glyph], seed: int) -> dict[str, float]:
    base = hidden_states(pipe, [g.caption for g in items])
    figures = {}
    for attribute in ("character", "foreground", "background"):
        rng = random.Random(seed)
        changed = hidden_states(pipe, [variant(g, attribute, rng).caption for g in items])
        figures[attribute] = float(((changed - base).flatten(1).norm(dim=1) / base.flatten(1).norm(dim=1)).mean())
    return figures


@torch.no_grad()
def sample_sensitivity(pipe: StableDiffusionPipeline, items: list[Glyph], seed: int, steps: int = 20,
                       guidance_scale: float = 3.0) -> float:
    rng = random.Random(seed)
    captions = [g.caption for g in items]
    others = [variant(g, "character", rng).caption for g in items]
    shape = (len(items), pipe.unet.config.in_channels, pipe.unet.config.sample_size, pipe.unet.config.sample_size)
    first = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    second = torch.randn(shape, generator=torch.Generator().manual_seed(seed + 1))

    def draw(prompts: list[str], latents: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(pipe(prompts, latents=latents.clone(), num_inference_steps=steps,
                                     guidance_scale=guidance_scale, output_type="np").images)

    base = draw(captions, first)
    by_character = (draw(others, first) - base).flatten(1).norm(dim=1).mean()
    by_noise = (draw(captions, second) - base).flatten(1).norm(dim=1).mean()
    return float(by_character / by_noise)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("pipelines", nargs="+")
    parser.add_argument("--count", type=int, default=200, help="training captions for the text encoder figures")
    parser.add_argument("--samples", type=int, default=32, help="captions for the sample figure")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print("| pipeline | text encoder change: character | foreground | background "
          "| samples: character change / noise change |")
    print("|---|---|---|---|---|")
    for folder in args.pipelines:
        pipe = StableDiffusionPipeline.from_pretrained(folder, local_files_only=True)
        pipe.set_progress_bar_config(disable=True)
        items = glyphs(args.count, args.seed + 1, "train")
        encoder = encoder_sensitivity(pipe, items, args.seed)
        samples = sample_sensitivity(pipe, items[:args.samples], args.seed)
        print(f"| {folder} | {encoder['character']:.3f} | {encoder['foreground']:.3f} | "
              f"{encoder['background']:.3f} | {samples:.3f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
