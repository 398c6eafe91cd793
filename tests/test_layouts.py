"""Layout adapters: each family's teacher, called through its layout with prompts encoded by its pipeline's own
``encode_prompt``, samples exactly what its own pipeline class samples; the student of each family is distilled a
few steps on CPU and its export loads and samples in that pipeline class."""

import json
from pathlib import Path

import pytest
import torch
from diffusers import (
    DiffusionPipeline,
    FlowMatchLCMScheduler,
    FluxPipeline,
    LCMScheduler,
    PixArtSigmaPipeline,
    SanaPipeline,
    StableDiffusion3Pipeline,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
)

from diffkd.api import distill
from diffkd.conditioning import batch_conditioning, encode_captions
from diffkd.config import parse_config
from diffkd.errors import DiffkdError
from diffkd.io import load_pipeline
from diffkd.layouts import Layout
from diffkd.layouts.flux import FluxLayout
from diffkd.layouts.sana import SanaLayout
from diffkd.layouts.sd3 import SD3Layout
from diffkd.layouts.sdxl import SDXLLayout
from diffkd.lora import LORA_FILE
from diffkd.methods.consistency import consistency_function
from diffkd.paths import FlowPath
from diffkd.sampling import ddim_sample
from tests import faults

PROMPTS = ["a cat", "a red dog", "a cat"]
PIPELINE_CLASSES = {"tiny_sd": StableDiffusionPipeline, "tiny_sdxl": StableDiffusionXLPipeline, "tiny_sd3": StableDiffusion3Pipeline,
                    "tiny_flux": FluxPipeline, "tiny_sana": SanaPipeline, "tiny_pixart": PixArtSigmaPipeline}
LAYOUTS = list(PIPELINE_CLASSES)
LORA_LAYOUTS = [name for name in LAYOUTS if hasattr(PIPELINE_CLASSES[name], "load_lora_weights")]  # not PixArt
SIZE = 8  # pixels (4x4 latents); Flux's default would be 1024


def _pixels(source) -> int:
    """The tiny pipeline's side in pixels: SANA's 8x autoencoder gives 4x4 latents at 32 px, the least it takes."""
    return 32 if json.loads((Path(source) / "model_index.json").read_text())["_class_name"] == "SanaPipeline" else SIZE


def _pipeline_latents(pipe, noise: torch.Tensor, k: int, guidance_scale: float) -> torch.Tensor:
    """The pipeline's own k-step latents from ``noise`` (packed in and unpacked out for Flux, as Flux takes them)."""
    flux = isinstance(pipe, FluxPipeline)
    latents = FluxPipeline._pack_latents(noise, *noise.shape) if flux else noise
    binned = isinstance(pipe, (SanaPipeline, PixArtSigmaPipeline))
    extra = {"use_resolution_binning": False} if binned else {}  # the tiny sizes are in no aspect-ratio bin
    side = noise.shape[-1] * pipe.vae_scale_factor
    out = pipe(PROMPTS[:len(noise)], num_inference_steps=k, guidance_scale=guidance_scale, latents=latents,
               height=side, width=side, output_type="latent", **extra).images
    return FluxPipeline._unpack_latents(out, side, side, pipe.vae_scale_factor) if flux else out


def _load(source: str):
    return load_pipeline(source, image_size=_pixels(source))


def test_each_pipeline_gets_its_layout(tiny_sd, tiny_sdxl, tiny_sd3, tiny_flux):
    assert type(load_pipeline(tiny_sd).layout) is Layout
    sdxl, sd3, flux = load_pipeline(tiny_sdxl), load_pipeline(tiny_sd3), load_pipeline(tiny_flux, image_size=SIZE)
    assert isinstance(sdxl.layout, SDXLLayout) and sdxl.component == "unet"
    assert isinstance(sd3.layout, SD3Layout) and sd3.component == "transformer" and sd3.unet is sd3.pipeline.transformer
    assert sd3.pipeline.text_encoder_3 is None  # saved without T5, loaded as a user loads it
    assert sd3.latent_shape == sdxl.latent_shape == (4, 4, 4) and sd3.image_size == 8
    assert isinstance(flux.layout, FluxLayout) and flux.latent_shape == (4, 4, 4)  # unpacked; 16 channels packed
    assert load_pipeline(tiny_flux).latent_shape == (4, 128, 128)  # FluxPipeline's default, 1024 px at 8x


