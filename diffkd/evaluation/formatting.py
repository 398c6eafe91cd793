"""How numbers and images look in every report: one formatting of a value, Markdown tables, image strips."""

from __future__ import annotations

import numpy
import torch

TILE = 64  # grid tiles are resized (nearest) to this side so 16 px digits and 512 px images both read well


def fmt(value) -> str:
    """How a results.json value is shown: 4 significant digits, integers and text as they are, '–' for none."""
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def markdown_table(header: list[str], body: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(cells) + " |" for cells in body])


def strip_images(images: torch.Tensor) -> numpy.ndarray:
    """uint8 N x C x H x W -> one row image, each tile resized to TILE px high (nearest)."""
    images = images if images.shape[1] == 3 else images[:, :1].repeat(1, 3, 1, 1)
    scale = TILE / images.shape[-2]
    tiles = torch.nn.functional.interpolate(images.float(), scale_factor=scale, mode="nearest" if scale >= 1
                                            else "area").round().clamp(0, 255).to(torch.uint8)
    return torch.cat(list(tiles), dim=-1).permute(1, 2, 0).numpy()
