"""``diffkd eval``: options (or a YAML file) -> EvalConfig -> evaluate -> a one-screen summary.

Command-line values override the YAML file, which overrides EvalConfig's defaults.
"""

from __future__ import annotations

import argparse
from dataclasses import fields
from pathlib import Path

from diffkd.config import build, read_yaml_mapping
from diffkd.errors import DiffkdError
from diffkd.eval_options import FEATURES, EvalConfig
from diffkd.validation import SAMPLERS

# option dest -> EvalConfig field, for options whose names differ from the field.
_RENAMED = {"pipeline": "pipelines", "prompt": "prompts", "no_fidelity": "fidelity"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Register the ``diffkd eval`` options on ``parser``."""
    add = parser.add_argument
    add("--config", help="YAML: EvalConfig keys, or a distill config whose 'eval:' section is used")
    add("--pipeline", action="append", help="pipeline folder or hub id to evaluate (repeatable)")
    add("--teacher", help="reference pipeline for fidelity and speed-up (default: the first non-student pipeline)")
    add("--steps", help="comma-separated step counts, e.g. 1,2,4,8")
    add("--samplers", help=f"training-free samplers for teachers, comma-separated from {','.join(SAMPLERS)}")
    add("--reference-steps", type=int, help="steps of the teacher's reference sampling (default 64)")
    add("--reference-sampler", choices=SAMPLERS, help="sampler of the teacher's reference (default ddim)")
    add("--reference", help="real images: 'digits', 'glyphs', an image folder, or a statistics .safetensors file")
    add("--output", help="folder for results.json, report.md/html, plots and grids")
    add("--num-samples", type=int, help="generated images per setting (default 1000)")
    add("--batch-size", type=int, help="sampling batch, also the batch of the timings (default 250)")
    add("--feature", help=f"feature network: {', '.join(FEATURES)} or a TorchScript file")
    add("--feature-weights", help="Inception weights file (default: the torch hub cache)")
    add("--no-fidelity", action="store_const", const=False, help="skip PSNR/LPIPS to the teacher's reference")
    add("--lpips", action=argparse.BooleanOptionalAction, default=None,
        help="LPIPS to the teacher's reference (default: when the backbone weights are on disk)")
    add("--lpips-backbone-weights", help="torchvision backbone weights file for LPIPS")
    add("--prompt", action="append", help="prompt for text pipelines (repeatable)")
    add("--prompts-file", help="text file of prompts, one a line")
    add("--guidance-scale", type=float, help="classifier-free guidance of text teachers (default 7.5)")
    add("--guidance-scales", help="comma-separated guidance scales to sweep text teachers over (default: "
        "--guidance-scale alone)")
    add("--clip-score", action=argparse.BooleanOptionalAction, default=None,
        help="CLIPScore for text pipelines (default: when prompts are given)")
    add("--clip-model", help="CLIP id or folder for CLIPScore, or glyphs-clip (default: glyphs-clip for the glyphs "
        "reference, openai/clip-vit-large-patch14 otherwise)")
    add("--prompt-accuracy", action=argparse.BooleanOptionalAction, default=None,
        help="glyphs prompt accuracy for text pipelines (default: when every prompt names a character and colours)")
    add("--grid-size", type=int, help="images per row of the sample grid (default 8)")
    add("--seed", type=int, help="noise seed (default 0)")
    add("--device", help="cpu, cuda, cuda:N or mps")
    add("--cache-dir", help="cache of real-set statistics (default ~/.cache/diffkd)")


def config_from_args(args: argparse.Namespace) -> EvalConfig:
    """The EvalConfig that ``args`` (and the YAML file it names) describe."""
    data = _read_yaml(args.config) if args.config else {}
    names = {f.name for f in fields(EvalConfig)}
    for dest, value in vars(args).items():
        name = _RENAMED.get(dest, dest)
        if value is not None and name in names:
            data[name] = value
    config = build(EvalConfig, data, "eval")
    if not config.output:
        raise DiffkdError("diffkd eval needs --output DIR (or 'output:' in the config)")
    if not config.pipelines and not config.teacher:
        raise DiffkdError("diffkd eval needs at least one --pipeline PATH (or 'pipelines:' in the config)")
    return config


def _read_yaml(path: str) -> dict:
    file = Path(path)
    if not file.is_file():
        raise DiffkdError(f"--config {path!r} not found: pass a YAML file")
    data = read_yaml_mapping(file, "--config", "eval options (or a distill config with an eval: section)")
    return dict(data.get("eval", data))


def run(args: argparse.Namespace) -> int:
    """Evaluate and print the summary table; the report is in ``--output``."""
    # deferred for start-up time: `diffkd --help` imports this module
    from diffkd.evaluation.report import summary_table
    from diffkd.evaluation.sweep import evaluate

    config = config_from_args(args)
    results = evaluate(config)
    print(summary_table(results.to_dict()))
    print(f"report: {Path(config.output) / 'report.html'}")
    return 0
