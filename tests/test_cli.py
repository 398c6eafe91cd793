"""The real command line, in a subprocess, as a user runs it; the result loads in plain diffusers."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
import yaml
from diffusers import DiffusionPipeline

from diffkd import schedule
from diffkd.io import load_pipeline
from diffkd.sampling import ddim_sample


def diffkd(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "diffkd", *args], capture_output=True, text=True, timeout=600,
                          check=False)


def test_help_lists_subcommands():
    result = diffkd("--help")
    assert result.returncode == 0
    for command in ("distill", "train-teacher", "eval"):
        assert command in result.stdout


def test_dry_run_prints_resolved_config_and_writes_nothing(tmp_path):
    result = diffkd("distill", "configs/digits-progressive.yaml", "--output", str(tmp_path / "run"), "--dry-run",
                    "--set", "method.final_steps=2", "--set", "train.learning_rate=1e-4")
    assert result.returncode == 0, result.stderr
    resolved = yaml.safe_load(result.stdout)
    assert resolved["method"]["final_steps"] == 2 and resolved["train"]["learning_rate"] == 1e-4
    assert resolved["teacher"]["source"] == "teachers/digits-16"
    assert not (tmp_path / "run").exists()


def test_bad_key_is_one_line_exit_2(tmp_path):
    result = diffkd("distill", "configs/digits-progressive.yaml", "--output", str(tmp_path / "run"),
                    "--set", "method.final_step=2")
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0
    assert "did you mean 'method.final_steps'" in result.stderr
    assert not (tmp_path / "run").exists()


def test_distill_end_to_end_loads_in_plain_diffusers(tiny_teacher, tmp_path):
    out = tmp_path / "run"
    result = diffkd("distill", "configs/digits-progressive.yaml", "--output", str(out), "--no-eval",
                    "--set", f"teacher.source={tiny_teacher}", "--set", "method.start_steps=8",
                    "--set", "method.final_steps=2", "--set", "method.steps_per_round=5",
                    "--set", "train.batch_size=16", "--set", "train.checkpoint_every=3",
                    "--set", "train.keep_checkpoints=1")
    assert result.returncode == 0, result.stderr[-3000:]
    for name in ("student", "checkpoints", "logs/metrics.csv", "config.yaml"):
        assert (out / name).exists(), name

    card = (out / "student" / "README.md").read_text().split("---")[1]
    front = yaml.safe_load(card)
    assert front["library_name"] == "diffusers" and front["method"] == "progressive"
    assert front["num_inference_steps"] == 2 and front["prediction_type"] == "v_prediction"
    assert front["teacher"] == str(Path(tiny_teacher).resolve()) and front["training_time_seconds"] > 0
    assert len(front["teacher_sha256"]) == 64  # a local teacher is recorded with its content hash
    assert len(list((out / "checkpoints").iterdir())) == 1  # train.keep_checkpoints=1, nothing half-written

    pipe = DiffusionPipeline.from_pretrained(out / "student")
    pipe.scheduler.set_timesteps(2)
    assert pipe.scheduler.timesteps.tolist() == schedule.trailing_grid(1000, 2)[:-1]
    images = pipe(batch_size=4, num_inference_steps=2, generator=torch.Generator().manual_seed(0),
                  output_type="np").images
    # the pipeline samples exactly the student's grid: same noise through our DDIM gives the same images
    noise = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    ours = (ddim_sample(load_pipeline(str(out / "student")).denoiser, noise, 2) / 2 + 0.5).clamp(0, 1)
    np.testing.assert_allclose(images, ours.permute(0, 2, 3, 1).numpy(), atol=1e-4)
