"""The memory plan against the measured peak of the real step (real tensors, the trainer's own step), on a UNet
small enough to run: within 15%, for progressive, consistency and dmd (its fake score whole or LoRA), with and without
gradient checkpointing."""

import pytest
import torch
from diffusers import DDPMPipeline, UNet2DModel

from diffkd.api import make_validator, prepare
from diffkd.config import parse_config
from diffkd.plan_check import (
    measured_peak,
    measured_validation_peak,
    plan_for,
    teacher_layout,
    validation_plan,
)
from diffkd.trainer import Trainer, make_accelerator
from tests.conftest import make_scheduler


@pytest.fixture(scope="module")
def teacher(tmp_path_factory) -> str:
    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(32, 64), layers_per_block=2,
                       norm_num_groups=8, down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                       up_block_types=("AttnUpBlock2D", "UpBlock2D"))
    folder = tmp_path_factory.mktemp("plan-teacher") / "pipeline"
    DDPMPipeline(unet=unet, scheduler=make_scheduler()).save_pretrained(folder)
    return str(folder)


METHODS = {"progressive": {"name": "progressive", "start_steps": 8, "final_steps": 4, "steps_per_round": 10},
           "consistency": {"name": "consistency", "num_steps": 10, "teacher_grid": 20, "target_ema": 0.9},
           "dmd": {"name": "dmd", "student_steps": 1, "num_steps": 10, "fake_updates": 2},
           "dmd-lora-fake": {"name": "dmd", "student_steps": 1, "num_steps": 10, "fake_updates": 2,
                             "fake_score_lora_rank": 8}}


def run_config(teacher: str, method: str, checkpointing: bool):
    return parse_config({"method": METHODS[method], "teacher": {"source": teacher}, "data": {"source": "digits"},
                         "train": {"batch_size": 32, "device": "cpu", "gradient_checkpointing": checkpointing},
                         "run_eval": False})


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("checkpointing", [False, True])
def test_plan_within_15_percent_of_the_measured_peak(teacher, method, checkpointing, tmp_path):
    config = run_config(teacher, method, checkpointing)
    planned = plan_for(config, teacher_layout(teacher)).peak_bytes
    _, built, _ = prepare(config)
    measured = measured_peak(Trainer(built, config.train, tmp_path, make_accelerator(config.train, tmp_path)))
    assert abs(planned - measured) <= 0.15 * measured, (planned, measured)


@pytest.mark.parametrize("reference", ["teacher", "data"])
def test_validation_plan_within_15_percent_of_the_measured_peak(teacher, reference, tmp_path):
    """In-run validation between steps at train.validate_batch_size: the student's sampling passes and, with the
    teacher's samples as reference, the teacher's, on everything the step keeps but its gradients. Planned larger
    than the step here (a batch of 256 against 32), so the step's plan alone would miss it."""
    raw = {"method": METHODS["consistency"], "teacher": {"source": teacher}, "data": {"source": "digits"},
           "train": {"batch_size": 32, "device": "cpu", "validate_every": 10, "validate_samples": 256,
                     "validate_batch_size": 256, "validate_steps": [2], "validate_reference": reference,
                     "validate_feature": "random-conv"},
           "run_eval": False}
    config = parse_config(raw)
    planned = validation_plan(config, teacher_layout(teacher)).peak_bytes
    teacher_pipeline, built, _ = prepare(config)
    trainer = Trainer(built, config.train, tmp_path, make_accelerator(config.train, tmp_path))
    trainer.validator = make_validator(config, teacher_pipeline, built, tmp_path)
    measured = measured_validation_peak(trainer)
    assert abs(planned - measured) <= 0.15 * measured, (planned, measured)
    assert planned > plan_for(config, teacher_layout(teacher)).peak_bytes


