"""Issue 34's data-at-scale benchmarks: captioned sets streamed from disk keep memory flat and never starve the loop.

    python eval/data_scale.py flat --rows 20000,200000 --formats metadata,webdataset,saved --steps 40 --batch-size 8
    python eval/data_scale.py wait --rows 20000 --workers 2 --steps 40
    python eval/data_scale.py sd512 --images 5000 --steps 20

flat: the glyphs-32 consistency recipe (configs/glyphs-guidance-consistency.yaml, its guidance round left out, on
teachers/glyphs-32) distilled for --steps steps on a captioned set of each size written in each format; the rows
are glyphs-32's first 2,000 training glyphs with their captions, repeated (row i is glyph i % 2000), one file or
sample each. Reports the peak RSS of the training process (and of it with its data workers, sampled every 0.2 s)
and steps/s over the training loop. wait: the time the loop stood waiting for decoded rows over its wall time.
sd512: a 5,000-image 512 px captioned folder (JPEG, random colour fields with a caption each) distilled by
consistency on a tiny Stable-Diffusion-layout teacher (8x VAE, cross-attention UNet, CLIP text encoder, built here
with random weights). Sets are written under --work and deleted afterwards. Appends a section to eval/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from results_file import machine, write_section

from tests import captioned_sets

GLYPHS = 2000
FORMATS = "metadata,webdataset,saved"


def glyph_rows():
    """Row i: glyphs-32 training glyph i % 2000 and its caption."""
    from PIL import Image

    from diffkd.data import load_glyphs

    images, captions = load_glyphs(GLYPHS, 0)
    pixels = ((images + 1) * 127.5).round().clamp(0, 255).byte().permute(0, 2, 3, 1).numpy()
    encoded = [captioned_sets.png(Image.fromarray(p)) for p in pixels]
    return lambda i: (encoded[i % GLYPHS], captions[i % GLYPHS])


def run(config: str, output: Path, sets: list[str]) -> dict:
    """One `diffkd distill` in a child process: its own peak RSS (wait4), the peak of it and its workers together
    (sampled), the training loop's seconds and data wait (training_summary.json)."""
    shutil.rmtree(output, ignore_errors=True)
    argv = [sys.executable, "-m", "diffkd", "distill", config, "--output", str(output)]
    for assignment in sets:
        argv += ["--set", assignment]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    child = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    process, tree_peak, started = psutil.Process(child.pid), 0, time.perf_counter()
    while True:
        pid, status, usage = os.wait4(child.pid, os.WNOHANG)
        if pid:
            break
        try:
            tree = [process, *process.children(recursive=True)]
            tree_peak = max(tree_peak, sum(p.memory_info().rss for p in tree if p.is_running()))
        except psutil.Error:
            pass
        time.sleep(0.2)
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"{' '.join(argv)} failed: {child.stderr.read().decode()[-3000:]}")
    summary = json.loads((output / "training_summary.json").read_text())
    seconds = sum(summary["round_seconds"].values())
    return {"peak_rss_gb": usage.ru_maxrss / 2**20, "tree_peak_rss_gb": tree_peak / 2**30,
            "train_seconds": seconds, "wall_seconds": time.perf_counter() - started,
            "wait_seconds": summary.get("data", {}).get("wait_seconds", float("nan"))}


def glyphs_sets(args: argparse.Namespace, work: Path, rows: int, kind: str) -> list[str]:
    return ["method.guidance_steps=0", f"method.num_steps={args.steps}", f"train.checkpoint_every={args.steps}",
            f"train.batch_size={args.batch_size}", "train.device=cpu", f"data.num_workers={args.workers}",
            "run_eval=false",
            f"data.source={captioned_sets.write(kind, work / f'{kind}-{rows}', rows, glyph_rows())}"]


def flat(args: argparse.Namespace, work: Path) -> tuple[list[str], list[str]]:
    config = str(ROOT / "configs" / "glyphs-guidance-consistency.yaml")
    lines = ["| format | rows | peak RSS (GB) | with workers (GB) | steps/s | data wait / loop |",
             "|---|---:|---:|---:|---:|---:|"]
    verdicts = []
    for kind in args.formats.split(","):
        measured = {}
        for rows in map(int, args.rows.split(",")):
            sets = glyphs_sets(args, work, rows, kind)
            measured[rows] = m = run(config, work / f"run-{kind}-{rows}", sets)
            shutil.rmtree(work / f"{kind}-{rows}", ignore_errors=True)
            rate = args.steps / m["train_seconds"]
            lines.append(f"| {kind} | {rows:,} | {m['peak_rss_gb']:.2f} | {m['tree_peak_rss_gb']:.2f} | {rate:.2f} | "
                         f"{m['wait_seconds'] / m['train_seconds']:.1%} |")
            print(lines[-1], flush=True)
        small, large = (measured[r] for r in sorted(measured))
        ratio = large["peak_rss_gb"] / small["peak_rss_gb"]
        speed = small["train_seconds"] / large["train_seconds"]
        verdicts.append(f"{kind}: peak RSS ratio {ratio:.3f} (target <= 1.15), steps/s ratio {speed:.3f} "
                        "(target 0.90-1.10)")
    return lines, verdicts


