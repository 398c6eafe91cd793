"""Per-row conditioning tensors for training batches, and the Conditioning a batch implies.

Text teachers get their prompts encoded once, up front, with the pipeline's own ``encode_prompt`` (the empty
prompt as the unconditional branch); unconditional teachers get nothing, and every method stays the same.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from diffkd.captioned import open_captioned
from diffkd.config import DataConfig
from diffkd.data import load_training_set
from diffkd.errors import DiffkdError
from diffkd.glyphs import glyphs
from diffkd.io import LoadedPipeline
from diffkd.layouts import ADDED
from diffkd.models import Conditioning
from diffkd.streaming import StreamedRows, Transform, caption_of


def read_prompts(prompts: Sequence[str], prompts_file: str | None, option: str = "data.prompts_file") -> list[str]:
    """``prompts`` followed by the lines of ``prompts_file`` (blank lines skipped); ``option`` names the file's
    setting in the error a missing file gets."""
    prompts = list(prompts)
    if prompts_file:
        prompts += read_prompts_file(prompts_file, option)
    return prompts


def read_prompts_file(prompts_file: str, option: str) -> list[str]:
    """The non-blank lines of a UTF-8 text file; a missing, binary or empty file is refused (silently training on no
    prompts, or on the bytes of a .safetensors file taken for text, costs the run)."""
    file = Path(prompts_file).expanduser()
    if not file.is_file():
        raise DiffkdError(f"{option} {prompts_file!r} not found: give a text file, one prompt a line")
    data = file.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        text = None
    if text is None or "\x00" in text:
        raise DiffkdError(f"{option} {prompts_file!r} is not a text file (binary or not UTF-8): give a UTF-8 text "
                          "file, one prompt a line")
    prompts = [line.strip() for line in text.splitlines() if line.strip()]
    if not prompts:
        raise DiffkdError(f"{option} {prompts_file!r} holds no prompts (it is empty or blank): write one prompt a "
                          "line")
    return prompts


def encode_rows(teacher: LoadedPipeline, prompts: Sequence[str], num_rows: int) -> dict[str, torch.Tensor]:
    """Conditioning columns for ``num_rows`` training rows (``prompts`` are cycled over the rows)."""
    if not teacher.text_conditioned:
        return {}
    if not prompts:
        raise DiffkdError("the teacher is text-conditioned but no prompts were given: set data.prompts or "
                          "data.prompts_file")
    return encode_captions(teacher, [prompts[row % len(prompts)] for row in range(num_rows)])


@torch.no_grad()
def encode_captions(teacher: LoadedPipeline, captions: Sequence[str], batch_size: int = 256
                    ) -> dict[str, torch.Tensor]:
    """Row i's conditioning columns are those of ``captions[i]`` (each distinct caption encoded once, by the layout
    with the pipeline's own ``encode_prompt``), beside the unconditional branch of classifier-free guidance, one
    row shared by all (a guidance-distilled layout, Flux, has none)."""
    if not teacher.text_conditioned:
        return {}
    distinct = sorted(set(captions))
    position = {caption: index for index, caption in enumerate(distinct)}
    device = teacher.unet.device
    chunks, shared = [], {}
    for i in range(0, len(distinct), batch_size):
        per_prompt, shared = teacher.layout.encode(teacher.pipeline, distinct[i:i + batch_size], device,
                                                   teacher.latent_size)
        chunks.append({k: v.cpu() for k, v in per_prompt.items()})
    rows = torch.tensor([position[caption] for caption in captions])
    columns = {k: torch.cat([chunk[k] for chunk in chunks])[rows] for k in chunks[0]}
    return {**columns, **{k: v.cpu().expand(len(rows), *v.shape[1:]) for k, v in shared.items()}}


def validation_prompts(data: DataConfig, count: int) -> tuple[list[str], str]:
    """The prompts of a text teacher's ``count`` validation samples, those the run trains on, and where they came
    from: the set's own captions (its first ``count`` rows: glyphs, a captioned set on disk, read without decoding an
    image) where it has them, else data.prompts / data.prompts_file; cycled when there are fewer."""
    source = "the training set's captions"
    if data.source == "glyphs":
        prompts = [item.caption for item in glyphs(min(count, data.num_glyphs), data.seed)]
    else:
        captioned = open_captioned(data.source, data.image_column, data.caption_column)
        if captioned is not None:
            column = captioned.caption_column
            top = column.split(".")[0]  # json.caption: the json column's caption field
            values = captioned.table.select_columns([top])[:min(count, len(captioned))][top]
            prompts = [caption for caption in (caption_of({top: value}, column) for value in values)
                       if isinstance(caption, str) and caption.strip()]
        else:
            prompts, source = read_prompts(data.prompts, data.prompts_file), "data.prompts / data.prompts_file"
    if not prompts:
        raise DiffkdError(f"in-run validation of a text teacher needs prompts and {data.source!r} gave none: set "
                          "data.prompts or data.prompts_file")
    return [prompts[i % len(prompts)] for i in range(count)], source


def row_conditioning(teacher: LoadedPipeline, data: DataConfig, captions: Sequence[str] | None, num_rows: int
                     ) -> dict[str, torch.Tensor]:
    """A text teacher's columns for the training rows: each image's own caption where the data set has them
    (glyphs), otherwise data.prompts / data.prompts_file cycled over the rows."""
    if not teacher.text_conditioned:
        return {}
    if captions is not None:
        return encode_captions(teacher, captions)
    return encode_rows(teacher, read_prompts(data.prompts, data.prompts_file), num_rows)


def training_latents(teacher: LoadedPipeline, data: DataConfig) -> tuple[torch.Tensor, list[str] | None]:
    """The data set as the teacher's latents (the images themselves for a pixel teacher) and its captions, if any."""
    images, captions = load_training_set(data, teacher.image_size, teacher.image_channels)
    with torch.no_grad():
        latents = torch.cat([teacher.denoiser.encode(chunk.to(teacher.unet.device)).cpu()
                             for chunk in images.split(64)])
    return latents, captions