def test_sana_reads_as_rectified_flow_through_its_dpm_solver_on_flow_sigmas(tiny_sana):
    """SANA ships DPMSolverMultistepScheduler(use_flow_sigmas, flow_prediction, flow_shift=3): that scheduler also
    carries VP alphas_cumprod, which must not be taken for its path; its shift is flow_shift."""
    sana = _load(tiny_sana)
    assert isinstance(sana.layout, SanaLayout) and sana.component == "transformer"
    assert type(sana.scheduler).__name__ == "DPMSolverMultistepScheduler"
    assert isinstance(sana.denoiser.path, FlowPath) and sana.denoiser.path.shift == 3.0
    assert sana.denoiser.prediction_type == "flow" and sana.latent_shape == (4, 4, 4)


@pytest.mark.parametrize("name", LAYOUTS)
def test_the_teacher_through_its_layout_samples_what_its_pipeline_samples(name, request):
    """Guided k-step sampling by the Denoiser on rows the layout encoded equals the pipeline's own call (its
    encode_prompt, added time ids / pooled projections, CFG; Flux's packing, ids and embedded guidance) from the same
    noise, and the guidance scale changes it."""
    teacher = _load(request.getfixturevalue(name))
    cond = batch_conditioning(encode_captions(teacher, PROMPTS), 3.0)
    noise = torch.randn(len(PROMPTS), *teacher.latent_shape, generator=torch.Generator().manual_seed(0))
    ours = ddim_sample(teacher.denoiser, noise, 2, cond)
    pipe = teacher.pipeline
    pipe.scheduler = teacher.denoiser.path.multistep_scheduler(pipe.scheduler, 2, teacher.denoiser.prediction_type,
                                                              None)
    theirs = _pipeline_latents(pipe, noise, 2, 3.0)
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=1e-5)
    unguided = ddim_sample(teacher.denoiser, noise, 2, batch_conditioning(encode_captions(teacher, PROMPTS), 1.0))
    assert not torch.allclose(theirs, unguided, atol=1e-3)


def _run(teacher: str, method: dict, folder, learning_rate: float = 1e-4, **student) -> DiffusionPipeline:
    config = parse_config({"method": method, "teacher": {"source": teacher, "image_size": _pixels(teacher)},
                           "student": student,
                           "data": {"source": "digits", "convert": True, "resize": True, "prompts": PROMPTS[:2]},
                           "train": {"batch_size": 2, "device": "cpu", "learning_rate": learning_rate}, "run_eval": False})
    return distill(config, folder)


@pytest.mark.slow
@pytest.mark.parametrize("name", LAYOUTS)
def test_consistency_student_loads_in_its_pipeline_class_and_samples_at_any_k(name, request, tmp_path):
    source = request.getfixturevalue(name)
    folder = _run(source, {"name": "consistency", "num_steps": 2, "teacher_grid": 20, "guidance_scale": 3.0},
                  tmp_path / "run")
    pipe = PIPELINE_CLASSES[name].from_pretrained(folder, **({"text_encoder_3": None, "tokenizer_3": None}
                                                             if name == "tiny_sd3" else {}))
    student = _load(str(folder))
    assert student.component == load_pipeline(source).component
    assert isinstance(pipe.scheduler, LCMScheduler) == (name in ("tiny_sd", "tiny_sdxl", "tiny_pixart"))  # VP; else flow LCM
    noise = torch.randn(2, *student.latent_shape, generator=torch.Generator().manual_seed(0))
    w = 3.0 if name == "tiny_flux" else 1.0  # Flux's student keeps its guidance input; a CFG student has w in it
    cond = batch_conditioning(encode_captions(student, PROMPTS[:2]), w).unguided()
    top = student.denoiser.path.consistency_grid(20)[-1]  # where the exported scheduler starts at k = 1
    with torch.no_grad():
        ours = consistency_function(student.denoiser, noise, torch.full((2,), top), cond, 10.0)
    torch.testing.assert_close(_pipeline_latents(pipe, noise, 1, w), ours, atol=1e-5, rtol=1e-4)
    extra = {"use_resolution_binning": False} if name in ("tiny_sana", "tiny_pixart") else {}
    side = _pixels(folder)
    images = pipe(PROMPTS[:2], num_inference_steps=4, guidance_scale=w, height=side, width=side, output_type="np",
                  **extra).images
    assert images.shape == (2, side, side, 3)
    if isinstance(pipe.scheduler, FlowMatchLCMScheduler):  # FluxPipeline passes sigmas; the others do not
        expected = student.denoiser.path.consistency_scheduler(None, 20, "flow", None, 10.0)
        expected.set_timesteps(4)
        torch.testing.assert_close(pipe.scheduler.sigmas, expected.sigmas)


