"""Training rows of a captioned set decoded on the fly in DataLoader workers: nothing proportional to the set's size
is held in memory.

The trainer hands ``StreamedRows.batches`` the rows every future shard of every update will need, in order (each
a pure function of (seed, step), diffkd.data.batch_indices); the workers decode, resize and crop those rows ahead
of the loop, and the main process encodes them (VAE latents, text-encoder states) with the method's ``encode``.
Workers return uint8 pixels and caption strings only, so the batches are bit-identical with any number of workers,
and a resumed run recomputes the same plan from its step. Before training, one pass over the set (also in the
workers) finds unreadable images, rows without a caption and images of the wrong size, so a bad set is refused
before anything is written.
"""

from __future__ import annotations

import io
import logging
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import DataLoader

from diffkd.captioned import CaptionedSet
from diffkd.data import GREY_MODES, fit_image
from diffkd.errors import DiffkdError

log = logging.getLogger(__name__)

SCAN_CHUNK = 512
Key = tuple[int, ...]


@dataclass(frozen=True)
class Transform:
    """How rows become pixels: the model's size and channels, and whether other sizes / colours may be adapted."""

    size: int
    channels: int
    resize: bool
    convert: bool


class RowProblem(Exception):
    """A row that cannot train: ``unreadable`` ones (a broken image, no caption) may be skipped on request."""

    def __init__(self, message: str, unreadable: bool):
        super().__init__(message)
        self.unreadable = unreadable


def _where(captioned: CaptionedSet, row: int, image: dict, values: dict) -> str:
    """A row as a user finds it: its file for a folder, its key and shard for WebDataset, else its row number."""
    if "__key__" in values:
        return f"sample {values['__key__']!r} of shard {values.get('__url__')!r}"
    if image and image.get("path") and not image.get("bytes"):
        return f"image {image['path']!r}"
    return f"row {row} of {captioned.kind} set"


def caption_of(values: dict, column: str) -> object:
    """The caption in ``column``; ``json.caption`` reads a field of a struct column (a WebDataset sample's json)."""
    value = values.get(column.split(".")[0])
    for part in column.split(".")[1:]:
        value = value.get(part) if isinstance(value, dict) else None
    return value


def decode_row(captioned: CaptionedSet, row: int, values: dict, transform: Transform) -> tuple[torch.Tensor, str]:
    """Row ``row``'s pixels (uint8, channels x size x size) and caption, or a RowProblem naming the row and the fix."""
    image = values.get(captioned.image_column) or {}
    where = _where(captioned, row, image, values)
    caption = caption_of(values, captioned.caption_column)
    if not isinstance(caption, str) or not caption.strip():
        raise RowProblem(f"{where} has no caption in column {captioned.caption_column!r}: add one, or set "
                         "data.skip_bad_rows=true to leave such rows out", True)
    try:
        with Image.open(io.BytesIO(image["bytes"]) if image.get("bytes") else image["path"]) as opened:
            opened.load()
            if not transform.resize and opened.size != (transform.size, transform.size):
                raise RowProblem(f"{where} is {opened.width}x{opened.height} but the model makes {transform.size}x"
                                 f"{transform.size} images: set data.resize=true to scale and centre-crop", False)
            grey = opened.mode in GREY_MODES
            if not transform.convert and grey != (transform.channels == 1):
                raise RowProblem(f"{where} is {'grey' if grey else 'colour'} but the model makes "
                                 f"{transform.channels}-channel images: set data.convert=true", False)
            return fit_image(opened, transform.size, transform.channels), caption
    except (UnidentifiedImageError, OSError, KeyError, TypeError, ValueError) as error:
        raise RowProblem(f"cannot read {where} ({type(error).__name__}): remove or replace it, or set "
                         "data.skip_bad_rows=true", True) from None


