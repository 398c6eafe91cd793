"""A run that runs out of accelerator memory stops with one line naming where, its last checkpoint (left as it
was) and what to change, and goes on with --resume after that change: gradient checkpointing for a step,
a smaller train.validate_batch_size for a validation (both recompute nothing the trained weights depend on)."""

from types import SimpleNamespace

import pytest
import torch

from diffkd import checkpoint
from diffkd.api import distill
from diffkd.config import parse_config
from diffkd.errors import RunDoesNotFit
from diffkd.run_validation import Validator
from diffkd.trainer import Trainer
from tests import faults

OOM = "CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of 79.10 GiB"


def run_config(teacher: str, **train) -> dict:
    config = faults.consistency_config(teacher)
    config["method"]["num_steps"] = 8
    config["train"].update({"validate_every": 2, "validate_samples": 16, **train})
    return config


def out_of_memory_at_call(monkeypatch, owner, name: str, call: int) -> None:
    """``owner.name`` raises torch's out-of-memory error at its ``call``-th call, as a CUDA allocation would."""
    original, calls = getattr(owner, name), []

    def patched(*args, **kwargs):
        calls.append(1)
        if len(calls) == call:
            raise torch.OutOfMemoryError(OOM)
        return original(*args, **kwargs)

    monkeypatch.setattr(owner, name, patched)


def test_out_of_memory_in_a_step_names_it_and_resumes_with_gradient_checkpointing(tiny_teacher, tmp_path,
                                                                                     monkeypatch):
    output = tmp_path / "run"
    out_of_memory_at_call(monkeypatch, Trainer, "_optimizer_step", 5)
    with pytest.raises(RunDoesNotFit) as raised:
        distill(parse_config(run_config(tiny_teacher)), output)
    message = str(raised.value)
    last = checkpoint.latest(output / "checkpoints")
    assert "\n" not in message and "training step 5 of round 1" in message
    assert str(last) in message and checkpoint.read_state(last)["progress"]["step"] == 4
    assert "train.gradient_checkpointing" in message and f"diffkd plan {output / 'config.yaml'}" in message
    monkeypatch.undo()
    distill(parse_config(run_config(tiny_teacher, gradient_checkpointing=True)), output, resume=True)
    assert (output / "student" / "model_index.json").is_file()


def test_out_of_memory_in_validation_resumes_with_a_smaller_validation_batch(tiny_teacher, tmp_path, monkeypatch):
    output = tmp_path / "run"
    out_of_memory_at_call(monkeypatch, Validator, "__call__", 2)  # the validation after step 4
    with pytest.raises(RunDoesNotFit) as raised:
        distill(parse_config(run_config(tiny_teacher)), output)
    message = str(raised.value)
    assert "the validation after step 4 of round 1 (128 noises at once)" in message
    assert "--resume with a smaller train.validate_batch_size" in message
    assert checkpoint.read_state(checkpoint.latest(output / "checkpoints"))["progress"]["step"] == 2
    monkeypatch.undo()
    distill(parse_config(run_config(tiny_teacher, validate_batch_size=8)), output, resume=True)
    record = checkpoint.read_state(checkpoint.latest(output / "checkpoints"))["progress"]["validation"]
    assert [h["step"] for h in record["history"]] == [2, 4, 6, 8]  # the record goes on across the change


def test_out_of_memory_in_the_sampler_choice_keeps_the_trained_run_and_resumes_to_its_export(tiny_teacher, tmp_path,
                                                                                          monkeypatch):
    output = tmp_path / "run"
    out_of_memory_at_call(monkeypatch, Validator, "__call__", 1)  # no in-run validation: the first call is the choice
    with pytest.raises(RunDoesNotFit) as raised:
        distill(parse_config(run_config(tiny_teacher, validate_every=0)), output)
    message = str(raised.value)
    assert "\n" not in message and "the sampler choice at the run's end (128 noises at once)" in message
    progress = checkpoint.read_state(checkpoint.latest(output / "checkpoints"))["progress"]
    assert progress["round"] == 1 and progress["round_health"][0]["steps"] == 8  # the one round saved, finished
    assert not (output / "student").exists()
    monkeypatch.undo()
    distill(parse_config(run_config(tiny_teacher, validate_every=0, validate_batch_size=8)), output, resume=True)
    summary = (output / "training_summary.json").read_text()
    assert (output / "student" / "model_index.json").is_file() and "sampler_choice" in summary


def test_other_errors_pass_through_unchanged(tmp_path):
    stub = SimpleNamespace(checkpoints=tmp_path, output=tmp_path, progress=None)
    with pytest.raises(RuntimeError, match="^shape mismatch$"), Trainer.fits(stub, "a step", "fix"):
        raise RuntimeError("shape mismatch")
    with pytest.raises(RunDoesNotFit, match="none yet"), Trainer.fits(stub, "a step", "fix"):
        raise torch.OutOfMemoryError(OOM)
