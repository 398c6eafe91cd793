"""Peak memory of one optimiser step of each method on real-size layouts, planned with fake tensors (no weights).

SD 1.5, SDXL, SD3-medium, FLUX.1-dev and SANA 1600M denoisers built from their diffusers configs
(diffkd.plan_layouts) x LCM-LoRA, consistency (full), DMD2 (full and with a LoRA fake score), progressive; bf16
autocast with fp32 master weights of the trained networks, frozen networks in bf16, with and without gradient
checkpointing. Each cell: the
peak GB at batch 1 and the largest batch per device that fits 80 GB (``diffkd.plan.largest_batch``: linear
guesses from traces at batch 8 and 16, each traced until one fits and the next does not). Run:
OMP_NUM_THREADS=1 python eval/plan_table.py [--layouts sd15 sdxl ...]
"""

from __future__ import annotations

import argparse
import functools
import platform
import time

from diffkd.method_options import METHODS
from diffkd.plan import Levers, largest_batch, trace_step
from diffkd.plan_layouts import LAYOUTS
from diffkd.plan_step import step_spec

CASES = {  # name -> (method, options, the student's LoRA rank: 0 for a whole network)
    "LCM-LoRA": ("consistency", {"guidance_scale": 7.5, "target_ema": 0.0}, 64),
    "consistency": ("consistency", {"guidance_scale": 7.5}, 0),
    "DMD2": ("dmd", {"guidance_scale": 7.5}, 0),
    "DMD2 LoRA fake": ("dmd", {"guidance_scale": 7.5, "fake_score_lora_rank": 64}, 0),
    "progressive": ("progressive", {"guidance_scale": 7.5}, 0),
}


def spec_of(case: str):
    method, options, lora_rank = CASES[case]
    config = METHODS[method].options()
    for key, value in options.items():
        object.__setattr__(config, key, value)
    return step_spec(method, config, lora_rank)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--layouts", nargs="+", default=list(LAYOUTS))
    parser.add_argument("--cases", nargs="+", default=list(CASES))
    args = parser.parse_args()
    print(f"machine: {platform.processor() or platform.machine()}, planned with fake tensors (no weights)")
    print("| layout | method | checkpointing | peak GB, batch 1 | largest batch in 80 GB |")
    print("|---|---|---|---|---|")
    for name in args.layouts:
        for case in args.cases:
            for checkpointing in (False, True):
                started = time.perf_counter()
                levers = Levers(frozen_dtype="bf16", gradient_checkpointing=checkpointing)
                one = trace_step(spec_of(case), LAYOUTS[name], 1, levers)
                largest = largest_batch(functools.partial(trace_step, spec_of(case), LAYOUTS[name], levers=levers), 80)
                print(f"| {name} | {case} | {'on' if checkpointing else 'off'} | {one.peak_gb:.1f} | "
                      f"{'> 16' if largest is None else largest} |  <!-- {time.perf_counter() - started:.0f} s -->", flush=True)


if __name__ == "__main__":
    main()