def test_the_largest_batch_is_traced_not_extrapolated():
    """A peak that a constant sets at small batches and the rows at large ones (as autocast's weight copies do on
    SD3): the answer is a batch whose own trace fits, within 1/16 of the largest, where a line through 8 and 16
    overshoots; a
    peak that does not grow from 8 to 16 is None; a limit below batch 8's peak is searched under it."""
    from diffkd.plan import Plan, largest_batch

    def peak_gb(batch: int) -> float:
        return 50 + 0.2 * batch + 0.002 * batch**2

    traced = []

    def trace(batch: int) -> Plan:
        traced.append(batch)
        return Plan(batch, int(peak_gb(batch) * 1e9))

    for limit in (80.0, 120.0, 51.0):
        traced.clear()
        truth = max(b for b in range(1, 10_000) if peak_gb(b) <= limit)
        found = largest_batch(trace, limit)
        assert peak_gb(found) <= limit and found >= truth * 15 / 16 and len(traced) <= 12, (limit, found, traced)
    line = 16 + int((80 - peak_gb(16)) // ((peak_gb(16) - peak_gb(8)) / 8))
    assert peak_gb(line) > 80  # the line through 8 and 16 alone does not fit
    assert largest_batch(lambda batch: Plan(batch, 10**9), 80) is None


def test_checkpointing_lowers_the_planned_peak(teacher):
    layout = teacher_layout(teacher)
    plain = plan_for(run_config(teacher, "progressive", False), layout)
    checkpointed = plan_for(run_config(teacher, "progressive", True), layout)
    assert checkpointed.roles["activations and temporaries"] < 0.7 * plain.roles["activations and temporaries"]


def test_a_guided_teacher_pass_is_planned_at_twice_the_batch():
    """Classifier-free guidance runs the teacher on the conditional and unconditional rows at once."""
    from diffkd.method_options import ConsistencyConfig
    from diffkd.plan_step import TEACHER, Pass, step_spec

    for scale, factor in ((3.0, 2), (1.0, 1)):
        spec = step_spec("consistency", ConsistencyConfig(guidance_scale=scale))
        assert spec.phases[0].passes[0] == Pass(TEACHER, False, factor)


@pytest.fixture(scope="module")
def text_teacher(tmp_path_factory) -> str:
    """The tests' tiny SD-layout pipeline with a wider cross-attention UNet, so weights and activations, not the
    loss's small tensors, make the peak."""
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    from tests.conftest import make_tiny_sd_pipeline

    folder = make_tiny_sd_pipeline(tmp_path_factory.mktemp("plan-sd") / "pipeline")
    pipe = StableDiffusionPipeline.from_pretrained(folder)
    torch.manual_seed(0)
    pipe.unet = UNet2DConditionModel(sample_size=4, in_channels=4, out_channels=4, block_out_channels=(64, 128),
                                     layers_per_block=2, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                     up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=16,
                                     norm_num_groups=8, attention_head_dim=8)
    pipe.save_pretrained(folder)
    return folder


@pytest.mark.parametrize("method", ["progressive", "consistency"])
@pytest.mark.parametrize("checkpointing", [False, True])
def test_lora_student_plan_within_15_percent(text_teacher, method, checkpointing, tmp_path):
    config = parse_config({"method": {**METHODS[method], "guidance_scale": 3.0}, "teacher": {"source": text_teacher},
                           "student": {"lora": {"rank": 8}},
                           "data": {"source": "digits", "convert": True, "prompts": ["a cat", "a dog"]},
                           "train": {"batch_size": 32, "device": "cpu", "gradient_checkpointing": checkpointing},
                           "run_eval": False})
    planned = plan_for(config, teacher_layout(text_teacher))
    _, built, _ = prepare(config)
    measured = measured_peak(Trainer(built, config.train, tmp_path, make_accelerator(config.train, tmp_path)))
    assert planned.roles["student grads"] < 0.1 * planned.roles["student weights"]  # only the adapters train
    assert abs(planned.peak_bytes - measured) <= 0.15 * measured, (planned.peak_bytes, measured)


def test_plan_command_prints_roles_peak_and_largest_batches(teacher, tmp_path):
    """``diffkd plan`` as the command line runs it (cli.main, in process: a child spends ~9 s importing)."""
    import contextlib
    import io

    import yaml

    from tests.in_process import run_in_process

    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({"method": METHODS["progressive"], "teacher": {"source": teacher},
                                    "train": {"batch_size": 32, "device": "cpu"}, "run_eval": False}))
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        code, stderr = run_in_process(["plan", str(path), "--set", "train.gradient_checkpointing=true", "--set",
                                       "train.validate_every=10"], {})
    assert code == 0, stderr[-2000:]
    assert "gradient checkpointing on" in stdout.getvalue() and "validation between steps, batch 128" in stdout.getvalue()
    assert "largest train.validate_batch_size in 80 GB" in stdout.getvalue()
    assert "student Adam moments" in stdout.getvalue() and "largest batch per device in 80 GB" in stdout.getvalue()
    code, stderr = run_in_process(["plan", "configs/sd15-progressive.yaml"], {})
    assert code == 2 and "--layout" in stderr


def test_bf16_plans_within_15_percent(teacher, text_teacher):
    """bf16 autocast with the frozen weights at bf16 (the teacher, a LoRA student's base, a LoRA fake score's
    base), in a process of its own; CPU autocast's bf16 kernels, not a GPU's."""
    import json
    import os
    import subprocess
    import sys

    from tests.faults import ROOT

    result = subprocess.run([sys.executable, "-m", "tests.plan_bf16", teacher, text_teacher], capture_output=True,
                            text=True, timeout=600, check=False, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert result.returncode == 0, result.stderr[-2000:]
    figures = json.loads(result.stdout.strip().splitlines()[-1])
    assert set(figures) == {"lora-consistency", "dmd-lora-fake"}
    for case, (planned, measured) in figures.items():
        assert abs(planned - measured) <= 0.15 * measured, (case, planned, measured)