class _Rows(torch.utils.data.Dataset):
    """Worker side: fetch a plan item's rows from the memory-mapped table and decode them."""

    def __init__(self, captioned: CaptionedSet, transform: Transform, good: torch.Tensor | None):
        self.captioned, self.transform, self.good = captioned, transform, good

    def __len__(self) -> int:
        return len(self.good) if self.good is not None else len(self.captioned)

    def __getitems__(self, item: tuple[Key, list[int]]) -> tuple[Key, torch.Tensor | str, list[str]]:
        key, rows = item
        rows = self.good[rows].tolist() if self.good is not None else list(rows)
        columns = self.captioned.table[rows]
        pixels, captions = [], []
        for position, row in enumerate(rows):
            values = {name: column[position] for name, column in columns.items()}
            try:
                image, caption = decode_row(self.captioned, row, values, self.transform)
            except RowProblem as problem:
                return key, str(problem), []
            pixels.append(image)
            captions.append(caption)
        return key, torch.stack(pixels), captions


class _Scan(torch.utils.data.Dataset):
    """Worker side of the pass before training: each chunk's rows that cannot train, with their problems."""

    def __init__(self, captioned: CaptionedSet, transform: Transform):
        self.rows = _Rows(captioned, transform, None)

    def __len__(self) -> int:
        return (len(self.rows) + SCAN_CHUNK - 1) // SCAN_CHUNK

    def __getitem__(self, chunk: int) -> list[tuple[int, str, bool]]:
        captioned, start = self.rows.captioned, chunk * SCAN_CHUNK
        rows = list(range(start, min(start + SCAN_CHUNK, len(captioned))))
        columns = captioned.table[rows]
        problems = []
        for position, row in enumerate(rows):
            try:
                decode_row(captioned, row, {name: column[position] for name, column in columns.items()},
                           self.rows.transform)
            except RowProblem as problem:
                problems.append((row, str(problem), problem.unreadable))
        return problems


def _keep(item):
    return item


def scan(captioned: CaptionedSet, transform: Transform, skip_bad_rows: bool, num_workers: int
         ) -> torch.Tensor | None:
    """The rows that train (None: all of them). A problem is a DiffkdError naming the first bad row, unless it is
    an unreadable row and ``skip_bad_rows`` leaves it out (and counts it)."""
    loader = DataLoader(_Scan(captioned, transform), batch_size=None, num_workers=num_workers, collate_fn=_keep)
    bad: list[int] = []
    for problems in loader:
        for row, message, unreadable in problems:
            if not (unreadable and skip_bad_rows):
                raise DiffkdError(message)
            bad.append(row)
    if not bad:
        return None
    if len(bad) == len(captioned):
        raise DiffkdError(f"every row of data set {captioned.kind!r} is unreadable or has no caption: check "
                          "data.image_column / data.caption_column")
    log.warning("data: %d of %d rows are unreadable or have no caption and are left out (data.skip_bad_rows)",
                len(bad), len(captioned))
    keep = torch.ones(len(captioned), dtype=torch.bool)
    keep[bad] = False
    return keep.nonzero().flatten()


class StreamedRows:
    """Training rows read from disk as the trainer asks for them; ``encode(pixels in [-1, 1], captions)`` makes a
    batch's tensors (latents, text-encoder states). ``skipped``: rows left out by data.skip_bad_rows."""

    def __init__(self, captioned: CaptionedSet, transform: Transform, encode: Callable[[torch.Tensor, list[str]],
                 dict[str, torch.Tensor]], num_workers: int, skip_bad_rows: bool):
        good = scan(captioned, transform, skip_bad_rows, num_workers)
        self.rows = _Rows(captioned, transform, good)
        self.skipped = len(captioned) - len(self.rows)
        self.encode, self.num_workers = encode, num_workers
        self.wait_seconds = 0.0

    def __len__(self) -> int:
        return len(self.rows)

    def batches(self, plan: Iterable[tuple[Key, list[int]]]) -> Iterator[tuple[Key, dict[str, torch.Tensor]]]:
        """Each plan item's batch, in plan order; the workers decode ahead of the loop."""
        loader = iter(DataLoader(self.rows, batch_sampler=plan, num_workers=self.num_workers, collate_fn=_keep,
                                 prefetch_factor=4 if self.num_workers else None))
        while True:
            started = time.perf_counter()
            try:
                key, pixels, captions = next(loader)
            except StopIteration:
                return
            self.wait_seconds += time.perf_counter() - started  # the loop stood still for the workers
            if isinstance(pixels, str):
                raise DiffkdError(pixels)
            yield key, self.encode(pixels.float() / 127.5 - 1, captions)
