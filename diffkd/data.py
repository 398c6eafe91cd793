"""Training images as one in-memory tensor in [-1, 1], and a batch order that is a pure function of the step.

A deterministic ``batch_indices(step)`` is what makes a killed-and-resumed run bit-identical to an uninterrupted
one: no sampler state needs saving, because the order is recomputed from (seed, step).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError
from safetensors.torch import load_file, save_file

from diffkd.config import DataConfig
from diffkd.errors import DiffkdError
from diffkd.glyphs import glyph_set

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


def load_digits(size: int = 16) -> torch.Tensor:
    """scikit-learn's 1,797 8x8 digits, bilinear-resized to ``size``, as N x 1 x size x size in [-1, 1]."""
    from sklearn.datasets import load_digits as sklearn_digits

    pixels = torch.tensor(sklearn_digits().images, dtype=torch.float32).unsqueeze(1) / 16.0
    if size != pixels.shape[-1]:
        pixels = F.interpolate(pixels, size=(size, size), mode="bilinear", align_corners=False)
    return (pixels * 2 - 1).clamp(-1, 1)


DIGITS_SIZES = (8, 16)  # scikit-learn's own 8 px and the embedded teacher's 16 px; other sizes need data.resize
GLYPHS_SIZE = 32  # glyphs-32; data.resize renders them at the model's size instead


def load_glyphs(count: int, seed: int, size: int = GLYPHS_SIZE) -> tuple[torch.Tensor, list[str]]:
    """The first ``count`` training-split glyphs of ``seed`` (diffkd.glyphs) and their captions, rendered once
    (~2 ms an image) and then read from a cache under $DIFFKD_CACHE (default ~/.cache/diffkd)."""
    root = Path(os.environ.get("DIFFKD_CACHE", "~/.cache/diffkd")).expanduser()
    file = root / "glyphs" / f"train-{count}-seed{seed}-{size}px.safetensors"
    if file.is_file():
        try:
            pixels = load_file(str(file))["pixels"]
            captions = json.loads(file.with_suffix(".json").read_text())
            if len(captions) == len(pixels) == count:
                return pixels.float() / 127.5 - 1, captions
        except (OSError, ValueError, KeyError):
            pass
        log.warning("glyph cache %s is unreadable: rendering the set again", file)
    log.info("rendering %d glyphs (seed %d, %d px)", count, seed, size)
    rendered = glyph_set(count, seed, "train", size)
    pixels = ((rendered.images + 1) * 127.5).round().to(torch.uint8).contiguous()
    file.parent.mkdir(parents=True, exist_ok=True)
    partial = file.with_name(f"{file.stem}.{os.getpid()}.partial")
    save_file({"pixels": pixels}, str(partial))
    file.with_suffix(".json").write_text(json.dumps(rendered.captions))
    partial.replace(file)  # the tensor file last: a cache whose tensors exist is complete
    return pixels.float() / 127.5 - 1, rendered.captions


def load_training_set(data: DataConfig, size: int, channels: int) -> tuple[torch.Tensor, list[str] | None]:
    """The images of ``data.source`` at the model's size and channels, and each image's caption where the set has
    them (glyphs): a text model then trains on the caption that describes each image, not on prompts cycled over
    the rows."""
    if data.source != "glyphs":
        return load_images(data.source, size, channels, data.resize, data.convert), None
    check_fit("glyphs", size, channels, data.resize, data.convert, "data.source",
              "glyphs are 32x32 RGB: set data.resize=true to render them at the model's size and/or "
              "data.convert=true to make them grey")
    images, captions = load_glyphs(data.num_glyphs, data.seed, size)
    return (images if channels == 3 else images.mean(1, keepdim=True)), captions


def image_files(path: str | Path) -> list[Path]:
    """The PNG/JPEG files under ``path``, sorted; one clear error for a missing or empty folder."""
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise DiffkdError(f"data folder {str(path)!r} does not exist or is not a folder: set data.source to "
                          "'digits' or to a folder of PNG/JPEG images")
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise DiffkdError(f"data folder {str(path)!r} holds no PNG/JPEG images: add images or set data.source")
    return files


def load_image_folder(path: str | Path, size: int, channels: int) -> torch.Tensor:
    """Every PNG/JPEG under ``path``: shorter side resized to ``size``, centre-cropped, converted to ``channels``."""
    files = image_files(path)
    _check_uniform(files)
    return torch.stack([_load_image(p, size, channels) for p in files])


CAPTIONED_SETS = ("glyphs",)


def brings_captions(source: str) -> bool:
    """Whether data set ``source`` comes with a caption per image, which a text model trains on instead of prompts."""
    return source in CAPTIONED_SETS


