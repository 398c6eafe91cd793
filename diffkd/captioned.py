"""Captioned image sets on disk, opened with Hugging Face ``datasets``: a folder with diffusers' ``metadata.jsonl``,
a dataset saved with ``save_to_disk`` (or a hub name), or WebDataset tar shards.

``datasets`` reads all three with its own builders (json over metadata.jsonl, webdataset, load_from_disk) into
memory-mapped Arrow tables, so a row is random access without holding the set in memory: that is what lets the
batch order stay a pure function of (seed, step) for every format (a tar read front to back, as ``webdataset`` streams it, has no
random access). Images are kept undecoded here (``Image(decode=False)``); diffkd.streaming decodes them in
DataLoader workers.
"""

from __future__ import annotations

import logging
import os
import socket
import tarfile
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

from diffkd.errors import DiffkdError

log = logging.getLogger(__name__)

EMBEDDED = ("digits", "glyphs")
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")


@dataclass
class CaptionedSet:
    """An undecoded Arrow table and which of its columns hold the image and the caption (``json.caption``: the
    ``caption`` field of a WebDataset sample's json)."""

    table: object  # datasets.Dataset
    image_column: str
    caption_column: str
    kind: str

    def __len__(self) -> int:
        return len(self.table)


def shard_list(source: str) -> list[str]:
    """WebDataset shards: brace patterns (``s-{000..009}.tar``) joined by ``::``, webdataset's own list syntax."""
    from braceexpand import braceexpand

    return [shard for part in source.split("::") for shard in braceexpand(part.strip())]


def kind_of(source: str) -> str | None:
    """'metadata', 'saved', 'webdataset', 'hub', or None for the embedded sets and plain image folders."""
    if source in EMBEDDED:
        return None
    if ".tar" in source:
        return "webdataset"
    path = Path(source).expanduser()
    if path.is_dir():
        if (path / "metadata.jsonl").is_file():
            return "metadata"
        if any((path / name).is_file() for name in ("dataset_info.json", "state.json", "dataset_dict.json")):
            return "saved"
        return None
    looks_local = source.startswith((".", "/", "~")) or source.count("/") != 1
    return None if looks_local else "hub"


def open_captioned(source: str, image_column: str = "", caption_column: str = "") -> CaptionedSet | None:
    """The captioned set ``source`` names, or None when it is an embedded set or a plain image folder."""
    kind = kind_of(source)
    if kind is None:
        return None
    import datasets

    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()
    table = _load(datasets, kind, source)
    columns = table.column_names
    image = image_column or next((c for c in ("image", *IMAGE_EXTENSIONS) if c in columns), "image")
    caption = caption_column or next((c for c in ("text", "caption", "txt") if c in columns), "text")
    for option, column in (("data.image_column", image), ("data.caption_column", caption)):
        if column.split(".")[0] not in columns:
            raise DiffkdError(f"data set {source!r} has no column {column!r} (its columns: {', '.join(columns)}): "
                              f"set {option} to one of them")
    table = table.cast_column(image, datasets.Image(decode=False))
    return CaptionedSet(table, image, caption, kind)


def _load(datasets, kind: str, source: str):
    """The set's Arrow table (train split), built once into ``datasets``' cache and memory-mapped after."""
    if kind == "saved":
        table = datasets.load_from_disk(str(Path(source).expanduser()))
        return table["train"] if isinstance(table, datasets.DatasetDict) else table
    if kind == "metadata":
        return _metadata_table(datasets, source)
    if kind == "webdataset":
        shards = shard_list(source)
        for shard in shards:
            check_shard(shard)
        return datasets.load_dataset("webdataset", data_files={"train": shards}, split="train")
    try:
        if not _hub_reachable():
            raise ConnectionError("no network")  # datasets would retry for ~25 s before failing the same way
        return datasets.load_dataset(source, split="train")
    except (OSError, ValueError) as error:  # ConnectionError and the hub's not-found errors are OSErrors
        raise DiffkdError(
            f"cannot load Hugging Face dataset {source!r} from the hub ({type(error).__name__}): on a machine with "
            f"internet run `python -c \"import datasets; datasets.load_dataset('{source}', split='train')"
            f".save_to_disk('DIR')\"`, copy DIR here and set data.source=DIR") from None


def _metadata_table(datasets, source: str):
    """diffusers' metadata.jsonl convention, read as the rows it lists: the json builder over the one file, and each
    ``file_name`` joined to the folder as the image's path. ``imagefolder`` would list every file of the folder
    first: at 200,000 images that took 145 s and 0.6 GB on every start, cached or not."""
    folder = Path(source).expanduser().resolve()
    metadata = str(folder / "metadata.jsonl")
    try:
        table = datasets.load_dataset("json", data_files=metadata, split="train")
    except (ValueError, OSError, datasets.exceptions.DatasetGenerationError) as error:
        raise DiffkdError(f"cannot read {metadata!r} ({str(error).splitlines()[0]}): give one JSON object a line "
                          "with file_name and a caption column") from None
    if "file_name" not in table.column_names:
        raise DiffkdError(f"{metadata!r} has no file_name field (its fields: "
                          f"{', '.join(table.column_names)}): give each line the image's path in the folder as "
                          "file_name")
    root = str(folder)
    return table.map(lambda batch: {"image": [os.path.join(root, name) for name in batch["file_name"]]},
                     batched=True, remove_columns=["file_name"])


def _hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the hub's host answers at all: offline, fail at once rather than after ``datasets``' retries."""
    if os.environ.get("HF_HUB_OFFLINE") == "1" or os.environ.get("HF_DATASETS_OFFLINE") == "1":
        return True  # datasets itself then refuses at once, in its own words
    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or "huggingface.co"
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
    except OSError:
        return False
    return True


def check_shard(shard: str) -> None:
    """A shard that is missing, not a tar, or empty is refused by name before ``datasets`` builds anything."""
    if not os.path.isfile(shard):
        raise DiffkdError(f"WebDataset shard {shard!r} does not exist: check data.source's pattern")
    try:
        with tarfile.open(shard) as tar:
            first = tar.next()
    except (tarfile.TarError, OSError) as error:
        raise DiffkdError(f"WebDataset shard {shard!r} is not a readable tar ({type(error).__name__}): "
                          "remove or rewrite it") from None
    if first is None:
        raise DiffkdError(f"WebDataset shard {shard!r} is empty: remove it from data.source or rewrite it")
