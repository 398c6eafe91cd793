"""The measured side of the memory plan: the peak of a real optimiser step of a built trainer, on this machine.

It runs the trainer's own ``_optimizer_step`` (the method's real loss, the trainer's AdamW, clipping and EMA) twice
under the same storage tracker the plan uses, with real tensors, and returns the peak of the second step, the
steady state in which Adam's moments exist. ``plan_for`` plans the same run from the teacher's UNet config, so the
two can be held against each other (tests/test_plan.py, the 15% target).
"""

from __future__ import annotations

import json
from pathlib import Path

from diffkd.config import Config, load_config
from diffkd.errors import DiffkdError
from diffkd.memory_tracker import PeakTracker
from diffkd.plan import DEVICES_GB, Levers, Plan, largest_batch, trace_step, track
from diffkd.plan_layouts import LAYOUTS, Layout
from diffkd.plan_step import step_spec


def measured_peak(trainer) -> int:
    trainer.load_data()
    trainer._begin_round(0)
    method = trainer.method
    frozen = [method.teacher.unet, *method.followers().values()]
    trainer._optimizer_step(0, 10)  # the first step makes Adam's moments
    with PeakTracker() as tracker:
        track(tracker, [*(n.module for n in trainer.networks.values()), *frozen,
                        *(o.optimizer for o in trainer.optimizers.values()),
                        *(p for ema in trainer.emas.values() for p in ema.shadow_params)])
        tracker.reset_peak()
        trainer._optimizer_step(0, 10)
        return tracker.peak


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
    t = config.train
    levers = Levers(mixed_precision=t.mixed_precision, frozen_dtype=t.frozen_dtype,
                    gradient_checkpointing=t.gradient_checkpointing, export_ema=t.ema_decay > 0 and not t.offload_ema,
                    shard_processes=processes if t.shard else 1)
    spec = step_spec(config.method.name, config.method, config.student.lora.rank if config.student.lora else 0)
    per_device = batch or max(1, t.batch_size // (t.gradient_accumulation_steps * processes))
    return trace_step(spec, layout, per_device, levers)


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
    plan = plan_for(config, layout, processes=processes)
    sharded = f", sharded over {processes} processes" if config.train.shard and processes > 1 else ""
    print(f"{args.config}: {config.method.name} on {layout.name}, batch {plan.batch_size} per device of "
          f"{processes}, {config.train.mixed_precision} autocast, frozen {config.train.frozen_dtype}, gradient "
          f"checkpointing {'on' if config.train.gradient_checkpointing else 'off'}{sharded}")
    for role, size in plan.roles.items():
        print(f"  {role:<40} {size / 1e9:8.2f} GB")
    print(f"  {'peak':<40} {plan.peak_gb:8.2f} GB")
    low, high = plan_for(config, layout, 8, processes), plan_for(config, layout, 16, processes)
    for device in DEVICES_GB:
        fits = largest_batch(low, high, device)
        print(f"  largest batch per device in {device} GB: {'> 16' if fits is None else fits}")
    return 0