MULTISTEP_METHODS = {
    "dmd": {"name": "dmd", "num_steps": 2, "student_steps": 2, "fake_updates": 1, "guidance_scale": 3.0},
    "progressive": {"name": "progressive", "start_steps": 4, "final_steps": 2, "steps_per_round": 1,
                    "guidance_scale": 3.0},
    "generator": {"name": "generator", "num_steps": 2, "student_steps": 2, "num_samples": 4, "teacher_steps": 4,
                  "cache_batch_size": 4, "guidance_scale": 3.0}}


@pytest.mark.slow
@pytest.mark.parametrize("method", MULTISTEP_METHODS)
@pytest.mark.parametrize("name", LAYOUTS)
def test_multistep_students_load_in_their_pipeline_class_and_sample_their_grid(name, method, request, tmp_path):
    """DMD2's generator, progressive (4 -> 2, guided teacher) and the generator method (teacher-sample pairs) on each
    layout: the export loads in the layout's pipeline class, whose 2-step sample is the training-time sampler's, and
    its network has moved off the teacher's."""
    source = request.getfixturevalue(name)
    folder = _run(source, MULTISTEP_METHODS[method], tmp_path / "run")
    pipe = PIPELINE_CLASSES[name].from_pretrained(folder, **({"text_encoder_3": None, "tokenizer_3": None}
                                                             if name == "tiny_sd3" else {}))
    student = _load(str(folder))
    noise = torch.randn(2, *student.latent_shape, generator=torch.Generator().manual_seed(0))
    w = 3.0 if name == "tiny_flux" else 1.0
    ours = ddim_sample(student.denoiser, noise, 2, batch_conditioning(encode_captions(student, PROMPTS[:2]), w))
    torch.testing.assert_close(_pipeline_latents(pipe, noise, 2, w), ours, atol=1e-5, rtol=1e-4)
    teacher = _load(source)
    assert any(not torch.equal(a, b) for a, b in zip(student.unet.state_dict().values(),
                                                       teacher.unet.state_dict().values()))


def _refused(source: str, folder, method: dict | None = None, **student) -> str:
    with pytest.raises(DiffkdError) as error:
        _run(source, method or {"name": "consistency", "num_steps": 1, "teacher_grid": 20}, folder, **student)
    assert not folder.exists()
    return str(error.value)


def test_a_pipeline_of_no_known_layout_is_refused_in_one_line(tmp_path):
    from tests.tiny_layouts import make_tiny_dit_pipeline

    message = _refused(make_tiny_dit_pipeline(tmp_path / "dit"), tmp_path / "run")
    assert message.startswith(f"{str(tmp_path / 'dit')!r} is a DiTPipeline, which diffkd cannot take (its network "
                              "is a DiTTransformer2DModel)") and "\n" not in message


def test_a_lora_student_of_pixart_is_refused_since_its_pipeline_cannot_load_adapters(tiny_pixart, tmp_path):
    assert "needs a pipeline that loads LoRA weights" in _refused(tiny_pixart, tmp_path / "run", lora={"rank": 2})


def test_a_lora_target_absent_from_the_layout_is_named(tiny_sd3, tmp_path):
    message = _refused(tiny_sd3, tmp_path / "run", lora={"target_modules": ["to_q", "conv1"]})
    assert message.startswith("student.lora.target_modules ['conv1'] match no layer of the teacher's transformer")


def test_cfg_settings_on_flux_are_refused(tiny_flux, tmp_path):
    """Flux's guidance is an embedded input: a CFG w range has nothing to act on, and schnell takes w = 1 only."""
    ranged = {"name": "consistency", "num_steps": 1, "teacher_grid": 20, "guidance": {"w_min": 2, "w_max": 6}}
    assert "Flux has no CFG" in _refused(tiny_flux, tmp_path / "run", ranged)
    from tests.tiny_layouts import make_tiny_flux_pipeline

    schnell = make_tiny_flux_pipeline(tmp_path / "schnell", guidance_embeds=False)
    fixed = {"name": "dmd", "num_steps": 1, "student_steps": 1, "guidance_scale": 3.5}
    assert "has no guidance input" in _refused(schnell, tmp_path / "run", fixed)


LORA_METHODS = {"consistency": {"name": "consistency", "num_steps": 2, "teacher_grid": 20},
                "dmd": {"name": "dmd", "num_steps": 2, "student_steps": 1, "fake_updates": 1}}


