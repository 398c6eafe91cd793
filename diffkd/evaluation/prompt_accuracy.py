"""Prompt accuracy: the fraction of images whose character, colour and background, as the glyphs classifier reads
them, are the ones their prompt asks for (a GenEval-style check, Ghosh et al. 2023), split into prompts of
combinations training saw and prompts of held-out ones (composition, not memory)."""

from __future__ import annotations

import torch

from diffkd.glyphs import CHARACTERS, COLOUR_NAMES, caption_attributes, heldout_combinations

ATTRIBUTE_NAMES = ("character", "foreground", "background")
GROUPS = ("train", "heldout")


def prompts_name_glyphs(prompts: list[str]) -> bool:
    """Every prompt names a character and two palette colours, so the classifier can check it."""
    return bool(prompts) and all(caption_attributes(p) is not None for p in prompts)


def prompt_targets(prompts: list[str]) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """What each prompt asks for, as indices into CHARACTERS / COLOUR_NAMES, and which prompts are held out."""
    asked = [caption_attributes(p) for p in prompts]
    targets = {"character": torch.tensor([CHARACTERS.index(a[0]) for a in asked]),
               "foreground": torch.tensor([COLOUR_NAMES.index(a[1]) for a in asked]),
               "background": torch.tensor([COLOUR_NAMES.index(a[2]) for a in asked])}
    heldout = heldout_combinations()
    return targets, torch.tensor([a in heldout for a in asked])


def prompt_accuracy(read: dict[str, torch.Tensor], prompts: list[str]) -> dict[str, dict | None]:
    """Per group (train / heldout combinations): the count of images, each attribute's accuracy, and "all" (the
    three at once). ``read[name][i]`` is what image i shows, ``prompts[i]`` what it was asked for; a group without
    images is None."""
    targets, heldout = prompt_targets(prompts)
    hits = {name: read[name].cpu() == targets[name] for name in ATTRIBUTE_NAMES}
    hits["all"] = torch.stack([hits[name] for name in ATTRIBUTE_NAMES]).all(0)
    result: dict[str, dict | None] = {}
    for group, mask in zip(GROUPS, (~heldout, heldout)):
        count = int(mask.sum())
        result[group] = {"count": count, **{name: int(hit[mask].sum()) / count for name, hit in hits.items()}
                         } if count else None
    return result
