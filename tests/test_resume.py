"""Resume: a run SIGKILLed at arbitrary moments (mid-step, mid-checkpoint-write, mid-export, twice) and resumed with
--resume ends bit-identical to an uninterrupted run; run folders are never silently reused or overwritten.

The kill harness and the full table of kill points live in tests/faults.py (eval/reliability.py runs them all);
three of them run here, and tests/test_two_networks.py runs the two-network ones."""

import csv
import json
import subprocess
import sys

import pytest

from diffkd.api import distill
from diffkd.config import parse_config
from diffkd.errors import DiffkdError
from tests import faults

SUITE_POINTS = [  # the double kill's second resume restores round 2's frozen teacher mid-round
    "during a checkpoint write: EMA file half-written",
    "during export, pipeline half-written",
    "twice: step 4, then step 12 of the resumed run",
]


@pytest.fixture(scope="module")
def progressive_reference(tiny_teacher, tmp_path_factory):
    work = tmp_path_factory.mktemp("kill")
    config = faults.write_yaml(faults.progressive_config(tiny_teacher), work / "progressive.yaml")
    return config, faults.reference_run("progressive", config, work), work


@pytest.mark.slow
@pytest.mark.parametrize("name", SUITE_POINTS)
def test_killed_run_resumes_bit_identical(name, progressive_reference):
    config, reference, work = progressive_reference
    point = next(p for p in faults.KILL_POINTS if p.name == name)
    result = faults.kill_and_resume(point, config, reference, work / f"kill-{SUITE_POINTS.index(name)}")
    assert result.killed and result.identical, result.detail
    with (work / f"kill-{SUITE_POINTS.index(name)}" / "logs" / "metrics.csv").open() as handle:
        rows = [(r["round"], r["step"]) for r in csv.DictReader(handle)]
    assert len(rows) == len(set(rows)) == 18  # rows logged after the checkpoint were dropped, then logged again


def tiny(teacher: str, **train):
    return parse_config({"method": {"name": "progressive", "start_steps": 4, "final_steps": 2, "steps_per_round": 2},
                         "teacher": {"source": teacher},
                         "train": {"batch_size": 8, "checkpoint_every": 1, "device": "cpu", **train},
                         "run_eval": False})


def dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_stale_lock_of_a_killed_job_is_recovered_with_resume(tiny_teacher, tmp_path):
    output = tmp_path / "run"
    distill(tiny(tiny_teacher), output)
    (output / "finished.json").unlink()
    (output / "run.lock").write_text(json.dumps({"pid": dead_pid(), "host": __import__("socket").gethostname()}))
    with pytest.raises(DiffkdError, match="holds an unfinished run: pass --resume"):
        distill(tiny(tiny_teacher), output)
    distill(tiny(tiny_teacher), output, resume=True)
    assert (output / "finished.json").exists() and not (output / "run.lock").exists()
    with pytest.raises(DiffkdError, match="holds a finished run"):
        distill(tiny(tiny_teacher), output, resume=True)


def test_resume_without_a_run_starts_from_step_zero(tiny_teacher, tmp_path):
    fresh, resumed = tmp_path / "fresh", tmp_path / "resumed"
    distill(tiny(tiny_teacher), fresh)
    distill(tiny(tiny_teacher), resumed, resume=True)  # what a scheduler that always passes --resume does first
    weights = "student/unet/diffusion_pytorch_model.safetensors"
    assert faults.same_weights(fresh / weights, resumed / weights)


def test_overwrite_replaces_the_run_and_nothing_else(tiny_teacher, tmp_path):
    output = tmp_path / "run"
    distill(tiny(tiny_teacher), output)
    (output / "notes.txt").write_text("mine")
    (output / "checkpoints" / "ckpt-r09-s00000001").mkdir()
    distill(tiny(tiny_teacher, learning_rate=3e-4), output, overwrite=True)
    assert (output / "notes.txt").read_text() == "mine"
    assert not (output / "checkpoints" / "ckpt-r09-s00000001").exists()
    assert "learning_rate: 0.0003" in (output / "config.yaml").read_text()
