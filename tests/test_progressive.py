"""Progressive distillation works: the distilled k-step student is closer to the teacher's many-step samples
than the teacher's own DDIM at k steps, from the same noise."""

import pytest
import torch

from diffkd.api import distill
from diffkd.config import parse_config
from diffkd.io import load_pipeline
from diffkd.sampling import ddim_sample


def distil(teacher: str, output, final_steps: int, **method) -> str:
    config = parse_config({
        "method": {"name": "progressive", "start_steps": 16, "final_steps": final_steps, "steps_per_round": 60,
                   **method},
        "teacher": {"source": teacher},
        "train": {"batch_size": 64, "learning_rate": 1e-3, "checkpoint_every": 1000, "device": "cpu"},
        "run_eval": False,
    })
    return str(distill(config, output))


def mse(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).pow(2).mean().item()


@pytest.mark.slow
def test_distilled_student_beats_teacher_ddim_at_same_steps(tiny_teacher, tmp_path):
    student_dir = distil(tiny_teacher, tmp_path / "run", final_steps=2)
    teacher = load_pipeline(tiny_teacher).denoiser
    student = load_pipeline(student_dir).denoiser
    noise = torch.randn(256, 1, 8, 8, generator=torch.Generator().manual_seed(123))
    reference = ddim_sample(teacher, noise, 64)
    student_error = mse(ddim_sample(student, noise, 2), reference)
    teacher_error = mse(ddim_sample(teacher, noise, 2), reference)
    # measured: 0.37x (0.27x at 150 steps a round)
    assert student_error < 0.5 * teacher_error, (student_error, teacher_error)


def prepared_method(tmp_path, method: dict, **sections):
    """The progressive method on a tiny epsilon teacher saved under tmp_path, ready to call loss() on."""
    from diffusers import DDIMPipeline

    from diffkd.api import prepare
    from tests.conftest import make_scheduler, make_tiny_unet

    DDIMPipeline(make_tiny_unet(), make_scheduler("epsilon")).save_pretrained(tmp_path / "teacher")
    config = parse_config({"method": {"name": "progressive", **method}, **sections,
                           "teacher": {"source": str(tmp_path / "teacher")}, "train": {"device": "cpu"},
                           "run_eval": False})
    return prepare(config)[1]


def test_imitation_round_targets_the_teachers_own_step(tmp_path):
    """A student identical to the teacher has zero loss when imitating it, and not when halving its steps."""
    method = prepared_method(tmp_path, {"start_steps": 8, "final_steps": 2, "imitation_steps": 5,
                                        "student_prediction_type": "teacher"})
    assert [(r.name, r.num_steps) for r in method.rounds()] == [("8 (imitate)", 5), ("8->4", 500), ("4->2", 500)]
    batch = {"x0": torch.rand(16, 1, 8, 8) * 2 - 1}
    losses = []
    for index in (0, 1):
        method.begin_round(index)
        assert method.round_teacher is method.teacher.denoiser  # both learn from the pipeline's teacher
        losses.append(method.loss("student", batch, torch.Generator().manual_seed(0)).total.item())
    assert losses[0] < 1e-5, losses  # float32 round-off only
    assert losses[1] > 1e-2, losses  # a real gap: two teacher steps are not one
    method.begin_round(2)
    assert method.round_teacher is not method.teacher.denoiser


@pytest.mark.parametrize("kd_rounds, halving_has_kd", [("imitation", False), ("all", True)])
def test_kd_rounds_keeps_teacher_terms_to_the_imitation_round(tmp_path, kd_rounds, halving_has_kd):
    """Output and feature KD compare with the pipeline's teacher, the target only where the student does the
    teacher's own step; kd_rounds="imitation" drops them from the halvings and leaves no hook behind."""
    method = prepared_method(
        tmp_path, {"start_steps": 8, "final_steps": 4, "imitation_steps": 5, "kd_rounds": kd_rounds},
        student={"architecture": "compact", "width_multiplier": 0.5, "latency_batch_size": 0},
        losses={"output_kd": 1.0, "feature_kd": 1.0})
    batch = {"x0": torch.rand(16, 1, 8, 8) * 2 - 1}
    kd_names = []
    for index in (0, 1):
        method.begin_round(index)
        terms = method.loss("student", batch, torch.Generator().manual_seed(0)).terms
        kd_names.append({name for name in terms if name == "output_kd" or name.startswith("feature/")})
        assert all(not m._forward_hooks for m in method.student.modules())
    assert "output_kd" in kd_names[0] and any(name.startswith("feature/") for name in kd_names[0])
    assert bool(kd_names[1]) == halving_has_kd, kd_names[1]


def test_kd_rounds_imitation_without_an_imitation_round_is_refused():
    from diffkd.errors import DiffkdError

    with pytest.raises(DiffkdError, match="imitation_steps"):
        parse_config({"method": {"name": "progressive", "kd_rounds": "imitation"}, "teacher": {"source": "x"}})
