"""Two ranks on CPU (gloo, started by torchrun): gradients are synchronised, only rank 0 writes, and the result equals
a single process running the same global batch as two accumulation shards (measured: bit-identical; the test
allows 1e-6, for float summation order on other builds), for progressive, for the tests' two-network method
(critic x3, then student), whose critic is averaged over ranks like the student, for consistency distillation
(a target network that follows the student), and for dmd (fake score and GAN head x2, then generator)."""

import csv
import os
import shutil
import subprocess
import sys

import pytest
import yaml

from diffkd import checkpoint
from tests.faults import ROOT, consistency_config, dmd_config, two_networks_config

TOLERANCE = 1e-6


def run(args: list[str], env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=900, env=env, check=False)


def one_process(args: list[str]) -> None:
    """The single-process run, in this process at the ranks' one thread (a child would spend ~9 s importing)."""
    import torch

    import tests.two_networks  # noqa: F401  (method.name: two-networks)
    from tests.in_process import run_in_process

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        code, stderr = run_in_process(args, {})
    finally:
        torch.set_num_threads(threads)
    assert code == 0, stderr[-3000:]


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
    one_process(["distill", str(config), "--output", str(tmp_path / "one"),
                 "--set", "train.gradient_accumulation_steps=2"])

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


def dmd_unrolled(teacher: str) -> dict:
    """dmd as above with the whole 2-step sample trained: a random step per process would run other passes on each,
    which sharded networks cannot (refused by the method)."""
    data = dmd(teacher)
    data["method"]["backward_simulation"] = "unrolled"
    return data


def optimizer_moments(run, name: str, phase: str = "student") -> dict:
    tensors, _ = checkpoint.load(run / "checkpoints" / name)
    return {k: v for k, v in tensors[f"optimizer.{phase}"].items() if k.endswith("exp_avg")}


@pytest.mark.slow
@pytest.mark.parametrize("make, port, phase, resume", [(dmd_unrolled, 29545, "generator", True)], ids=["dmd"])
def test_sharded_ranks_take_the_one_process_steps_and_resume_bit_identical(make, port, phase, resume, tiny_teacher,
                                                                         tmp_path):
    """train.shard on two ranks (FSDP2 over gloo): the optimiser's first moments after two steps equal the single
    process's (global batch as two accumulation shards) to float summation order, the logged gradient norms too, for
    dmd's three trained networks (generator, fake score, GAN head), and a sharded run resumed from its first
    checkpoint, also sharded, ends bit-identical to the uninterrupted one. Progressive and consistency (whose
    target network, a follower, is sharded too) passed the same checks (the parameters in git history: make,
    phase and resume) and are left out for the suite's time. The final weights are not compared with the single
    process: Adam turns gradients that are zero but for rounding, 1e-15 against 1e-12, into steps of the learning
    rate's size."""
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(make(tiny_teacher)))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    launch = ["-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port), "-m",
              "tests.kill_wrapper", "distill", str(config), "--set", "train.shard=true", "--output"]
    sharded = run([*launch, str(tmp_path / "sharded")], env)
    assert sharded.returncode == 0, sharded.stderr[-3000:]
    one_process(["distill", str(config), "--output", str(tmp_path / "one"),
                 "--set", "train.gradient_accumulation_steps=2"])

    first = checkpoint.name_for(0, 2)
    left, right = optimizer_moments(tmp_path / "sharded", first, phase), optimizer_moments(tmp_path / "one", first, phase)
    assert left.keys() == right.keys()
    assert max((left[k] - right[k]).abs().max().item() for k in left) <= 1e-6
    norms = []
    for folder in ("sharded", "one"):
        with (tmp_path / folder / "logs" / "metrics.csv").open() as handle:
            norms.append([float(row[f"{phase}/grad_norm" if phase != "student" else "grad_norm"])
                          for row in csv.DictReader(handle)])
    assert norms[0] == pytest.approx(norms[1], rel=1e-5)
    if not resume:
        return

    resumed = tmp_path / "resumed"
    shutil.copytree(tmp_path / "sharded", resumed)
    for later in checkpoint.complete(resumed / "checkpoints")[1:]:
        shutil.rmtree(later)
    for leftover in ("student", "finished.json"):
        target = resumed / leftover
        shutil.rmtree(target) if target.is_dir() else target.unlink()
    again = run([*launch, str(resumed), "--resume"], env)
    assert again.returncode == 0, again.stderr[-3000:]
    weights = "student/unet/diffusion_pytorch_model.safetensors"
    assert max_difference(resumed / weights, tmp_path / "sharded" / weights) == 0.0
