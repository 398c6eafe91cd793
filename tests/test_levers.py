"""The memory levers do what they promise in a real CPU run: checkpointing changes memory, not the numbers;
the frozen teacher at bf16 trains (in fp32 again after the run); 8-bit Adam says in one line where it cannot run."""

import copy
import json
import math
import subprocess
import sys

import pytest
import torch

from diffkd.api import frozen_precision, prepare
from diffkd.config import dump_config, parse_config
from diffkd.errors import DiffkdError
from diffkd.trainer import Trainer, make_accelerator
from tests.faults import progressive_config


def config(teacher: str, **train):
    data = progressive_config(teacher)
    data["method"].update(start_steps=4, final_steps=2, steps_per_round=3)
    data["train"].update({"checkpoint_every": 100, **train})
    data["run_eval"] = False
    return parse_config(data)


def gradients(teacher: str, checkpointing: bool) -> tuple[float, list[torch.Tensor]]:
    torch.manual_seed(0)
    run = config(teacher, gradient_checkpointing=checkpointing)
    _, method, _ = prepare(run)
    method.student.train()
    if checkpointing:
        method.student.enable_gradient_checkpointing()
    batch = {"x0": torch.randn(8, 1, 8, 8)}
    loss = method.loss("student", batch, torch.Generator().manual_seed(1)).total
    loss.backward()
    return loss.item(), [p.grad.clone() for p in method.student.parameters()]


def test_checkpointing_gives_the_same_loss_and_gradients(tiny_teacher):
    loss, grads = gradients(tiny_teacher, False)
    loss_checkpointed, grads_checkpointed = gradients(tiny_teacher, True)
    assert loss == loss_checkpointed
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(grads, grads_checkpointed))


def test_trainer_checkpoints_the_trained_networks_and_trains(tiny_teacher, tmp_path):
    run = config(tiny_teacher, gradient_checkpointing=True)
    _, method, _ = prepare(run)
    trainer = Trainer(method, run.train, tmp_path, make_accelerator(run.train, tmp_path))
    assert trainer.student.is_gradient_checkpointing
    progress = trainer.fit()
    assert all(torch.isfinite(torch.tensor(progress.round_losses or [0.0])))


def test_frozen_teacher_in_bf16_trains(tiny_teacher, tmp_path):
    """In a process of its own: accelerate's bf16 state cannot follow the other tests' fp32 one in this process."""
    run = config(tiny_teacher, mixed_precision="bf16", frozen_dtype="bf16")
    (tmp_path / "run.yaml").write_text(dump_config(run))
    result = subprocess.run([sys.executable, "-m", "diffkd", "distill", str(tmp_path / "run.yaml"), "--output",
                             str(tmp_path / "run")], capture_output=True, text=True, timeout=600, check=False)
    assert result.returncode == 0, result.stderr[-2000:]
    summary = json.loads((tmp_path / "run" / "training_summary.json").read_text())
    assert summary["round"] == 1 and summary["skipped_steps"] == 0
    assert all(math.isfinite(row["last_loss"]) for row in summary["round_health"])


def test_frozen_precision_casts_only_while_training_and_keeps_outputs_close(tiny_teacher):
    teacher, _, _ = prepare(config(tiny_teacher))
    z, t = torch.randn(4, 1, 8, 8), torch.full((4,), 500)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        reference = teacher.unet(z, t).sample.float()
        with frozen_precision(teacher, "bf16"):
            assert next(teacher.unet.parameters()).dtype == torch.bfloat16
            halved = teacher.unet(z, t).sample.float()
    assert next(teacher.unet.parameters()).dtype == torch.float32
    assert (halved - reference).abs().max() < 0.05 * reference.abs().max()
    assert not torch.equal(halved, reference)  # the weights really were rounded


def test_frozen_dtype_needs_the_same_autocast():
    with pytest.raises(DiffkdError, match="frozen_dtype=bf16 needs train.mixed_precision=bf16"):
        parse_config({"train": {"frozen_dtype": "bf16"}})


def test_8bit_adam_where_it_cannot_run_is_one_line(tiny_teacher, tmp_path):
    run = config(tiny_teacher, optimizer="adamw8bit")
    _, method, _ = prepare(run)
    with pytest.raises(DiffkdError, match="adamw8bit") as error:
        Trainer(method, run.train, tmp_path, make_accelerator(run.train, tmp_path))
    assert "\n" not in str(error.value)


def test_checkpointing_leaves_the_teacher_alone(tiny_teacher, tmp_path):
    run = config(tiny_teacher, gradient_checkpointing=True)
    teacher, method, _ = prepare(run)
    Trainer(method, run.train, tmp_path, make_accelerator(run.train, tmp_path))
    assert not teacher.unet.is_gradient_checkpointing
    assert copy.deepcopy(method.student).is_gradient_checkpointing


def test_offloaded_ema_trains_the_same_student_and_leaves_the_accelerator(tiny_teacher, tmp_path):
    """train.offload_ema averages in host memory: the same exported weights as the EMA beside the student, and the
    plan no longer counts a copy of the trained weights on the accelerator."""
    from diffkd.plan_check import plan_for, teacher_layout

    students, plans = [], []
    for offload in (False, True):
        run = config(tiny_teacher, ema_decay=0.9, offload_ema=offload)
        _, method, _ = prepare(run)
        trainer = Trainer(method, run.train, tmp_path / str(offload), make_accelerator(run.train, tmp_path))
        trainer.fit()
        students.append({k: v.clone() for k, v in method.student.state_dict().items()})
        plans.append(plan_for(run, teacher_layout(tiny_teacher)))
    assert all(torch.equal(students[0][k], students[1][k]) for k in students[0])
    weights = sum(p.numel() * 4 for p in method.student.parameters())
    assert plans[0].roles["student export EMA"] == weights and "student export EMA" not in plans[1].roles
    assert plans[0].peak_bytes - plans[1].peak_bytes == weights


def test_offload_without_an_ema_is_refused():
    with pytest.raises(DiffkdError, match="set train.ema_decay > 0"):
        parse_config({"train": {"offload_ema": True}})


def test_sharding_refuses_what_it_cannot_shard(tiny_teacher, tmp_path):
    """train.shard: one line each for an offloaded EMA, a LoRA student, and DMD2's random backward-simulation step
    (each process would run another number of generator passes, which sharded networks cannot)."""
    from tests.faults import dmd_config

    with pytest.raises(DiffkdError, match="keep one of them"):
        parse_config({"train": {"shard": True, "offload_ema": True, "ema_decay": 0.9}})
    data = dmd_config(tiny_teacher)
    data["train"]["shard"] = True
    with pytest.raises(DiffkdError, match="backward_simulation=unrolled") as error:
        prepare(parse_config(data))
    assert "\n" not in str(error.value)  # (unrolled, which runs the same passes everywhere: tests/test_two_ranks.py)
