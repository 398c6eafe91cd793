"""The text-to-image part of the report: prompt accuracy and CLIP score per setting, FD against CLIP score over
guidance scales (the usual text-to-image trade-off curve, Ho & Salimans 2022, Fig. 4), and a prompt x steps grid."""

from __future__ import annotations

from collections import defaultdict

import numpy
import torch
from matplotlib.figure import Figure

from diffkd.evaluation.formatting import fmt, markdown_table, strip_images

GROUP_TITLES = {"train": "train combos", "heldout": "held-out combos"}
ACCURACY_COLUMNS = (("all", "all"), ("character", "char"), ("foreground", "fg"), ("background", "bg"))


def text_rows(results: dict) -> list[dict]:
    """The rows of text-conditioned settings (those with a guidance scale)."""
    return [r for r in results["rows"] if r.get("guidance_scale") is not None]


def text_table(results: dict) -> tuple[list[str], list[list[str]]]:
    """One row per setting: guidance, UNet passes per image, CLIP score, FD, and prompt accuracy per group."""
    header = ["model", "sampler", "k", "w", "UNet passes", "CLIP", results["protocol"]["feature_network"]["label"]]
    header += [f"{GROUP_TITLES[g]}: {label}" for g in GROUP_TITLES for _, label in ACCURACY_COLUMNS]
    body = []
    for row in text_rows(results):
        cells = [row["model"], row["sampler"] + (" (reference)" if row["is_reference"] else ""), fmt(row["steps"]),
                 fmt(row["guidance_scale"]), fmt(row["unet_passes"]), fmt(row["clip_score"]), fmt(row["fd"])]
        accuracy = row.get("prompt_accuracy") or {}
        for group in GROUP_TITLES:
            values = accuracy.get(group) or {}
            cells += [fmt(values.get(name)) for name, _ in ACCURACY_COLUMNS]
        body.append(cells)
    return header, body


def guidance_curves(results: dict) -> dict[tuple, list[dict]]:
    """(model, sampler, steps) -> its rows over guidance scales, where CLIP score and FD are both known."""
    curves: dict[tuple, list[dict]] = defaultdict(list)
    for row in text_rows(results):
        if row["fd"] is not None and row["clip_score"] is not None:
            curves[(row["model"], row["sampler"], row["steps"])].append(row)
    return {key: sorted(rows, key=lambda r: r["guidance_scale"]) for key, rows in curves.items()}


def plot_fd_vs_clip(results: dict) -> Figure:
    figure = Figure(figsize=(6.5, 4.2))
    ax = figure.subplots()
    for (model, sampler, steps), rows in guidance_curves(results).items():
        ax.plot([r["clip_score"] for r in rows], [r["fd"] for r in rows], marker="o",
                label=f"{model} · {sampler} · k={steps}")
        for r in rows:
            ax.annotate(f"w={r['guidance_scale']:g}", (r["clip_score"], r["fd"]), fontsize=6, xytext=(3, 3),
                        textcoords="offset points")
    ax.set_yscale("log")
    ax.set_xlabel("CLIP score (higher is better)")
    ax.set_ylabel(f"{results['protocol']['feature_network']['label']} (lower is better)")
    ax.set_title("FD vs CLIP score over guidance scales")
    if ax.lines:
        ax.legend(fontsize=6)
    ax.grid(True, which="both", alpha=0.3)
    return figure


def prompt_grid_panels(results: dict, grids: dict[str, torch.Tensor], key) -> list[tuple[str, list[int], numpy.ndarray]]:
    """Per (model, sampler) at the main guidance scale (a distilled student: its own): prompts down, steps
    across, each column that setting's grid (the first images of the first batch, one per prompt in turn)."""
    main = results["protocol"]["guidance_scale"]
    panels: dict[tuple, dict[int, torch.Tensor]] = defaultdict(dict)
    for row in text_rows(results):
        own = row["role"] == "student" and len({r["guidance_scale"] for r in text_rows(results)
                                                if r["model"] == row["model"]}) == 1
        images = grids.get(key(row))
        if images is not None and (row["guidance_scale"] == main or own):
            panels[(row["model"], row["sampler"], row["guidance_scale"])].setdefault(row["steps"], images)
    result = []
    for (model, sampler, guidance), columns in panels.items():
        steps = sorted(columns)
        count = min(len(columns[k]) for k in steps)
        rows = [strip_images(torch.stack([columns[k][i] for k in steps])) for i in range(count)]
        result.append((f"{model} · {sampler} · w={guidance:g}", steps, numpy.concatenate(rows, axis=0)))
    return result


def plot_prompt_grid(results: dict, grids: dict[str, torch.Tensor], key) -> Figure:
    panels = prompt_grid_panels(results, grids, key)
    prompts = results["protocol"].get("grid_prompts") or []
    if not panels:
        figure = Figure(figsize=(4, 1))
        figure.text(0.5, 0.5, "no sample grids", ha="center")
        return figure
    figure = Figure(figsize=(2.5 + 0.8 * max(len(s) for _, s, _ in panels) * len(panels), 0.75 * len(prompts) + 1))
    axes = figure.subplots(1, len(panels), squeeze=False)[0]
    for index, (ax, (title, steps, image)) in enumerate(zip(axes, panels)):
        ax.imshow(image, interpolation="nearest")
        tile = image.shape[1] // len(steps)
        ax.set_xticks([tile * (i + 0.5) for i in range(len(steps))], [f"k={k}" for k in steps], fontsize=7)
        rows = image.shape[0] // tile
        ax.set_yticks([tile * (i + 0.5) for i in range(rows)], prompts[:rows] if index == 0 else [""] * rows,
                      fontsize=6)
        ax.set_title(title, fontsize=7)
    return figure


def markdown_section(results: dict) -> list[str]:
    """The report's text-to-image section (empty without text pipelines)."""
    if not text_rows(results):
        return []
    header, body = text_table(results)
    p = results["protocol"]
    return ["## Text-to-image: prompt accuracy and CLIP score", "",
            (f"Prompt accuracy ({p.get('prompt_accuracy')}): the fraction of images whose character / foreground / "
            "background, as the glyphs classifier reads them, are their prompt's, on prompts of combinations "
            "training saw and of held-out ones; CLIP score "
            f"({p.get('clip_score')}); UNet passes per image (a guided step costs two)."), "",
            markdown_table(header, body), "", "![FD vs CLIP score](fd_vs_clip.png)", "",
            "![prompts x steps](prompt_grid.png)", ""]
