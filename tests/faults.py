"""The kill catalogue: where a run is SIGKILLed, and the harness that kills it, resumes it with --resume and compares
its exported weights with an uninterrupted run's (bit-identical on CPU is the bar).

The tests (tests/test_resume.py) run a few of these points; ``python eval/reliability.py`` runs them all and writes
the table in eval/RESULTS.md. A kill is placed by tests/kill_wrapper.py, the CLI with one function patched.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]

TEACHER_CONFIG = {
    "method": {"name": "denoise", "num_steps": 300, "sample_size": 8, "channels": 1, "block_out_channels": [16, 32],
               "layers_per_block": 1, "attention_at_lowest": False, "sample_steps": 16},
    "data": {"source": "digits"},
    "train": {"batch_size": 64, "learning_rate": 2e-3, "lr_schedule": "cosine", "warmup_steps": 20,
              "ema_decay": 0.99, "checkpoint_every": 1000, "log_every": 50, "device": "cpu"},
}


def progressive_config(teacher: str) -> dict:
    """Three rounds (8 -> 4 -> 2 -> 1) of 6 steps, a checkpoint every 2 steps (last 2 kept), EMA on: every kind of
    state a resume must restore (EMA, Adam moments and step, a frozen round teacher mid-round, round boundaries)."""
    return {"method": {"name": "progressive", "start_steps": 8, "final_steps": 1, "steps_per_round": 6},
            "teacher": {"source": teacher}, "data": {"source": "digits"},
            "train": {"batch_size": 16, "learning_rate": 1e-3, "warmup_steps": 2, "ema_decay": 0.9,
                      "checkpoint_every": 2, "keep_checkpoints": 2, "log_every": 1, "device": "cpu"},
            "run_eval": False}


def generator_config(teacher: str) -> dict:
    """64 teacher pairs (DDIM-8) made in shards of 16, then 8 steps of a one-step student; checkpoint every 2."""
    return {"method": {"name": "generator", "num_steps": 8, "student_steps": 1, "num_samples": 64,
                       "teacher_steps": 8, "cache_batch_size": 16, "cache_shard_size": 16},
            "teacher": {"source": teacher},
            "train": {"batch_size": 16, "learning_rate": 1e-3, "ema_decay": 0.9, "checkpoint_every": 2,
                      "keep_checkpoints": 2, "log_every": 1, "device": "cpu"},
            "run_eval": False}


def two_networks_config(teacher: str) -> dict:
    """The tests' two-network method: per step 3 critic updates, then 1 student update (4 updates), 6 steps, a
    checkpoint every 2 (last 2 kept), EMA 0.9 on the student, a target network following it."""
    return {"method": {"name": "two-networks", "num_steps": 6, "critic_updates": 3},
            "teacher": {"source": teacher}, "data": {"source": "digits"},
            "train": {"batch_size": 16, "learning_rate": 1e-3, "ema_decay": 0.9, "checkpoint_every": 2,
                      "keep_checkpoints": 2, "log_every": 1, "device": "cpu"},
            "run_eval": False}


def consistency_config(teacher: str) -> dict:
    """Consistency distillation on a 20-point grid, 6 steps, a checkpoint every 2 (last 2 kept), the export EMA 0.9
    and a target network (EMA 0.9) that a checkpoint writes beside the student and its optimiser."""
    return {"method": {"name": "consistency", "num_steps": 6, "teacher_grid": 20, "target_ema": 0.9},
            "teacher": {"source": teacher}, "data": {"source": "digits"},
            "train": {"batch_size": 16, "learning_rate": 1e-3, "ema_decay": 0.9, "checkpoint_every": 2,
                      "keep_checkpoints": 2, "log_every": 1, "device": "cpu"},
            "run_eval": False}


def dmd_config(teacher: str) -> dict:
    """DMD2 with everything that has state: per step 2 fake-score updates (fake score + GAN classifier head), then 1
    generator update with the GAN and regression terms (32 DDIM-4 teacher pairs), a 2-step generator (backward
    simulation); 4 steps, a checkpoint every 2 (last 2 kept), the shipped recipe's power EMA on the generator
    (its decay depends on the restored step count)."""
    return {"method": {"name": "dmd", "num_steps": 4, "student_steps": 2, "fake_updates": 2,
                       "fake_learning_rate": 2e-3, "gan": 0.1, "gan_classifier": 0.1, "regression": 0.5,
                       "num_samples": 32, "teacher_steps": 4, "cache_batch_size": 16, "cache_shard_size": 16},
            "teacher": {"source": teacher}, "data": {"source": "digits"},
            "train": {"batch_size": 16, "learning_rate": 1e-3, "ema_decay": 0.9999, "ema_warmup": True,
                      "ema_inv_gamma": 2.0, "ema_power": 1.0, "checkpoint_every": 2, "keep_checkpoints": 2,
                      "log_every": 1, "device": "cpu"},
            "run_eval": False}


def lora_config(teacher: str) -> dict:
    """A LoRA student of the tiny text teacher (tests/conftest.make_tiny_sd_pipeline): progressive 4 -> 2 -> 1 with
    a fixed guidance scale, 3 steps a round, a checkpoint every 2 steps, EMA on (of the adapters only)."""
    return {"method": {"name": "progressive", "start_steps": 4, "final_steps": 1, "steps_per_round": 3,
                       "guidance_scale": 3.0},
            "teacher": {"source": teacher},
            "student": {"lora": {"rank": 4, "alpha": 8, "target_modules": ["to_q", "to_k", "to_v", "to_out.0"]}},
            "data": {"source": "digits", "convert": True, "prompts": ["a cat", "a dog"]},
            "train": {"batch_size": 4, "learning_rate": 1e-2, "ema_decay": 0.9, "checkpoint_every": 2,
                      "keep_checkpoints": 2, "log_every": 1, "device": "cpu"},
            "run_eval": False}


def denoise_config() -> dict:
    return {"method": {**TEACHER_CONFIG["method"], "num_steps": 12},
            "data": {"source": "digits"},
            "train": {**TEACHER_CONFIG["train"], "batch_size": 16, "warmup_steps": 2, "ema_decay": 0.9,
                      "checkpoint_every": 4, "keep_checkpoints": 2, "log_every": 1}}


@dataclass
class KillPoint:
    name: str
    kills: list[dict]  # one spec per interrupted run, in order; then a clean --resume finishes the job
    method: str = "progressive"


# Global optimiser steps 1-18 (6 per round); checkpoints at r0 s2, r0 s4, r1 s0 (end of round 1), r1 s2, ...
# A mid-round progressive checkpoint writes student, optimizer, [method,] ema; an end-of-round one student, optimizer.
KILL_POINTS = [
    KillPoint("start of step 1, before any checkpoint (resume starts at step 0)", [{"kind": "step-start", "at": 1}]),
    KillPoint("after backward, step 3", [{"kind": "after-backward", "at": 3}]),
    KillPoint("after the optimiser update, before EMA, step 5", [{"kind": "before-ema", "at": 5}]),
    KillPoint("start of round 2 (step 7), just after the end-of-round checkpoint", [{"kind": "step-start", "at": 7}]),
    KillPoint("after backward, round 2 step 3 (frozen round teacher restored)", [{"kind": "after-backward", "at": 9}]),
    KillPoint("before EMA, round 3 step 4", [{"kind": "before-ema", "at": 16}]),
    KillPoint("during a checkpoint write: first file half-written", [{"kind": "checkpoint-file", "at": 1}]),
    KillPoint("during a checkpoint write: EMA file half-written", [{"kind": "checkpoint-file", "at": 3}]),
    KillPoint("during a checkpoint write: all files written, not yet renamed", [{"kind": "checkpoint-fsync", "at": 4}]),
    KillPoint("during an end-of-round checkpoint write (round 1)", [{"kind": "checkpoint-file", "at": 7}]),
    KillPoint("during a checkpoint write: round-teacher file half-written", [{"kind": "checkpoint-file", "at": 11}]),
    KillPoint("after a checkpoint's rename, before pruning", [{"kind": "after-rename", "at": 3}]),
    KillPoint("while pruning an old checkpoint", [{"kind": "mid-prune", "at": 1}]),
    KillPoint("during export, pipeline half-written", [{"kind": "export-partial", "at": 1}]),
    KillPoint("after export, before the finished marker", [{"kind": "export-done", "at": 1}]),
    KillPoint("twice: step 4, then step 12 of the resumed run",
              [{"kind": "after-backward", "at": 4}, {"kind": "after-backward", "at": 9}]),
    KillPoint("at a random moment (timer A)", [{"kind": "timer", "seed": 1}]),
    KillPoint("at a random moment (timer B)", [{"kind": "timer", "seed": 2}]),
    KillPoint("teacher training (denoise): after backward, step 7", [{"kind": "after-backward", "at": 7}], "denoise"),
    KillPoint("teacher training (denoise): during a checkpoint write", [{"kind": "checkpoint-file", "at": 2}],
              "denoise"),
    KillPoint("teacher-sample generation (generator): 2nd of 4 shards half-written", [{"kind": "cache-file", "at": 2}],
              "generator"),
    KillPoint("generator training: after backward, step 5", [{"kind": "after-backward", "at": 5}], "generator"),
    # two networks: updates 4s-3 .. 4s-1 are step s's critic updates, update 4s its student update; a checkpoint
    # writes student, critic, optimizer.critic, optimizer.student, ema.student (mid-round), follower.target
    KillPoint("two networks: between phases (3 critic updates of step 3 done, before its student update)",
              [{"kind": "update-start", "at": 12}], "two-networks"),
    KillPoint("two networks: between two critic updates, step 4", [{"kind": "update-start", "at": 15}],
              "two-networks"),
    KillPoint("two networks: during a checkpoint write, both optimisers' files there, the second half-written",
              [{"kind": "checkpoint-file", "at": 4}], "two-networks"),
    KillPoint("two networks: during a checkpoint write, target-network file half-written",
              [{"kind": "checkpoint-file", "at": 12}], "two-networks"),
    KillPoint("two networks: before EMA, step 5", [{"kind": "before-ema", "at": 5}], "two-networks"),
    # consistency: a checkpoint writes student, optimizer.student, ema.student (mid-round), follower.target
    KillPoint("consistency: during a checkpoint write, target-network file half-written",
              [{"kind": "checkpoint-file", "at": 4}], "consistency"),
    KillPoint("consistency: after backward, step 5 (target network restored from step 4)",
              [{"kind": "after-backward", "at": 5}], "consistency"),
    # dmd: updates 3s-2, 3s-1 are step s's fake-score updates, update 3s its generator update
    KillPoint("dmd: between phases (2 fake-score updates of step 3 done, before its generator update)",
              [{"kind": "update-start", "at": 9}], "dmd"),
]


def write_yaml(data: dict, path: Path) -> Path:
    import yaml

    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def run_cli(args: list[str], kill: dict | None = None, timeout: float = 900, env: dict | None = None
            ) -> subprocess.CompletedProcess:
    """The command in a child with this process's torch thread count: a reference run made in-process is then
    bit-identical to the child's (reductions split over another thread count round differently)."""
    env = {**os.environ, **(env or {}), "DIFFKD_KILL": json.dumps(kill) if kill else "", "PYTHONPATH": str(ROOT),
           "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": str(torch.get_num_threads())}
    return subprocess.run([sys.executable, "-m", "tests.kill_wrapper", *args], capture_output=True, text=True,
                          timeout=timeout,
                          env=env, cwd=ROOT, check=False)


