"""glyphs-32: a captioned colour image set that diffkd renders itself, the text-to-image counterpart of digits.

Each image is one character (A-Z, 0-9) in a foreground colour on a different background colour, drawn with one of
the TrueType faces matplotlib ships, with jitter in size, position and rotation; its caption names character and
colours (and sometimes the face) in one of several templates. Nothing is downloaded, and glyph ``i`` of a set is a
pure function of (seed, split, i), so any slice of a set is reproducible on its own.

A fixed tenth of the character x foreground x background combinations is held out of the training split: prompts
drawn from it test whether a model composes attributes it saw apart, not whether it remembers pairs.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from diffkd.validation import check, check_choice

CHARACTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
COLOURS = {"red": (220, 30, 30), "green": (30, 160, 50), "blue": (30, 70, 220), "yellow": (240, 210, 30),
           "white": (245, 245, 245), "black": (15, 15, 15), "purple": (140, 40, 180), "orange": (245, 130, 20)}
COLOUR_NAMES = tuple(COLOURS)
FAMILIES = ("sans", "serif", "mono", "computer modern")
STYLES = ("regular", "bold", "italic")
FACE_FILES = {  # (family, style) -> file in matplotlib's mpl-data/fonts/ttf
    ("sans", "regular"): "DejaVuSans.ttf", ("sans", "bold"): "DejaVuSans-Bold.ttf",
    ("sans", "italic"): "DejaVuSans-Oblique.ttf",
    ("serif", "regular"): "DejaVuSerif.ttf", ("serif", "bold"): "DejaVuSerif-Bold.ttf",
    ("serif", "italic"): "DejaVuSerif-Italic.ttf",
    ("mono", "regular"): "DejaVuSansMono.ttf", ("mono", "bold"): "DejaVuSansMono-Bold.ttf",
    ("mono", "italic"): "DejaVuSansMono-Oblique.ttf",
    ("computer modern", "regular"): "cmr10.ttf", ("computer modern", "bold"): "cmb10.ttf",
    ("computer modern", "italic"): "cmti10.ttf",
}
TEMPLATES = (
    "a {fg} {kind} {char} on a {bg} background",
    "{char} in {fg} on {bg}",
    "a {fg} {char} on {bg}, {family}",
    "the {kind} {char}, {fg} on a {bg} background, {style} {family}",
)
SPLITS = ("train", "heldout")
HELDOUT_FRACTION = 0.1
HELDOUT_SEED = 20261203  # fixed for good: changing it changes which prompts count as unseen
RENDER_SCALE = 4  # drawn at 4x and reduced with a box filter: antialiased edges at 32 px


@dataclass(frozen=True)
class Glyph:
    """One image's attributes and its caption."""

    character: str
    foreground: str
    background: str
    family: str
    style: str
    template: int

    @property
    def caption(self) -> str:
        kind = "digit" if self.character.isdigit() else "letter"
        return TEMPLATES[self.template].format(fg=self.foreground, bg=self.background, char=self.character,
                                               kind=kind, family=self.family, style=self.style)

    @property
    def combination(self) -> tuple[str, str, str]:
        return self.character, self.foreground, self.background


@dataclass
class GlyphSet:
    """Images as N x 3 x size x size in [-1, 1], their captions, and attribute labels as indices into
    CHARACTERS / COLOUR_NAMES (the targets of the attribute classifier)."""

    images: torch.Tensor
    captions: list[str]
    labels: dict[str, torch.Tensor]


def all_combinations() -> list[tuple[str, str, str]]:
    return [(c, fg, bg) for c in CHARACTERS for fg in COLOUR_NAMES for bg in COLOUR_NAMES if fg != bg]


@cache
def heldout_combinations() -> frozenset[tuple[str, str, str]]:
    """The combinations training never sees: a fixed seeded tenth of all 2,016."""
    combos = all_combinations()
    order = np.random.default_rng(HELDOUT_SEED).permutation(len(combos))
    return frozenset(combos[i] for i in order[:round(HELDOUT_FRACTION * len(combos))])


@cache
def _split_combinations(split: str) -> tuple[tuple[str, str, str], ...]:
    heldout = heldout_combinations()
    return tuple(c for c in all_combinations() if (c in heldout) == (split == "heldout"))


