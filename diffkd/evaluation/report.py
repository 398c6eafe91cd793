"""results.json, report.md, a self-contained report.html, plots and sample grids from one EvalResults.

Every number in the reports is ``fmt`` of the number in results.json, so the two never disagree.
"""

from __future__ import annotations

import base64
import html
import json
import logging
import re
from collections import defaultdict
from pathlib import Path

import torch
import yaml
from matplotlib.figure import Figure  # the object API: no pyplot state, no GUI backend
from matplotlib.ticker import NullLocator
from PIL import Image

from diffkd import round_health
from diffkd.evaluation.formatting import fmt, markdown_table, strip_images
from diffkd.evaluation.text_report import (
    markdown_section,
    plot_fd_vs_clip,
    plot_prompt_grid,
    text_rows,
    text_table,
)

log = logging.getLogger(__name__)

COLUMNS = [("model", "model"), ("sampler", "sampler"), ("steps", "k"), ("fd", None), ("kid", "KID (unscaled)"),
           ("psnr", "PSNR dB"), ("lpips", "LPIPS"), ("clip_score", "CLIP"), ("ms_per_image", "ms/image"),
           ("images_per_second", "images/s"), ("speedup", "speed-up"), ("parameters", "params"),
           ("peak_memory_mb", "peak MB")]


def fd_label(results: dict) -> str:
    return results["protocol"]["feature_network"]["label"]


def setting_key(model: str, sampler: str, steps: int, guidance: float | None) -> str:
    """A setting's name in grids and results: model/sampler/steps, and /w<scale> for text pipelines."""
    return f"{model}/{sampler}/{steps}" + (f"/w{guidance:g}" if guidance is not None else "")


def row_key(row: dict) -> str:
    return setting_key(row["model"], row["sampler"], row["steps"], row.get("guidance_scale"))


def curve_label(row: dict) -> str:
    """The sampler, and the guidance scale for text pipelines: one curve of the quality-vs-steps table."""
    guidance = row.get("guidance_scale")
    return row["sampler"] + (f" w={guidance:g}" if guidance is not None else "")


def setting_name(row: dict) -> str:
    name = f"{row['model']} · {curve_label(row)}"
    return name + " (reference)" if row["is_reference"] else name


def steps_table(results: dict) -> tuple[list[str], list[list[str]]]:
    """FD by (model, sampler) x k: DESIGN.md §4's table. The reference run and the noise floor are own rows."""
    steps = sorted({r["steps"] for r in results["rows"] if not r["is_reference"]})
    curves: dict[tuple, dict] = defaultdict(dict)
    for row in results["rows"]:
        if not row["is_reference"] or row["steps"] in steps:  # a reference run at a swept k is that k's number too
            curves[(row["model"], curve_label(row))][row["steps"]] = row["fd"]
    header = ["model", "sampler", *[f"k={k}" for k in steps]]
    body = [[m, s, *[fmt(values.get(k)) for k in steps]] for (m, s), values in curves.items()]
    for row in results["rows"]:
        if row["is_reference"]:
            body.append([row["model"], f"{curve_label(row)}-{row['steps']} (reference)", fmt(row["fd"]),
                         *[""] * (len(steps) - 1)])
    if results["noise_floor"]:
        body.append(["real vs real", "noise floor", fmt(results["noise_floor"]["fd"]), *[""] * (len(steps) - 1)])
    return header, body


def settings_table(results: dict) -> tuple[list[str], list[list[str]]]:
    header = [label or fd_label(results) for _, label in COLUMNS]
    body = [[(curve_label(row) if key == "sampler" else fmt(row[key]))
             + (" (reference)" if key == "sampler" and row["is_reference"] else "")
             for key, _ in COLUMNS] for row in results["rows"]]
    return header, body


