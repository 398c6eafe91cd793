"""A DMD training step's time against the sum of the model passes it contains, measured in one process.

    python eval/dmd_cost.py [--config configs/digits-dmd.yaml] [--repeats 8] [--set key=value ...]

One optimiser step of ``fake_updates`` fake-score updates and one generator update holds, for a k-step generator
without the GAN and regression terms, per fake update: G's rollout (no gradient; on average (k - 1) / 2 + 1
passes) and a forward + backward of the fake score; per generator update: G's rollout with a forward + backward
of its last pass, and one forward each of the teacher and the fake score (no gradient). Those passes are timed on
their own at the training batch size, interleaved with whole trainer steps (``Trainer._optimizer_step``), and the
medians compared: the ratio is what the trainer adds (batches, optimiser steps, clipping, finite checks, the EMA).
"""

from __future__ import annotations

import argparse
import logging
import statistics
import tempfile
import time
from pathlib import Path

import torch

from diffkd.api import prepare
from diffkd.config import load_config
from diffkd.models import dummy_inputs
from diffkd.trainer import Trainer, make_accelerator

ROOT = Path(__file__).resolve().parents[1]


def timed(work) -> float:
    started = time.perf_counter()
    work()
    return time.perf_counter() - started


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(ROOT / "configs" / "digits-dmd.yaml"))
    parser.add_argument("--repeats", type=int, default=8)
    parser.add_argument("--set", action="append", default=[], dest="sets")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    config = load_config(args.config, [*args.sets, "run_eval=false"])
    o = config.method
    if o.gan or o.regression or o.warm_start_steps:
        raise SystemExit("time the plain DMD step: set method.gan=0, method.regression=0, method.warm_start_steps=0")
    _, method, _ = prepare(config)
    with tempfile.TemporaryDirectory() as work:
        trainer = Trainer(method, config.train, Path(work), make_accelerator(config.train, Path(work)))
        trainer.load_data()
        trainer._begin_round(0)  # the export EMA, as in training
        inputs = dummy_inputs(method.student, config.train.batch_size)
        g, fake, teacher = method.student, method.fake_unet, method.teacher.unet
        rollout_passes = (o.student_steps - 1) / 2 + 1

        def forward(unet):
            with torch.no_grad():
                unet(**inputs)

        def forward_backward(unet):
            unet(**inputs).sample.float().pow(2).mean().backward()
            unet.zero_grad(set_to_none=True)

        steps, passes = [], []
        for repeat in range(args.repeats + 1):
            step = timed(lambda: trainer._optimizer_step(0, o.num_steps))
            trainer.progress.step += 1
            g_forward, g_train, fake_forward, fake_train, teacher_forward = (
                timed(lambda: forward(g)), timed(lambda: forward_backward(g)), timed(lambda: forward(fake)),
                timed(lambda: forward_backward(fake)), timed(lambda: forward(teacher)))
            total = (o.fake_updates * (rollout_passes * g_forward + fake_train)
                     + (rollout_passes - 1) * g_forward + g_train + teacher_forward + fake_forward)
            if repeat:  # the first of each is a warm-up
                steps.append(step)
                passes.append(total)
    step, total = statistics.median(steps), statistics.median(passes)
    print(f"batch {config.train.batch_size}, fake_updates {o.fake_updates}, {o.student_steps}-step generator, "
          f"{torch.get_num_threads()} thread(s), median of {args.repeats}: step {step * 1000:.0f} ms, its model passes "
          f"{total * 1000:.0f} ms, ratio {step / total:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
