"""Layout adapters: each family's teacher, called through its layout with prompts encoded by its pipeline's own
``encode_prompt``, samples exactly what its own pipeline class samples; the student of each family is distilled a
few steps on CPU and its export loads and samples in that pipeline class."""

import pytest
import torch
from diffusers import (
    DiffusionPipeline,
    LCMScheduler,
    StableDiffusion3Pipeline,
    StableDiffusionXLPipeline,
)

from diffkd.api import distill
from diffkd.conditioning import batch_conditioning, encode_captions
from diffkd.config import parse_config
from diffkd.io import load_pipeline
from diffkd.layouts import Layout
from diffkd.layouts.sd3 import SD3Layout
from diffkd.layouts.sdxl import SDXLLayout
from diffkd.methods.consistency import consistency_function
from diffkd.sampling import ddim_sample

PROMPTS = ["a cat", "a red dog", "a cat"]
PIPELINE_CLASSES = {"tiny_sdxl": StableDiffusionXLPipeline, "tiny_sd3": StableDiffusion3Pipeline}


def _pipeline_latents(pipe, noise: torch.Tensor, k: int, guidance_scale: float, size: int) -> torch.Tensor:
    return pipe(PROMPTS[:len(noise)], num_inference_steps=k, guidance_scale=guidance_scale, latents=noise,
                height=size, width=size, output_type="latent").images


def test_each_pipeline_gets_its_layout(tiny_sd, tiny_sdxl, tiny_sd3):
    assert type(load_pipeline(tiny_sd).layout) is Layout
    sdxl, sd3 = load_pipeline(tiny_sdxl), load_pipeline(tiny_sd3)
    assert isinstance(sdxl.layout, SDXLLayout) and sdxl.component == "unet"
    assert isinstance(sd3.layout, SD3Layout) and sd3.component == "transformer" and sd3.unet is sd3.pipeline.transformer
    assert sd3.pipeline.text_encoder_3 is None  # saved without T5, loaded as a user loads it
    assert sd3.latent_shape == sdxl.latent_shape == (4, 4, 4) and sd3.image_size == 8


@pytest.mark.parametrize("name", ["tiny_sdxl", "tiny_sd3"])
def test_the_teacher_through_its_layout_samples_what_its_pipeline_samples(name, request):
    """Guided k-step sampling by the Denoiser on rows the layout encoded equals the pipeline's own call (its
    encode_prompt, added time ids / pooled projections, CFG) from the same noise."""
    teacher = load_pipeline(request.getfixturevalue(name))
    cond = batch_conditioning(encode_captions(teacher, PROMPTS), 3.0)
    noise = torch.randn(len(PROMPTS), *teacher.latent_shape, generator=torch.Generator().manual_seed(0))
    ours = ddim_sample(teacher.denoiser, noise, 2, cond)
    pipe = teacher.pipeline
    pipe.scheduler = teacher.denoiser.path.multistep_scheduler(pipe.scheduler, 2, teacher.denoiser.prediction_type,
                                                              None)
    theirs = _pipeline_latents(pipe, noise, 2, 3.0, teacher.image_size)
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(theirs, ddim_sample(teacher.denoiser, noise, 2, cond.unguided()), atol=1e-3)


def _run(teacher: str, method: dict, folder, **student) -> DiffusionPipeline:
    config = parse_config({"method": method, "teacher": {"source": teacher}, "student": student,
                           "data": {"source": "digits", "convert": True, "resize": True, "prompts": PROMPTS[:2]},
                           "train": {"batch_size": 2, "device": "cpu"}, "run_eval": False})
    return distill(config, folder)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["tiny_sdxl", "tiny_sd3"])
def test_consistency_student_loads_in_its_pipeline_class_and_samples_at_any_k(name, request, tmp_path):
    source = request.getfixturevalue(name)
    folder = _run(source, {"name": "consistency", "num_steps": 2, "teacher_grid": 20, "guidance_scale": 3.0},
                  tmp_path / "run")
    pipe = PIPELINE_CLASSES[name].from_pretrained(folder, **({"text_encoder_3": None, "tokenizer_3": None}
                                                             if name == "tiny_sd3" else {}))
    student = load_pipeline(str(folder))
    assert student.component == load_pipeline(source).component
    assert isinstance(pipe.scheduler, LCMScheduler) == (name == "tiny_sdxl")
    noise = torch.randn(2, *student.latent_shape, generator=torch.Generator().manual_seed(0))
    cond = batch_conditioning(encode_captions(student, PROMPTS[:2]), 1.0).unguided()
    top = student.denoiser.path.consistency_grid(20)[-1]  # where the exported scheduler starts at k = 1
    with torch.no_grad():
        ours = consistency_function(student.denoiser, noise, torch.full((2,), top), cond, 10.0)
    torch.testing.assert_close(_pipeline_latents(pipe, noise, 1, 1.0, student.image_size), ours, atol=1e-5, rtol=1e-4)
    images = pipe(PROMPTS[:2], num_inference_steps=4, guidance_scale=1.0, height=8, width=8, output_type="np").images
    assert images.shape == (2, 8, 8, 3)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["tiny_sdxl", "tiny_sd3"])
def test_dmd_generator_loads_in_its_pipeline_class_and_samples_its_grid(name, request, tmp_path):
    source = request.getfixturevalue(name)
    folder = _run(source, {"name": "dmd", "num_steps": 2, "student_steps": 2, "fake_updates": 1,
                           "guidance_scale": 3.0}, tmp_path / "run")
    pipe = PIPELINE_CLASSES[name].from_pretrained(folder, **({"text_encoder_3": None, "tokenizer_3": None}
                                                             if name == "tiny_sd3" else {}))
    student = load_pipeline(str(folder))
    noise = torch.randn(2, *student.latent_shape, generator=torch.Generator().manual_seed(0))
    cond = batch_conditioning(encode_captions(student, PROMPTS[:2]), 1.0).unguided()
    ours = ddim_sample(student.denoiser, noise, 2, cond)
    torch.testing.assert_close(_pipeline_latents(pipe, noise, 2, 1.0, student.image_size), ours, atol=1e-5, rtol=1e-4)
    teacher = load_pipeline(source)
    assert any(not torch.equal(a, b) for a, b in zip(student.unet.state_dict().values(),
                                                       teacher.unet.state_dict().values()))