def verdict(results: dict) -> list[str]:
    """One sentence per student at its own step count: FD against the teacher's reference and the best
    training-free sampler at the same k, and its speed-up (what a reader wants before any table)."""
    rows = results["rows"]
    reference = next((r for r in rows if r["is_reference"] and r["fd"]), None)
    lines = []
    for model in results["models"]:
        if model["role"] != "student":
            continue
        own = [r for r in rows if r["model"] == model["name"] and r["fd"] is not None]
        row = next((r for r in own if r["steps"] == model["card_steps"]), own[-1] if own else None)
        if row is None:
            continue
        text = f"**{model['name']}**, {row['steps']} steps: {fd_label(results)} {fmt(row['fd'])}"
        if reference is not None:
            text += (f", {row['fd'] / reference['fd']:.2f}x the teacher's {reference['sampler']}-{reference['steps']}"
                     + (f" at {row['speedup']:.1f}x its speed" if row["speedup"] else ""))
        rivals = [r for r in rows if r["role"] == "teacher" and not r["is_reference"] and r["steps"] == row["steps"]
                  and r["fd"] is not None]
        if rivals:
            best = min(rivals, key=lambda r: r["fd"])
            ratio = best["fd"] / row["fd"]
            text += (f"; {ratio:.2f}x better than {best['sampler']} at {row['steps']} steps" if ratio >= 1 else
                     f"; {1 / ratio:.2f}x worse than {best['sampler']} at {row['steps']} steps")
        lines.append(text + " (lower FD is better).")
    return lines


def coinciding_samplers(results: dict) -> str | None:
    """Why a teacher's samplers give one number at small k: multistep solvers (DPM-Solver++ 2M, UniPC) have no
    history at their first step and take a first-order, DDIM-equivalent one (Lu et al. 2022; Zhao et al. 2023)."""
    same = []
    for k in sorted({r["steps"] for r in results["rows"]}):
        fds = {(r["model"], r["sampler"]): r["fd"] for r in results["rows"]
               if r["role"] == "teacher" and not r["is_reference"] and r["steps"] == k and r["fd"] is not None}
        if len(fds) > 1 and len({f"{v:.6g}" for v in fds.values()}) == 1:
            same.append(str(k))
    if not same:
        return None
    return (f"The teacher's samplers coincide at k = {', '.join(same)}: DPM-Solver++ and UniPC are multistep "
            "methods whose first step, with no history yet, is the first-order DDIM step, so their few-step "
            "outputs are DDIM's.")


def summary_table(results: dict) -> str:
    """The quality-vs-steps table as Markdown (what the CLI prints)."""
    header, body = steps_table(results)
    return f"{fd_label(results)} (lower is better)\n" + markdown_table(header, body)


def write_report(results, grids: dict[str, torch.Tensor], output: Path) -> None:
    """Write everything into ``output``: the JSON, the plots, the grids, then the two reports that show them."""
    output.mkdir(parents=True, exist_ok=True)
    data = results.to_dict()
    (output / "results.json").write_text(json.dumps(data, indent=2, allow_nan=False))
    (output / "grids").mkdir(exist_ok=True)
    rows = {row_key(r): r for r in data["rows"]}
    for key, images in grids.items():
        if images is not None:
            Image.fromarray(strip_images(images)).save(output / rows[key]["grid"])
    figures = {"quality_vs_steps.png": plot_quality_vs_steps(data), "quality_vs_latency.png":
               plot_quality_vs_latency(data), "samples.png": plot_samples(data, grids)}
    if text_rows(data):
        figures |= {"fd_vs_clip.png": plot_fd_vs_clip(data), "prompt_grid.png": plot_prompt_grid(data, grids, row_key)}
    for name, figure in figures.items():
        figure.savefig(output / name, dpi=110, bbox_inches="tight")
    (output / "report.md").write_text(markdown_report(data, round_health.report_lines(
        output.parent / "training_summary.json")))
    (output / "report.html").write_text(html_report(data, output))
    log.info("wrote %s", output / "report.html")


def _curves(results: dict) -> dict[tuple, list[dict]]:
    curves: dict[tuple, list[dict]] = defaultdict(list)
    for row in results["rows"]:
        if not row["is_reference"] and row["fd"] is not None:
            curves[(row["model"], curve_label(row))].append(row)
    return curves


