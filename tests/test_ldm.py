"""Unconditional latent diffusion (LDMPipeline: a UNet on a VQModel's latents): the layout's teacher samples what
its pipeline samples, a student exports as an LDMPipeline that samples its training-time sampler, and the vq and
denoise stages make such a teacher from images."""

import pytest
import torch
from diffusers import DiffusionPipeline, LCMScheduler, LDMPipeline

from diffkd.api import distill
from diffkd.config import parse_config
from diffkd.data import load_images
from diffkd.errors import DiffkdError
from diffkd.io import load_pipeline
from diffkd.layouts.ldm import LDMLayout
from diffkd.methods.consistency import consistency_function
from diffkd.sampling import ddim_sample

DATA = {"source": "digits", "convert": True, "resize": True}
TRAIN = {"batch_size": 8, "device": "cpu", "learning_rate": 2e-3}


def _images(noise_latents: torch.Tensor, teacher) -> torch.Tensor:
    """Latents decoded as LDMPipeline returns them with output_type='np'."""
    with torch.no_grad():
        return (teacher.denoiser.decode(noise_latents) / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1)


def test_an_ldm_teacher_is_latent_with_its_vqmodel_and_samples_what_its_pipeline_samples(tiny_ldm):
    teacher = load_pipeline(tiny_ldm)
    vqvae = teacher.pipeline.vqvae
    assert isinstance(teacher.layout, LDMLayout) and teacher.denoiser.vae is vqvae
    assert teacher.latent_shape == (3, 4, 4) and teacher.image_size == 8 and teacher.image_channels == 3
    images = torch.rand(2, 3, 8, 8) * 2 - 1
    with torch.no_grad():  # the encoder's latents before quantisation, scaled as the pipeline unscales them
        torch.testing.assert_close(teacher.denoiser.encode(images), vqvae.encode(images).latents * 0.5)
    noise = torch.randn(2, *teacher.latent_shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = _images(ddim_sample(teacher.denoiser, noise, 2), teacher)
    pipe = teacher.pipeline
    pipe.scheduler = teacher.denoiser.path.multistep_scheduler(pipe.scheduler, 2, "epsilon", None)
    theirs = pipe(batch_size=2, generator=torch.Generator().manual_seed(0), num_inference_steps=2, eta=0.0,
                  output_type="np").images
    torch.testing.assert_close(torch.from_numpy(theirs), ours, atol=1e-5, rtol=1e-5)


def test_a_consistency_student_of_an_ldm_teacher_is_an_ldm_pipeline_sampling_its_consistency_function(
        tiny_ldm, tmp_path):
    config = parse_config({"method": {"name": "consistency", "num_steps": 2, "teacher_grid": 20,
                                      "sampler": "LCMScheduler", "reparameterisation_steps": 2},  # LDM's betas: v
                           "teacher": {"source": tiny_ldm}, "data": DATA, "train": TRAIN, "run_eval": False})
    folder = distill(config, tmp_path / "run")
    pipe = DiffusionPipeline.from_pretrained(folder)
    assert isinstance(pipe, LDMPipeline) and isinstance(pipe.scheduler, LCMScheduler)
    student = load_pipeline(str(folder))
    noise = torch.randn(2, *student.latent_shape, generator=torch.Generator().manual_seed(0))
    top = student.denoiser.path.consistency_grid(20)[-1]  # where the exported scheduler starts at k = 1
    with torch.no_grad():
        ours = _images(consistency_function(student.denoiser, noise, torch.full((2,), top), None, 10.0), student)
    theirs = pipe(batch_size=2, generator=torch.Generator().manual_seed(0), num_inference_steps=1,
                  output_type="np").images
    torch.testing.assert_close(torch.from_numpy(theirs), ours, atol=1e-4, rtol=1e-4)
    assert any(not torch.equal(a, b) for a, b in zip(student.unet.state_dict().values(),
                                                       load_pipeline(tiny_ldm).unet.state_dict().values()))


MULTISTEP = {"dmd": {"name": "dmd", "num_steps": 2, "student_steps": 2, "fake_updates": 1},
             "progressive": {"name": "progressive", "start_steps": 4, "final_steps": 2, "steps_per_round": 1}}


@pytest.mark.parametrize("method", MULTISTEP)
def test_multistep_students_of_an_ldm_teacher_sample_their_grid_in_ldm_pipeline(method, tiny_ldm, tmp_path):
    config = parse_config({"method": MULTISTEP[method], "teacher": {"source": tiny_ldm}, "data": DATA,
                           "train": TRAIN, "run_eval": False})
    pipe = DiffusionPipeline.from_pretrained(distill(config, tmp_path / "run"))
    assert isinstance(pipe, LDMPipeline)
    student = load_pipeline(str(tmp_path / "run" / "student"))
    noise = torch.randn(2, *student.latent_shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = _images(ddim_sample(student.denoiser, noise, 2), student)
    theirs = pipe(batch_size=2, generator=torch.Generator().manual_seed(0), num_inference_steps=2, eta=0.0,
                  output_type="np").images
    torch.testing.assert_close(torch.from_numpy(theirs), ours, atol=1e-4, rtol=1e-4)


def _stage(method: dict, folder, steps: int) -> str:
    return str(distill(parse_config({"method": {**method, "num_steps": steps}, "data": DATA, "train": TRAIN}),
                       folder))


@pytest.fixture(scope="module")
def trained_vq(tmp_path_factory) -> tuple[str, str]:
    """The vq stage at 0 and 60 steps on 8 px RGB digits (two levels: 4x4x3 latents, 64 codes)."""
    method = {"name": "vq", "sample_size": 8, "block_out_channels": [16, 16], "num_vq_embeddings": 64}
    folder = tmp_path_factory.mktemp("vq")
    return _stage(method, folder / "fresh", 1), _stage(method, folder / "trained", 60)


def test_the_vq_stage_learns_to_reconstruct_and_scales_its_latents_to_unit_variance(trained_vq):
    images = load_images("digits", 8, 3, True, True)[:256]
    errors = {}
    for name, source in zip(("fresh", "trained"), trained_vq):
        vqvae = load_pipeline(source).pipeline.vqvae
        with torch.no_grad():
            latents = vqvae.encode(images).latents
            errors[name] = (vqvae.decode(latents).sample - images).abs().mean().item()
        torch.testing.assert_close(vqvae.config.scaling_factor, 1 / latents.std().item(), rtol=0.05, atol=0)
    assert errors["trained"] < 0.5 * errors["fresh"], errors


def test_denoise_on_vq_components_trains_an_ldm_teacher_on_its_latents(trained_vq, tmp_path):
    method = {"name": "denoise", "components": trained_vq[1], "channels": 3, "block_out_channels": [16, 32],
              "prediction_type": "epsilon", "beta_schedule": "linear", "clip_sample": False}
    folders = [_stage(method, tmp_path / name, steps) for name, steps in (("fresh", 1), ("trained", 80))]
    latents = load_pipeline(folders[1]).denoiser.encode(load_images("digits", 8, 3, True, True)[:256]).detach()
    generator = torch.Generator().manual_seed(1)
    t = torch.randint(0, 1000, (len(latents),), generator=generator)
    eps = torch.randn(latents.shape, generator=generator)
    losses = []
    for folder in folders:
        teacher = load_pipeline(folder)
        assert isinstance(teacher.pipeline, LDMPipeline) and teacher.latent_shape == (3, 4, 4)
        alpha, sigma = teacher.denoiser.alpha_sigma(t)
        z = alpha.view(-1, 1, 1, 1) * latents + sigma.view(-1, 1, 1, 1) * eps
        with torch.no_grad():
            losses.append((teacher.unet(z, t).sample - eps).pow(2).mean().item())
    assert losses[1] < 0.7 * losses[0], losses


def test_denoise_components_must_be_an_ldm_pipeline_and_latents_are_not_clipped(tiny_sd, tmp_path):
    with pytest.raises(DiffkdError, match="LDMPipeline the vq method exports"):
        _stage({"name": "denoise", "components": tiny_sd, "clip_sample": False}, tmp_path / "sd", 1)
    with pytest.raises(DiffkdError, match="not a pipeline folder"):
        _stage({"name": "denoise", "components": str(tmp_path / "absent"), "clip_sample": False}, tmp_path / "x", 1)
    for wrong, message in (({"clip_sample": True}, "latents are not"), ({"prediction_type": "flow"}, "VP")):
        with pytest.raises(DiffkdError, match=message):
            parse_config({"method": {"name": "denoise", "components": "x", "clip_sample": False, **wrong}})