@pytest.mark.slow
@pytest.mark.parametrize("method", LORA_METHODS)
@pytest.mark.parametrize("name", LORA_LAYOUTS)
def test_lora_student_loads_onto_the_teacher_and_fuses_to_the_fused_export(name, method, request, tmp_path):
    """LCM-LoRA (and a DMD2 LoRA generator) on each layout, its default targets: the adapter folder on the teacher's
    own pipeline (load_lora_weights + the exported scheduler) samples what the fused export samples, before and after
    fuse_lora; the adapters trained, and their file's bytes are on the model card."""
    source = request.getfixturevalue(name)
    folder = _run(source, LORA_METHODS[method], tmp_path / "run",
                  learning_rate=1e-2, lora={"rank": 2, "alpha": 4, "fuse": True})
    card = (folder / "README.md").read_text()
    assert f"lora_file_bytes: {(folder / LORA_FILE).stat().st_size}" in card
    extra = {"text_encoder_3": None, "tokenizer_3": None} if name == "tiny_sd3" else {}
    pipeline_class = PIPELINE_CLASSES[name]
    fused = pipeline_class.from_pretrained(folder.with_name("student-fused"), **extra)
    pipe = pipeline_class.from_pretrained(source, **extra)
    pipe.load_lora_weights(folder)
    pipe.scheduler = type(fused.scheduler).from_pretrained(folder, subfolder="scheduler")
    noise = torch.randn(2, *_load(source).latent_shape, generator=torch.Generator().manual_seed(0))
    expected = _pipeline_latents(fused, noise, 1, 1.0)  # one step: no fresh noise
    torch.testing.assert_close(_pipeline_latents(pipe, noise, 1, 1.0), expected, atol=1e-4, rtol=1e-4)
    pipe.fuse_lora()
    torch.testing.assert_close(_pipeline_latents(pipe, noise, 1, 1.0), expected, atol=1e-4, rtol=1e-4)
    teacher = pipeline_class.from_pretrained(source, **extra)
    teacher.scheduler = pipe.scheduler
    assert not torch.allclose(_pipeline_latents(teacher, noise, 1, 1.0), expected, atol=1e-4)


@pytest.mark.slow
def test_killed_consistency_run_on_a_flux_teacher_resumes_bit_identical(tiny_flux, tmp_path):
    """A transformer student with packed latents and an embedded guidance: killed after a backward pass, resumed,
    its exported transformer is bit-identical to an uninterrupted run's."""
    config = faults.consistency_config(tiny_flux)
    config = {**config, "teacher": {"source": tiny_flux, "image_size": SIZE},
              "method": {**config["method"], "guidance_scale": 3.5},
              "data": {"source": "digits", "convert": True, "resize": True, "prompts": PROMPTS[:2]},
              "train": {**config["train"], "batch_size": 2}}
    path = faults.write_yaml(config, tmp_path / "consistency.yaml")
    reference = faults.reference_run("consistency", path, tmp_path)
    assert reference.parent.name == "transformer"
    point = next(p for p in faults.KILL_POINTS if p.method == "consistency" and "after backward" in p.name)
    result = faults.kill_and_resume(point, path, reference, tmp_path / "killed")
    assert result.killed and result.identical, result.detail


def test_the_evaluation_after_training_is_refused_before_any_work_where_it_cannot_sample(tiny_sd3, tmp_path):
    config = parse_config({"method": {"name": "consistency", "num_steps": 1, "teacher_grid": 20},
                           "teacher": {"source": tiny_sd3}, "data": {"prompts": ["a cat"]}})
    with pytest.raises(DiffkdError, match=r"^the evaluation after training does not sample StableDiffusion3Pipeline"):
        distill(config, tmp_path / "run")
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_a_guidance_embedded_sdxl_student_samples_at_any_w_in_one_pass_a_step(tiny_sdxl, tmp_path):
    """LCM's w-conditioning on SDXL: the student's conditioning keeps SDXL's added inputs beside the w embedding, and
    StableDiffusionXLPipeline feeds it the same (one UNet pass per step, no CFG)."""
    folder = _run(tiny_sdxl, {"name": "consistency", "num_steps": 2, "teacher_grid": 20,
                              "guidance": {"w_min": 2.0, "w_max": 6.0}}, tmp_path / "run")
    pipe = StableDiffusionXLPipeline.from_pretrained(folder)
    assert pipe.unet.config.time_cond_proj_dim is not None
    noise = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(0))
    calls = []
    pipe.unet.register_forward_pre_hook(lambda module, args: calls.append(args[0].shape[0]))
    at_2, at_6 = _pipeline_latents(pipe, noise, 1, 2.0), _pipeline_latents(pipe, noise, 1, 6.0)
    assert calls == [2, 2] and not torch.allclose(at_2, at_6)