def _reference_lines(ax, results: dict) -> None:
    for row in results["rows"]:
        if row["is_reference"] and row["fd"] is not None:
            ax.axhline(row["fd"], color="black", linestyle="--",
                       label=f"{row['model']} {row['sampler']}-{row['steps']} (reference)")
    if results["noise_floor"]:
        ax.axhline(results["noise_floor"]["fd"], color="grey", linestyle=":", label="real vs real (noise floor)")


def plot_quality_vs_steps(results: dict):
    figure = Figure(figsize=(6.5, 4.2))
    ax = figure.subplots()
    for (model, sampler), rows in _curves(results).items():
        rows = sorted(rows, key=lambda r: r["steps"])
        ax.plot([r["steps"] for r in rows], [r["fd"] for r in rows], marker="o", label=f"{model} · {sampler}")
    _reference_lines(ax, results)
    ax.set_xscale("log", base=2)
    steps = sorted({r["steps"] for r in results["rows"] if not r["is_reference"]})
    ax.set_xticks(steps, [str(k) for k in steps])
    ax.xaxis.set_minor_locator(NullLocator())
    ax.set_yscale("log")
    ax.set_xlabel("sampling steps k")
    ax.set_ylabel(f"{fd_label(results)} (lower is better)")
    ax.set_title("Quality vs steps")
    ax.legend(fontsize=7)
    ax.grid(True, which="both", alpha=0.3)
    return figure


def plot_quality_vs_latency(results: dict):
    figure = Figure(figsize=(6.5, 4.2))
    ax = figure.subplots()
    for (model, sampler), rows in _curves(results).items():
        rows = sorted(rows, key=lambda r: r["ms_per_image"])
        ax.plot([r["ms_per_image"] for r in rows], [r["fd"] for r in rows], marker="o", label=f"{model} · {sampler}")
        for r in rows:
            ax.annotate(str(r["steps"]), (r["ms_per_image"], r["fd"]), fontsize=7, xytext=(3, 3),
                        textcoords="offset points")
    for row in results["rows"]:
        if row["is_reference"] and row["fd"] is not None:
            ax.plot([row["ms_per_image"]], [row["fd"]], marker="*", markersize=12, color="black", linestyle="",
                    label=f"{row['model']} {row['sampler']}-{row['steps']} (reference)")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel(f"ms per image (batch {results['protocol']['batch_size']})")
    ax.set_ylabel(f"{fd_label(results)} (lower is better)")
    ax.set_title("Quality vs latency (numbers: steps)")
    ax.legend(fontsize=7)
    ax.grid(True, which="both", alpha=0.3)
    return figure


def plot_samples(results: dict, grids: dict[str, torch.Tensor]):
    """All settings' first images from the same noise, one row per (model, sampler, steps)."""
    rows = [r for r in results["rows"] if grids.get(row_key(r)) is not None]
    strips = [strip_images(grids[row_key(r)]) for r in rows]
    width = max(s.shape[1] for s in strips)
    figure = Figure(figsize=(width / 80 + 2.5, 0.9 * len(rows)))
    axes = figure.subplots(len(rows), 1, squeeze=False)
    for ax, row, strip in zip(axes[:, 0], rows, strips):
        ax.imshow(strip, interpolation="nearest")
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_ylabel(f"{setting_name(row)}\nk={row['steps']}  {fmt(row['fd'])}", rotation=0, ha="right",
                      va="center", fontsize=7)
    return figure


def _intro(results: dict) -> list[str]:
    p = results["protocol"]
    teacher = (f"teacher **{p['teacher']}** (reference: {p['teacher_reference']['sampler']}-"
               f"{p['teacher_reference']['steps']})" if p["teacher"] else "no teacher")
    floor = results["noise_floor"]
    return [f"{len(results['models'])} pipelines, {teacher}; {p['num_samples']} samples per setting against "
            f"`{p['reference_set']['source']}` ({p['reference_set']['num_images']} real images); quality is "
            f"**{fd_label(results)}** (feature network `{p['feature_network']['name']}`)"
            + (f"; noise floor (real vs real) {fmt(floor['fd'])}." if floor else "."),
            f"Evaluation took {fmt(results['elapsed_seconds'])} s on {p['machine'].get('gpu', p['machine']['cpu'])}."]


