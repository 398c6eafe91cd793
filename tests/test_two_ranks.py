"""Two ranks on CPU (gloo, started by torchrun): gradients are synchronised, only rank 0 writes, and the result equals
a single process running the same global batch as two accumulation shards (measured: bit-identical; the test
allows 1e-6, for float summation order on other builds), for progressive, for the tests' two-network method
(critic x3, then student), whose critic is averaged over ranks like the student, for consistency distillation
(a target network that follows the student), and for dmd (fake score and GAN head x2, then generator)."""

import csv
import os
import subprocess
import sys

import pytest
import yaml

from diffkd import checkpoint
from tests.faults import ROOT, consistency_config, dmd_config, two_networks_config

TOLERANCE = 1e-6


def run(args: list[str], env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=900, env=env, check=False)


def max_difference(a, b) -> float:
    from safetensors.torch import load_file

    left, right = load_file(a), load_file(b)
    assert left.keys() == right.keys()
    return max((left[k] - right[k]).abs().max().item() for k in left)


def progressive(teacher: str) -> dict:
    return {"method": {"name": "progressive", "start_steps": 8, "final_steps": 2, "steps_per_round": 4},
            "teacher": {"source": teacher},
            "train": {"batch_size": 16, "learning_rate": 1e-3, "ema_decay": 0.9, "checkpoint_every": 2,
                      "keep_checkpoints": 10, "log_every": 1, "device": "cpu"},
            "run_eval": False}


def two_networks(teacher: str) -> dict:
    data = two_networks_config(teacher)
    data["method"]["num_steps"] = 8
    data["train"]["keep_checkpoints"] = 10
    return data


def consistency(teacher: str) -> dict:
    data = consistency_config(teacher)
    data["method"]["num_steps"] = 8
    data["train"]["keep_checkpoints"] = 10
    return data


def dmd(teacher: str) -> dict:
    data = dmd_config(teacher)
    data["method"].update(regression=0.0)  # no teacher-sample cache: both runs draw the same rows
    data["train"]["keep_checkpoints"] = 10
    return data


@pytest.mark.slow
@pytest.mark.parametrize("make, port, steps", [(progressive, 29533, 8), (two_networks, 29535, 8),
                                               (consistency, 29537, 8), (dmd, 29539, 4)],
                         ids=["progressive", "two-networks", "consistency", "dmd"])
def test_two_ranks_match_one_process_with_the_same_global_batch(make, port, steps, tiny_teacher, tmp_path):
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(make(tiny_teacher)))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cli = ["-m", "tests.kill_wrapper"]  # the plain CLI, with the two-network method registered
    two = run(["-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port), *cli,
               "distill", str(config), "--output", str(tmp_path / "two")], env)
    assert two.returncode == 0, two.stderr[-3000:]
    one = run([*cli, "distill", str(config), "--output", str(tmp_path / "one"),
               "--set", "train.gradient_accumulation_steps=2"], env)
    assert one.returncode == 0, one.stderr[-3000:]

    # equal to the mean of both shards' gradients: without the all-reduce rank 0 would have followed shard 0 alone
    weights = "student/unet/diffusion_pytorch_model.safetensors"
    assert max_difference(tmp_path / "two" / weights, tmp_path / "one" / weights) <= TOLERANCE

    # only rank 0 wrote: one metrics row per step, the same checkpoints as the single process, no leftovers
    with (tmp_path / "two" / "logs" / "metrics.csv").open() as handle:
        assert len(list(csv.DictReader(handle))) == steps
    names = [p.name for p in checkpoint.complete(tmp_path / "two" / "checkpoints")]
    assert names == [p.name for p in checkpoint.complete(tmp_path / "one" / "checkpoints")]
    assert not list((tmp_path / "two" / "checkpoints").glob(".*"))
    assert not (tmp_path / "two" / "run.lock").exists()
