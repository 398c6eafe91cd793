"""The measured side of the memory plan: the peak of a real optimiser step of a built trainer, on this machine.

It runs the trainer's own ``_optimizer_step`` (the method's real loss, the trainer's AdamW, clipping and EMA) twice
under the same storage tracker the plan uses, with real tensors, and returns the peak of the second step, the
steady state in which Adam's moments exist. ``plan_for`` plans the same run from the teacher's UNet config, so the
two can be held against each other (tests/test_plan.py, the 15% target).
"""

from __future__ import annotations

import contextlib
import functools
import json
from pathlib import Path

import torch

from diffkd.config import Config, load_config
from diffkd.errors import DiffkdError
from diffkd.memory_tracker import PeakTracker
from diffkd.plan import DEVICES_GB, Levers, Plan, largest_batch, trace_step, trace_validation, track
from diffkd.plan_layouts import LAYOUTS, Layout
from diffkd.plan_step import StepSpec, guided_batch_factor, step_spec
from diffkd.run_validation import references_teacher


def measured_peak(trainer) -> int:
    """The tracked peak of the trainer's second optimiser step (the first makes Adam's moments)."""
    with _tracked_after_first_step(trainer) as tracker:
        trainer._optimizer_step(0, 10)
        return tracker.peak


def measured_validation_peak(trainer) -> int:
    """The tracked peak of the trainer's own in-run validation after a first step, its reference made inside it;
    float64 tensors are not counted: the features and the Fréchet distance's matrices, which a GPU run holds on
    the host (``FeatureNetwork`` returns float64 on the CPU)."""
    with _tracked_after_first_step(trainer, counts=lambda tensor: tensor.dtype != torch.float64) as tracker:
        trainer._validate()
        return tracker.peak


@contextlib.contextmanager
def _tracked_after_first_step(trainer, counts=None):
    """A tracker counting what the trainer holds after its first optimiser step, its peak reset there."""
    trainer.load_data()
    trainer._begin_round(0)
    method = trainer.method
    frozen = [method.teacher.unet, *method.followers().values()]
    trainer._optimizer_step(0, 10)  # the first step makes Adam's moments
    with PeakTracker(counts) as tracker:
        track(tracker, [*(n.module for n in trainer.networks.values()), *frozen,
                        *(o.optimizer for o in trainer.optimizers.values()),
                        *(p for ema in trainer.emas.values() for p in ema.shadow_params)])
        tracker.reset_peak()
        yield tracker


def teacher_layout(folder: str | Path) -> Layout:
    """A local teacher's UNet as a plan layout, from its config file alone (no weights read)."""
    folder = Path(folder)
    config = json.loads((folder / "unet" / "config.json").read_text())
    family = "unet" if config["_class_name"] == "UNet2DConditionModel" else "unet2d"
    tokens = 0
    if (folder / "text_encoder" / "config.json").is_file():
        tokens = json.loads((folder / "text_encoder" / "config.json").read_text())["max_position_embeddings"]
    return Layout(folder.name, family, {k: v for k, v in config.items() if not k.startswith("_")}, tokens)


def plan_for(config: Config, layout: Layout, batch: int | None = None, processes: int = 1) -> Plan:
    """The plan of one of ``processes`` devices (the batch split among them and the accumulation shards; the
    trained networks sharded among them with train.shard)."""
    return trace_step(run_step(config), layout, batch or per_device_batch(config, processes),
                      run_levers(config, processes))


def per_device_batch(config: Config, processes: int) -> int:
    """The configured batch one device's step sees: split among the processes and the accumulation shards."""
    t = config.train
    return max(1, t.batch_size // (t.gradient_accumulation_steps * processes))


def validation_plan(config: Config, layout: Layout, batch: int | None = None) -> Plan:
    """The planned peak of the run's in-run validation (``diffkd.plan.trace_validation``) at ``batch`` noises at
    once (default train.validate_batch_size), with the networks whole (an upper bound where train.shard splits
    them)."""
    guided = guided_batch_factor(getattr(config.method, "guidance_scale", 1.0))
    return trace_validation(run_step(config), layout, batch or config.train.validate_batch_size,
                            run_levers(config, 1), guided if references_teacher(config) else 0)


def run_step(config: Config) -> StepSpec:
    return step_spec(config.method.name, config.method, config.student.lora.rank if config.student.lora else 0)


def run_levers(config: Config, processes: int) -> Levers:
    t = config.train
    return Levers(mixed_precision=t.mixed_precision, frozen_dtype=t.frozen_dtype,
                  gradient_checkpointing=t.gradient_checkpointing, export_ema=t.ema_decay > 0 and not t.offload_ema,
                  shard_processes=processes if t.shard else 1)


def run(args) -> int:
    """``diffkd plan``: the configured step's plan per role, then the largest batch per device of each size."""
    config = load_config(args.config, args.overrides)
    if args.layout:
        layout = LAYOUTS[args.layout]
    elif (Path(config.teacher.source) / "unet" / "config.json").is_file():
        layout = teacher_layout(config.teacher.source)
    else:
        raise DiffkdError(f"teacher.source={config.teacher.source!r} has no unet/config.json here: name its layout "
                          f"with --layout ({', '.join(LAYOUTS)})")
    processes = args.processes
    if processes < 1:
        raise DiffkdError(f"--processes {processes}: plan one of N >= 1 devices")
    step = functools.cache(lambda batch: plan_for(config, layout, batch, processes))  # the search retraces none
    plan = step(per_device_batch(config, processes))
    sharded = f", sharded over {processes} processes" if config.train.shard and processes > 1 else ""
    print(f"{args.config}: {config.method.name} on {layout.name}, batch {plan.batch_size} per device of "
          f"{processes}, {config.train.mixed_precision} autocast, frozen {config.train.frozen_dtype}, gradient "
          f"checkpointing {'on' if config.train.gradient_checkpointing else 'off'}{sharded}")
    for role, size in plan.roles.items():
        print(f"  {role:<40} {size / 1e9:8.2f} GB")
    print(f"  {'peak':<40} {plan.peak_gb:8.2f} GB")
    for device in DEVICES_GB:
        fits = largest_batch(step, device)
        print(f"  largest batch per device in {device} GB: {'> 16' if fits is None else fits}")
    if config.train.validate_every > 0:
        validation = functools.cache(lambda batch: validation_plan(config, layout, batch))
        print(f"  validation between steps, batch {config.train.validate_batch_size}: peak "
              f"{validation(config.train.validate_batch_size).peak_gb:.2f} GB")
        for device in DEVICES_GB:
            fits = largest_batch(validation, device)
            print(f"  largest train.validate_batch_size in {device} GB: {'> 16' if fits is None else fits}")
    return 0