def job_args(method: str, config: Path, output: Path) -> list[str]:
    """The command; a generator run gets its own teacher-sample cache next to its output (not the shared one)."""
    args = ["train-teacher" if method == "denoise" else "distill", str(config), "--output", str(output)]
    return args + (["--set", f"method.cache={output}-cache"] if method in ("generator", "dmd") else [])


def exported_weights(output: Path, method: str) -> Path:
    """The exported weights of a run (method "lora": a LoRA student's adapter file)."""
    if method == "lora":
        return output / "student" / "pytorch_lora_weights.safetensors"
    folder = output / ("pipeline" if method == "denoise" else "student")
    network = "transformer" if (folder / "transformer").is_dir() else "unet"  # the layout's component
    return folder / network / "diffusion_pytorch_model.safetensors"


def same_weights(a: Path, b: Path) -> bool:
    from safetensors.torch import load_file

    left, right = load_file(a), load_file(b)
    return left.keys() == right.keys() and all(left[k].equal(right[k]) for k in left)


@dataclass
class KillResult:
    point: KillPoint
    killed: bool = False
    identical: bool = False
    detail: str = ""
    seconds: float = 0.0
    resumed_from: list[str] = field(default_factory=list)


def reference_run(method: str, config: Path, work: Path) -> Path:
    """The uninterrupted run, in this process: the same command as the killed child's (cli.main, the same torch
    thread count), without the ~9 s a child spends importing torch and diffusers."""
    import tests.two_networks  # noqa: F401  (method.name: two-networks, as tests/kill_wrapper.py registers it)
    from tests.in_process import run_in_process

    output = work / f"reference-{method}"
    for folder in (output, Path(f"{output}-cache")):
        shutil.rmtree(folder, ignore_errors=True)
    code, stderr = run_in_process(job_args(method, config, output), {"HF_HUB_OFFLINE": "1"})
    if code != 0:
        raise RuntimeError(f"reference run failed: {stderr[-2000:]}")
    return exported_weights(output, method)