def markdown_report(results: dict, warnings: list[str] = ()) -> str:
    """The report; ``warnings`` (failed training rounds of the run beside it) go right under the intro."""
    steps_header, steps_body = steps_table(results)
    header, body = settings_table(results)
    note = coinciding_samplers(results)
    parts = ["# diffkd evaluation", "", *[f"{line}  " for line in verdict(results)], "", *_intro(results), "",
             *[line + "\n" for line in warnings],
             f"## Quality vs steps: {fd_label(results)} (lower is better)", "",
             markdown_table(steps_header, steps_body), "", *([note, ""] if note else []),
             "![quality vs steps](quality_vs_steps.png)", "",
             "## Every setting", "", markdown_table(header, body), "",
             "![quality vs latency](quality_vs_latency.png)", "",
             "## Samples from the same noise", "", "![samples](samples.png)", "", *markdown_section(results),
             "## Protocol", "", "```yaml", yaml.safe_dump(results["protocol"], sort_keys=False).strip(), "```", ""]
    return "\n".join(parts)


def inline_markdown(text: str) -> str:
    """The Markdown the report's prose uses (**bold**, `code`) as HTML, everything else escaped."""
    text = html.escape(text)
    text = re.sub(r"\*\*(.+?)\*\*", r"<b>\1</b>", text)
    return re.sub(r"`(.+?)`", r"<code>\1</code>", text)


def _html_table(header: list[str], body: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    rows = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in cells) + "</tr>" for cells in body)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>"


def _img(path: Path, alt: str) -> str:
    data = base64.b64encode(path.read_bytes()).decode()
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


def _html_text_section(results: dict, output: Path) -> str:
    if not text_rows(results):
        return ""
    intro = markdown_section(results)[2]
    return "".join(["<h2>Text-to-image: prompt accuracy and CLIP score</h2>", f"<p>{inline_markdown(intro)}</p>",
                     _html_table(*text_table(results)), _img(output / "fd_vs_clip.png", "FD vs CLIP score"),
                     _img(output / "prompt_grid.png", "prompts x steps")])


def html_report(results: dict, output: Path) -> str:
    """The Markdown report's content as one HTML file with the images inlined (mail it, open it anywhere)."""
    steps_header, steps_body = steps_table(results)
    header, body = settings_table(results)
    intro = "".join(f"<p>{inline_markdown(line)}</p>" for line in _intro(results))
    top = "".join(f"<p class='verdict'>{inline_markdown(line)}</p>" for line in verdict(results))
    note = coinciding_samplers(results)
    style = ("body{font-family:sans-serif;max-width:1200px;margin:2em auto}table{border-collapse:collapse;"
             "font-size:13px}td,th{border:1px solid #ccc;padding:3px 7px;text-align:right}"
             ".verdict{font-size:1.15em}td:first-child,td:nth-child(2){text-align:left}img{max-width:100%}pre{background:#f6f6f6;padding:1em}")
    return "".join([
        f"<!doctype html><html><head><meta charset='utf-8'><title>diffkd evaluation</title><style>{style}</style>",
        "</head><body><h1>diffkd evaluation</h1>", top, intro,
        f"<h2>Quality vs steps: {html.escape(fd_label(results))} (lower is better)</h2>",
        _html_table(steps_header, steps_body), f"<p>{inline_markdown(note)}</p>" if note else "", _img(output / "quality_vs_steps.png", "quality vs steps"),
        "<h2>Every setting</h2>", _html_table(header, body),
        _img(output / "quality_vs_latency.png", "quality vs latency"),
        "<h2>Samples from the same noise</h2>", _img(output / "samples.png", "samples"), _html_text_section(results, output),
        "<h2>Protocol</h2><pre>", html.escape(yaml.safe_dump(results["protocol"], sort_keys=False)), "</pre>",
        "</body></html>"])
