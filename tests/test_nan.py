"""Numerical faults: a non-finite loss or gradient stops the run naming the step and the term (or, with
nan_policy=skip, skips and counts up to a limit); the last good checkpoint stays and resumes."""

import json

import pytest
import torch

from diffkd import checkpoint
from diffkd.api import distill
from diffkd.config import parse_config
from diffkd.errors import TrainingDiverged
from diffkd.methods.progressive import ProgressiveDistillation


def config(teacher: str, **train):
    return parse_config({
        "method": {"name": "progressive", "start_steps": 8, "final_steps": 4, "steps_per_round": 6},
        "teacher": {"source": teacher},
        "train": {"batch_size": 8, "learning_rate": 1e-3, "checkpoint_every": 2, "keep_checkpoints": 5,
                  "device": "cpu", **train},
        "run_eval": False})


class _NanGradient(torch.autograd.Function):
    """Identity forward, NaN backward: a finite loss whose gradient is not."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * float("nan")


def fault_at(monkeypatch, bad_steps: set[int], where: str = "loss"):
    """Make the progressive loss non-finite (or its gradient) at the given 1-based optimiser steps."""
    original = ProgressiveDistillation.loss
    calls = {"n": 0}

    def loss(self, phase, batch, generator):
        calls["n"] += 1
        terms = original(self, phase, batch, generator)
        if calls["n"] in bad_steps:
            if where == "loss":
                terms.terms["distill"] = terms.terms["distill"] * float("nan")
            else:
                weight = next(self.student.parameters())
                terms.terms["distill"] = terms.terms["distill"] + 0 * _NanGradient.apply(weight).sum()
        return terms

    monkeypatch.setattr(ProgressiveDistillation, "loss", loss)


@pytest.mark.parametrize("where, term", [("loss", "loss term(s) distill"), ("gradient", "gradient")])
def test_nonfinite_stops_naming_step_and_term_and_keeps_last_good_checkpoint(tiny_teacher, tmp_path, monkeypatch,
                                                                            where, term):
    fault_at(monkeypatch, {5}, where)
    with pytest.raises(TrainingDiverged) as raised:
        distill(config(tiny_teacher), tmp_path / "run")
    message = str(raised.value)
    assert f"non-finite {term}" in message and "round 1, step 5" in message
    last = checkpoint.latest(tmp_path / "run" / "checkpoints")
    assert last is not None and last.name == checkpoint.name_for(0, 4) and str(last) in message
    tensors, _ = checkpoint.load(last)
    assert all(torch.isfinite(v).all() for v in tensors["student"].values())
    assert not (tmp_path / "run" / "finished.json").exists() and not (tmp_path / "run" / "run.lock").exists()

    monkeypatch.undo()  # the fault was transient: the run resumes from the last good checkpoint and finishes
    distill(config(tiny_teacher), tmp_path / "run", resume=True)
    assert (tmp_path / "run" / "finished.json").exists()


def test_skip_policy_counts_skipped_steps_and_finishes(tiny_teacher, tmp_path, monkeypatch):
    fault_at(monkeypatch, {2, 4})
    distill(config(tiny_teacher, nan_policy="skip", max_skipped_steps=2), tmp_path / "run")
    summary = json.loads((tmp_path / "run" / "training_summary.json").read_text())
    assert summary["skipped_steps"] == 2 and summary["step"] == 0 and summary["round"] == 1


def test_skip_policy_stops_past_its_limit(tiny_teacher, tmp_path, monkeypatch):
    fault_at(monkeypatch, {2, 3, 4}, "gradient")
    with pytest.raises(TrainingDiverged, match="round 1, step 4"):
        distill(config(tiny_teacher, nan_policy="skip", max_skipped_steps=2), tmp_path / "run")
