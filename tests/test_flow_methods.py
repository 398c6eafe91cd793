"""Every method on a rectified-flow teacher (a tiny FlowMatchEulerDiscreteScheduler digits teacher made by the
project's denoise method): a few steps each, the export loads as a plain diffusers pipeline with the FlowMatch
scheduler it was trained for and samples what the training-time sampler gives; a killed run resumes bit-identically."""

import pytest
import torch
from diffusers import DDPMPipeline, DiffusionPipeline, FlowMatchEulerDiscreteScheduler, FlowMatchLCMScheduler

from diffkd.api import distill
from diffkd.config import parse_config
from diffkd.io import load_pipeline
from diffkd.methods.consistency import consistency_function
from diffkd.paths import FlowPath
from diffkd.sampling import ddim_sample
from tests import faults

pytestmark = pytest.mark.slow

FLOW_TEACHER = {**faults.TEACHER_CONFIG,
                "method": {**faults.TEACHER_CONFIG["method"], "prediction_type": "flow", "num_steps": 150}}


@pytest.fixture(scope="module")
def flow_teacher(tmp_path_factory) -> str:
    return str(distill(parse_config(FLOW_TEACHER), tmp_path_factory.mktemp("flow-teacher")))


def _run(method: dict, teacher: str, folder, **train) -> DiffusionPipeline:
    config = parse_config({"method": method, "teacher": {"source": teacher}, "data": {"source": "digits"},
                           "train": {"batch_size": 8, "device": "cpu", **train}, "run_eval": False})
    return distill(config, folder)


def _pipeline_images(pipe, k: int) -> torch.Tensor:
    images = pipe(num_inference_steps=k, batch_size=2, output_type="np", generator=torch.Generator().manual_seed(0))
    return torch.from_numpy(images.images).permute(0, 3, 1, 2)


def test_flow_teacher_is_a_flow_pipeline(flow_teacher):
    teacher = load_pipeline(flow_teacher)
    assert isinstance(teacher.pipeline, DDPMPipeline)
    assert isinstance(teacher.scheduler, FlowMatchEulerDiscreteScheduler)
    assert isinstance(teacher.denoiser.path, FlowPath) and teacher.denoiser.prediction_type == "flow"


def test_consistency_student_samples_with_flowmatch_lcm_at_any_k(flow_teacher, tmp_path):
    folder = _run({"name": "consistency", "num_steps": 3, "teacher_grid": 20}, flow_teacher, tmp_path / "run")
    pipe = DiffusionPipeline.from_pretrained(folder)
    assert isinstance(pipe, DDPMPipeline) and isinstance(pipe.scheduler, FlowMatchLCMScheduler)
    card = (folder / "README.md").read_text()
    assert "rectified-flow" in card and "shift: 1.0" in card
    student = load_pipeline(str(folder))
    noise = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0))  # what the pipeline draws first
    with torch.no_grad():
        f = consistency_function(student.denoiser, noise, torch.full((2,), 1000.0), None, 10.0)
    torch.testing.assert_close(_pipeline_images(pipe, 1), (f / 2 + 0.5).clamp(0, 1), atol=1e-5, rtol=1e-5)
    for k in (2, 4, 8):
        images = _pipeline_images(pipe, k)
        assert images.shape == (2, 1, 8, 8) and torch.isfinite(images).all()


@pytest.mark.parametrize("method", [
    {"name": "progressive", "start_steps": 4, "final_steps": 2, "steps_per_round": 2},
    {"name": "dmd", "num_steps": 2, "student_steps": 2, "fake_updates": 1},
    {"name": "generator", "num_steps": 2, "student_steps": 2, "num_samples": 16, "teacher_steps": 4,
     "cache_batch_size": 16},
], ids=lambda m: m["name"])
def test_multistep_students_export_flowmatch_euler_on_their_grid(flow_teacher, tmp_path, method):
    """The pipeline's k-step sample is the training-time Euler on the path's grid (sigma = 1, 1/2, 0 at k = 2)."""
    folder = _run(method, flow_teacher, tmp_path / "run")
    pipe = DiffusionPipeline.from_pretrained(folder)
    assert isinstance(pipe, DDPMPipeline) and isinstance(pipe.scheduler, FlowMatchEulerDiscreteScheduler)
    student = load_pipeline(str(folder))
    assert student.denoiser.prediction_type == "flow"
    noise = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    ours = ddim_sample(student.denoiser, noise, 2)
    torch.testing.assert_close(_pipeline_images(pipe, 2), (ours / 2 + 0.5).clamp(0, 1), atol=1e-5, rtol=1e-5)
    pipe.scheduler.set_timesteps(2)
    assert pipe.scheduler.sigmas.tolist() == [1.0, 0.5, 0.0]


def test_killed_consistency_run_on_a_flow_teacher_resumes_bit_identical(flow_teacher, tmp_path):
    config = faults.write_yaml(faults.consistency_config(flow_teacher), tmp_path / "consistency.yaml")
    reference = faults.reference_run("consistency", config, tmp_path)
    point = next(p for p in faults.KILL_POINTS if p.method == "consistency" and "after backward" in p.name)
    result = faults.kill_and_resume(point, config, reference, tmp_path / "killed")
    assert result.killed and result.identical, result.detail