def glyph(seed: int, split: str, index: int) -> Glyph:
    """Glyph ``index`` of the ``split`` set made with ``seed``."""
    rng = _rng(seed, split, index)
    combos = _split_combinations(split)
    character, foreground, background = combos[rng.integers(len(combos))]
    return Glyph(character, foreground, background, FAMILIES[rng.integers(len(FAMILIES))],
                 STYLES[rng.integers(len(STYLES))], int(rng.integers(len(TEMPLATES))))


def glyphs(count: int, seed: int = 0, split: str = "train") -> list[Glyph]:
    check(count >= 1, f"the number of glyphs must be >= 1; got {count}")
    check_choice("glyph split", split, SPLITS)
    return [glyph(seed, split, i) for i in range(count)]


def render(item: Glyph, size: int, seed: int, split: str, index: int) -> Image.Image:
    """The glyph drawn at ``size`` px: character height 50-75% of the image, shifted by up to 12% and rotated by
    up to 15 degrees (the jitter comes from the same seeded stream as the attributes, after them)."""
    rng = _rng(seed, split, index)
    rng.random(5)  # the draws glyph() made
    canvas = size * RENDER_SCALE
    font = _font(item.family, item.style, round(canvas * rng.uniform(0.5, 0.75)))
    layer = Image.new("L", (canvas, canvas), 0)
    draw = ImageDraw.Draw(layer)
    left, top, right, bottom = draw.textbbox((0, 0), item.character, font=font)
    shift = rng.uniform(-0.12, 0.12, size=2) * canvas
    x = (canvas - (right - left)) / 2 - left + shift[0]
    y = (canvas - (bottom - top)) / 2 - top + shift[1]
    draw.text((x, y), item.character, fill=255, font=font)
    layer = layer.rotate(rng.uniform(-15, 15), resample=Image.Resampling.BICUBIC)
    image = Image.composite(Image.new("RGB", layer.size, COLOURS[item.foreground]),
                            Image.new("RGB", layer.size, COLOURS[item.background]), layer)
    return image.resize((size, size), Image.Resampling.BOX)


def glyph_set(count: int, seed: int = 0, split: str = "train", size: int = 32) -> GlyphSet:
    """``count`` rendered glyphs with captions and labels."""
    items = glyphs(count, seed, split)
    pixels = np.stack([np.asarray(render(g, size, seed, split, i)) for i, g in enumerate(items)])
    images = torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 127.5 - 1
    return GlyphSet(images, [g.caption for g in items], attribute_labels(items))


def attribute_labels(items: list[Glyph]) -> dict[str, torch.Tensor]:
    return {"character": torch.tensor([CHARACTERS.index(g.character) for g in items]),
            "foreground": torch.tensor([COLOUR_NAMES.index(g.foreground) for g in items]),
            "background": torch.tensor([COLOUR_NAMES.index(g.background) for g in items])}


_COLOUR_WORD = "|".join(COLOUR_NAMES)
_CAPTION = re.compile(rf"\b(?P<char>[A-Z0-9])\b.*?\b(?P<fg>{_COLOUR_WORD})\b.*?\bon\b.*?\b(?P<bg>{_COLOUR_WORD})\b"
                      rf"|\b(?P<fg2>{_COLOUR_WORD})\b.*?\b(?P<char2>[A-Z0-9])\b.*?\bon\b.*?\b(?P<bg2>{_COLOUR_WORD})\b")


def caption_attributes(caption: str) -> tuple[str, str, str] | None:
    """(character, foreground, background) that a caption asks for, read from its words (None if it names no
    character or colours): prompt accuracy scores images against this, whoever wrote the prompt."""
    found = _CAPTION.search(caption)
    if found is None:
        return None
    groups = found.groupdict()
    if groups["char"] is not None:
        return groups["char"], groups["fg"], groups["bg"]
    return groups["char2"], groups["fg2"], groups["bg2"]


def _rng(seed: int, split: str, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, SPLITS.index(split), index])


@cache
def _font(family: str, style: str, size: int) -> ImageFont.FreeTypeFont:
    import matplotlib

    folder = Path(matplotlib.get_data_path()) / "fonts" / "ttf"
    return ImageFont.truetype(str(folder / FACE_FILES[(family, style)]), size)