def training_rows(teacher: LoadedPipeline, data: DataConfig) -> dict[str, torch.Tensor] | StreamedRows:
    """The latents ("x0") beside each row's text conditioning: the rows progressive, consistency and DMD train on.
    A captioned set on disk is streamed, each batch encoded as it is drawn (``encode_batch``)."""
    streamed = captioned_rows(teacher, data, lambda pixels, captions: encode_batch(teacher, pixels, captions))
    if streamed is not None:
        return streamed
    latents, captions = training_latents(teacher, data)
    return {"x0": latents, **row_conditioning(teacher, data, captions, len(latents))}


def captioned_rows(teacher: LoadedPipeline, data: DataConfig,
                   encode: Callable[[torch.Tensor, list[str]], dict[str, torch.Tensor]]) -> StreamedRows | None:
    """data.source as rows streamed from disk at the teacher's size (None: an embedded set or a plain folder).

    Streamed rather than encoded once into a latent cache: every method then sees the images the same way, with
    nothing to invalidate when the teacher, the set or the transform changes; the price is one VAE-encoder and
    text-encoder pass per batch, small beside the teacher and student passes of a distillation step."""
    captioned = open_captioned(data.source, data.image_column, data.caption_column)
    if captioned is None:
        return None
    transform = Transform(teacher.image_size, teacher.image_channels, data.resize, data.convert)
    return StreamedRows(captioned, transform, encode, data.num_workers, data.skip_bad_rows)


@torch.no_grad()
def encode_batch(teacher: LoadedPipeline, pixels: torch.Tensor, captions: list[str]) -> dict[str, torch.Tensor]:
    """One streamed batch as the in-memory rows look: latents, and for a text teacher each image's own caption."""
    latents = teacher.denoiser.encode(pixels.to(teacher.unet.device)).cpu()
    return {"x0": latents, **encode_captions(teacher, captions)}


def batch_conditioning(batch: dict[str, torch.Tensor], guidance_scale: float) -> Conditioning:
    """The teacher's conditioning for a batch drawn from rows made by ``encode_rows``: the layout's further inputs
    (columns ``added_<name>``, their unconditional pairs ``uncond_added_<name>``) by name. Text rows without an
    unconditional branch are a guidance-distilled layout's (Flux): w is then the network's ``guidance`` input, one
    conditional pass that a student keeps (``Conditioning.unguided`` leaves ``added`` as it is)."""
    added = {k[len(ADDED):]: v for k, v in batch.items() if k.startswith(ADDED)}
    uncond_added = {k[len("uncond_" + ADDED):]: v for k, v in batch.items() if k.startswith("uncond_" + ADDED)}
    hidden = batch.get("encoder_hidden_states")
    if hidden is not None and "uncond_encoder_hidden_states" not in batch:
        added["guidance"] = torch.full((len(hidden),), float(guidance_scale), device=hidden.device)
    return Conditioning(encoder_hidden_states=hidden,
                        uncond_encoder_hidden_states=batch.get("uncond_encoder_hidden_states"),
                        class_labels=batch.get("class_labels"), guidance_scale=guidance_scale,
                        added=added or None, uncond_added=uncond_added or None)