def wait(args: argparse.Namespace, work: Path) -> tuple[list[str], list[str]]:
    config = str(ROOT / "configs" / "glyphs-guidance-consistency.yaml")
    rows = int(args.rows.split(",")[0])
    m = run(config, work / "run-wait", glyphs_sets(args, work, rows, "metadata"))
    share = m["wait_seconds"] / m["train_seconds"]
    line = (f"metadata folder of {rows:,} glyphs, {args.workers} workers, batch {args.batch_size}, {args.steps} "
            f"steps: loop {m['train_seconds']:.1f} s, waiting for data {m['wait_seconds']:.2f} s")
    return [line], [f"data wait {share:.1%} of the step time (target <= 5%)"]


def tiny_sd512(folder: Path) -> str:
    """A Stable-Diffusion-layout pipeline at 512 px: a 4-level VAE (8x, 64x64x4 latents), a UNet that cross-attends
    at its 32x32 level only, a one-layer CLIP text encoder; random weights (memory, not quality, is measured)."""
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from diffkd.text_pipeline import word_vocabulary

    torch.manual_seed(0)
    vocab, merges = word_vocabulary(["a", "red", "green", "blue", "field", "of", "colour"])
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
    tokenizer = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=16)
    text_encoder = CLIPTextModel(CLIPTextConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=64,
                                                num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=16,
                                                bos_token_id=tokenizer.bos_token_id,
                                                eos_token_id=tokenizer.eos_token_id,
                                                pad_token_id=tokenizer.pad_token_id))
    unet = UNet2DConditionModel(sample_size=64, in_channels=4, out_channels=4, block_out_channels=(16, 32),
                                layers_per_block=1, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=32,
                                norm_num_groups=8, attention_head_dim=8)
    vae = AutoencoderKL(in_channels=3, out_channels=3, block_out_channels=(8, 8, 16, 16), latent_channels=4,
                        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                        norm_num_groups=4, sample_size=512)
    scheduler = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1)
    pipeline = folder / "pipeline"
    StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
                            safety_checker=None, feature_extractor=None,
                            requires_safety_checker=False).save_pretrained(pipeline)
    return str(pipeline)


def sd512(args: argparse.Namespace, work: Path) -> tuple[list[str], list[str]]:
    import io

    import numpy as np
    from PIL import Image

    def pick(i: int):
        rng = np.random.default_rng(i)
        field = rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)
        image = Image.fromarray(field).resize((512, 512), Image.Resampling.BILINEAR)
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=90)
        return buffer.getvalue(), f"a {('red', 'green', 'blue')[i % 3]} field of colour"

    source = captioned_sets.write_metadata_folder(work / "sd512", args.images, pick)
    teacher = tiny_sd512(work / "sd512-teacher")
    config = work / "sd512.yaml"
    config.write_text(json.dumps({"method": {"name": "consistency", "num_steps": args.steps, "teacher_grid": 50,
                                             "num_inference_steps": 4},
                                  "teacher": {"source": teacher}, "data": {"source": str(source)},
                                  "train": {"batch_size": 2, "checkpoint_every": args.steps, "device": "cpu"},
                                  "run_eval": False}))
    m = run(str(config), work / "run-sd512", [f"data.num_workers={args.workers}"])
    line = (f"{args.images:,} 512 px JPEGs with captions, batch 2, {args.steps} steps, {args.workers} workers: "
            f"peak RSS {m['peak_rss_gb']:.2f} GB (with workers {m['tree_peak_rss_gb']:.2f} GB), "
            f"{args.steps / m['train_seconds']:.2f} steps/s, data wait {m['wait_seconds'] / m['train_seconds']:.1%}")
    return [line], [f"peak RSS {m['peak_rss_gb']:.2f} GB (target < 3 GB)"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("benchmark", choices=("flat", "wait", "sd512"))
    parser.add_argument("--rows", default="20000,200000")
    parser.add_argument("--formats", default=FORMATS)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=32, help="glyphs runs (the recipe's 32 by default)")
    parser.add_argument("--images", type=int, default=5000)
    parser.add_argument("--work", default="/tmp/diffkd-data-scale")
    parser.add_argument("--no-results", action="store_true")
    args = parser.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("HF_DATASETS_CACHE", str(work / "hf-datasets"))
    try:
        lines, verdicts = {"flat": flat, "wait": wait, "sd512": sd512}[args.benchmark](args, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    command = "python eval/data_scale.py " + " ".join(sys.argv[1:])
    print("\n".join(lines + verdicts))
    if not args.no_results:
        formats = "" if args.benchmark != "flat" or args.formats == FORMATS else "-" + args.formats.replace(",", "-")
        write_section(f"data-scale-{args.benchmark}{formats}", "\n".join([
            f"## Data at scale ({args.benchmark}): captioned sets streamed from disk", "",
            f"Machine: {machine('cpu')}, 2 cores (time it with no other job on them). Command: `{command}`.", "",
            *lines, "", *(f"- {v}" for v in verdicts)]))

if __name__ == "__main__":
    main()
