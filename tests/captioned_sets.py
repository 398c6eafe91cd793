"""Writers of small captioned image sets in the three on-disk formats diffkd streams (tests and eval/ share them).

Row i's image is a flat grey level i % 256 (or row i of ``images`` when given) and its caption is ``captions[i]``
(default ``f"image {i}"``), so a test can tell from a decoded batch which rows it holds and that each image came
with its own caption.
"""

from __future__ import annotations

import io
import json
import tarfile
from collections.abc import Callable
from pathlib import Path

from PIL import Image

Pick = Callable[[int], tuple[Image.Image | bytes, str]]


def flat_rows(size: int = 8, mode: str = "L") -> Pick:
    def pick(i: int) -> tuple[Image.Image, str]:
        level = i % 256
        return Image.new(mode, (size, size), level if mode == "L" else (level, 255 - level, 64)), f"image {i}"
    return pick


def png(image: Image.Image | bytes) -> bytes:
    """The image as PNG bytes; bytes are kept as they are (a test's unreadable image)."""
    if isinstance(image, bytes):
        return image
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def write_metadata_folder(folder: Path, count: int, pick: Pick) -> Path:
    """diffusers' imagefolder convention: images beside metadata.jsonl with file_name and text."""
    folder.mkdir(parents=True, exist_ok=True)
    with (folder / "metadata.jsonl").open("w") as handle:
        for i in range(count):
            image, caption = pick(i)
            sub = folder / f"{i // 1000:04d}"
            sub.mkdir(exist_ok=True)
            (sub / f"{i:07d}.png").write_bytes(png(image))
            handle.write(json.dumps({"file_name": f"{i // 1000:04d}/{i:07d}.png", "text": caption}) + "\n")
    return folder


def write_shards(folder: Path, count: int, pick: Pick, per_shard: int = 1000) -> str:
    """WebDataset tar shards of png + txt + json per sample; returns their brace pattern."""
    folder.mkdir(parents=True, exist_ok=True)
    shards = max(1, -(-count // per_shard))
    for shard in range(shards):
        with tarfile.open(folder / f"shard-{shard:05d}.tar", "w") as tar:
            for i in range(shard * per_shard, min(count, (shard + 1) * per_shard)):
                image, caption = pick(i)
                for extension, data in (("png", png(image)), ("txt", caption.encode()),
                                        ("json", json.dumps({"caption": caption}).encode())):
                    info = tarfile.TarInfo(f"{i:07d}.{extension}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    return str(folder / f"shard-{{00000..{shards - 1:05d}}}.tar")


def write_saved(folder: Path, count: int, pick: Pick) -> Path:
    """A Hugging Face dataset saved with save_to_disk (image bytes embedded), columns image and caption."""
    import datasets

    def rows():
        for i in range(count):
            image, caption = pick(i)
            yield {"image": {"bytes": png(image), "path": None}, "caption": caption}

    features = datasets.Features({"image": datasets.Image(), "caption": datasets.Value("string")})
    datasets.Dataset.from_generator(rows, features=features).save_to_disk(str(folder))
    return folder


WRITERS = {"metadata": write_metadata_folder, "webdataset": write_shards, "saved": write_saved}


def write(kind: str, folder: Path, count: int, pick: Pick) -> str:
    return str(WRITERS[kind](folder, count, pick))