def kill_and_resume(point: KillPoint, config: Path, reference: Path, output: Path) -> KillResult:
    """Run with each kill in turn (each must die by SIGKILL), then --resume cleanly and compare the weights."""
    started, outcome = time.perf_counter(), KillResult(point)
    for folder in (output, Path(f"{output}-cache")):
        shutil.rmtree(folder, ignore_errors=True)
    args = job_args(point.method, config, output)
    for index, kill in enumerate(point.kills):
        seconds = random.Random(kill.get("seed", 0)).uniform(0.2, 2.5)
        for _ in range(4):  # a timer that fires after the run has finished is no kill point: try a shorter one
            if kill["kind"] == "timer":
                shutil.rmtree(output, ignore_errors=True)
                kill, seconds = {**kill, "seconds": seconds}, seconds / 2
            result = run_cli(args + (["--resume"] if index else []), kill)
            if kill["kind"] != "timer" or not (output / "finished.json").exists():
                break
        if result.returncode != -9 or (output / "finished.json").exists():
            outcome.detail = f"kill {index + 1} did not happen mid-run (exit {result.returncode})"
            return outcome
        outcome.resumed_from.append(_newest_checkpoint(output))
    outcome.killed = True
    result = run_cli(args + ["--resume"])
    outcome.seconds = time.perf_counter() - started
    if result.returncode != 0:
        outcome.detail = f"resume failed (exit {result.returncode}): {result.stderr.strip().splitlines()[-1:]}"
        return outcome
    outcome.identical = same_weights(exported_weights(output, point.method), reference)
    outcome.detail = "bit-identical" if outcome.identical else "weights differ"
    return outcome


def _newest_checkpoint(output: Path) -> str:
    from diffkd.checkpoint import latest

    found = latest(output / "checkpoints")
    return found.name if found else "none (starts at step 0)"