def set_shape(source: str) -> tuple[list[tuple[int, int]], int]:
    """The sizes (width, height) an image set comes in and its channels (1 grey, 3 colour)."""
    if source == "digits":
        return [(s, s) for s in DIGITS_SIZES], 1
    if source == "glyphs":
        return [(GLYPHS_SIZE, GLYPHS_SIZE)], 3
    files = image_files(source)
    _check_uniform(files)
    with Image.open(files[0]) as image:
        return [image.size], 1 if image.mode in GREY_MODES else 3


def check_fit(source: str, size: int, channels: int, resize: bool, convert: bool, role: str, fix: str) -> None:
    """Refuse a set whose images differ from the model's in size or colour unless resizing/converting was asked
    for: a 16 px grey set scaled to 32 px RGB trains (or scores) a model on images it should never see."""
    sizes, set_channels = set_shape(source)
    size_ok = resize or (size, size) in sizes
    channels_ok = convert or set_channels == channels
    if size_ok and channels_ok:
        return
    colour = {1: "grey", 3: "RGB"}
    have = " or ".join(f"{w}x{h}" for w, h in sizes)
    raise DiffkdError(f"{role} {source!r} holds {have} {colour.get(set_channels, set_channels)} images but the "
                      f"model makes {size}x{size} {colour.get(channels, f'{channels}-channel')} ones: {fix}")


GREY_MODES = ("1", "L", "LA", "I", "I;16", "F")


def _check_uniform(files: list[Path]) -> None:
    """One size and one colour kind (grey or colour; alpha aside) for the whole set: a mixed folder is usually a
    mistake (a stray thumbnail, a wrong sub-folder), and resizing or colouring it silently would hide it."""
    first: dict[str, tuple[Path, object]] = {}
    for file in files:
        try:
            with Image.open(file) as image:
                facts = {"sizes": image.size, "channels": "grey" if image.mode in GREY_MODES else "colour"}
        except (UnidentifiedImageError, OSError) as error:
            raise DiffkdError(f"cannot read image {str(file)!r} ({type(error).__name__}): remove or replace "
                              "it") from None
        for kind, value in facts.items():
            seen = first.setdefault(kind, (file, value))
            if seen[1] != value:
                describe = (lambda v: f"{v[0]}x{v[1]}") if kind == "sizes" else str
                raise DiffkdError(f"data folder holds images of mixed {kind}: {str(seen[0])!r} is "
                                  f"{describe(seen[1])} but {str(file)!r} is {describe(value)}; convert them to one "
                                  "size and colour mode (or remove the odd ones)")


def _load_image(path: Path, size: int, channels: int) -> torch.Tensor:
    try:
        with Image.open(path) as image:
            pixels = fit_image(image, size, channels)
    except (UnidentifiedImageError, OSError) as error:
        raise DiffkdError(f"cannot read image {str(path)!r} ({type(error).__name__}): remove or replace it") from error
    return pixels.float() / 127.5 - 1


def fit_image(image: Image.Image, size: int, channels: int) -> torch.Tensor:
    """``image`` as channels x size x size uint8: shorter side resized (bicubic) to ``size``, centre-cropped.
    Deterministic (no random crop), so a batch is a pure function of its rows, in any worker."""
    image = image.convert("L" if channels == 1 else "RGB")
    scale = size / min(image.size)
    w, h = max(size, round(image.width * scale)), max(size, round(image.height * scale))
    image = image.resize((w, h), Image.Resampling.BICUBIC)
    left, top = (w - size) // 2, (h - size) // 2
    image = image.crop((left, top, left + size, top + size))
    pixels = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8)
    return pixels.reshape(size, size, channels).permute(2, 0, 1).contiguous()


def load_images(source: str, size: int, channels: int, resize: bool = False, convert: bool = False) -> torch.Tensor:
    """``'digits'`` for the embedded set, ``'glyphs'`` for glyphs-32 (its default count and seed), otherwise a
    folder of images, at the teacher's size and channels; a set
    of another size or colour is refused unless ``resize`` / ``convert`` (data.resize / data.convert) ask for it."""
    check_fit(source, size, channels, resize, convert, "data.source",
              "use images of the teacher's size and colour, or set data.resize=true (scale and centre-crop) and/or "
              "data.convert=true (grey <-> RGB) to adapt them")
    if source == "digits":
        images = load_digits(size)
        return images if channels == 1 else images.repeat(1, channels, 1, 1)
    if source == "glyphs":
        return load_training_set(DataConfig(source="glyphs", resize=resize, convert=convert), size, channels)[0]
    return load_image_folder(source, size, channels)


def batch_indices(num_items: int, batch_size: int, step: int, seed: int) -> torch.Tensor:
    """Indices of global batch ``step``: epochs of seeded random permutations, a pure function of the step."""
    start = step * batch_size
    indices = []
    while len(indices) < batch_size:
        epoch, offset = divmod(start + len(indices), num_items)
        order = torch.randperm(num_items, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
        indices.extend(order[offset:offset + batch_size - len(indices)].tolist())
    return torch.tensor(indices)
