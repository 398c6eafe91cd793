"""A latent, text-conditioned teacher (Stable-Diffusion-shaped) goes through the same progressive method:
prompts are encoded by the pipeline, images through its VAE, and guidance is distilled into the student."""

import pytest
import torch
import yaml
from diffusers import DiffusionPipeline, StableDiffusionPipeline

from diffkd.api import distill
from diffkd.conditioning import batch_conditioning, encode_rows, read_prompts
from diffkd.config import parse_config
from diffkd.errors import DiffkdError
from diffkd.io import load_pipeline


def test_prompts_are_the_inline_ones_then_the_file_lines(tmp_path):
    file = tmp_path / "prompts.txt"
    file.write_text("a dog\n\n  a bird  \n")
    assert read_prompts(["a cat"], str(file)) == ["a cat", "a dog", "a bird"]
    assert read_prompts(["a cat"], None) == ["a cat"]
    with pytest.raises(DiffkdError, match="^--prompts-file '.*missing.txt' not found: give a text file"):
        read_prompts([], str(tmp_path / "missing.txt"), "--prompts-file")


def test_prompts_are_encoded_with_an_unconditional_branch(tiny_sd):
    teacher = load_pipeline(tiny_sd)
    rows = encode_rows(teacher, ["a cat", "a dog"], 5)
    assert rows["encoder_hidden_states"].shape == (5, 8, 16)
    torch.testing.assert_close(rows["encoder_hidden_states"][0], rows["encoder_hidden_states"][2])
    assert not torch.allclose(rows["encoder_hidden_states"][0], rows["encoder_hidden_states"][1])
    assert not torch.allclose(rows["uncond_encoder_hidden_states"][0], rows["encoder_hidden_states"][0])
    guided = batch_conditioning(rows, guidance_scale=3.0)
    assert guided.guided and not guided.unguided().guided


def test_guided_teacher_output_is_the_cfg_combination(tiny_sd):
    teacher = load_pipeline(tiny_sd)
    cond = batch_conditioning(encode_rows(teacher, ["a cat"], 2), guidance_scale=4.0)
    z, t = torch.randn(2, 4, 4, 4), torch.tensor(500)
    with torch.no_grad():
        guided = teacher.denoiser.output(z, t, cond)
        conditional = teacher.denoiser.output(z, t, cond.unguided())
        uncond = teacher.unet(z, t.expand(2), encoder_hidden_states=cond.uncond_encoder_hidden_states).sample
    torch.testing.assert_close(guided, uncond + 4.0 * (conditional - uncond), atol=1e-5, rtol=1e-4)


def test_progressive_guidance_distillation_of_a_latent_text_teacher(tiny_sd, tmp_path):
    config = parse_config({
        "method": {"name": "progressive", "start_steps": 4, "final_steps": 2, "steps_per_round": 3,
                   "guidance_scale": 3.0},
        "teacher": {"source": tiny_sd},
        "data": {"source": "digits", "convert": True, "prompts": ["a cat", "a dog"]},
        "train": {"batch_size": 4, "device": "cpu"},
        "run_eval": False,
    })
    folder = distill(config, tmp_path / "run")
    pipe = DiffusionPipeline.from_pretrained(folder)
    assert isinstance(pipe, StableDiffusionPipeline)
    assert pipe.scheduler.config.prediction_type == "v_prediction"
    images = pipe("a cat", num_inference_steps=2, guidance_scale=1.0, height=8, width=8, output_type="np").images
    assert images.shape == (1, 8, 8, 3)
    front = yaml.safe_load((folder / "README.md").read_text().split("---")[1])
    assert front["guidance_scale"] == 3.0 and front["num_inference_steps"] == 2


def test_fixed_w_halvings_do_not_guide_a_student_that_has_w_baked_in(tiny_sd):
    """Round 1 takes the teacher's two guided passes a step; a later round's teacher is the previous student, which
    already gives the guided output in one conditional pass: guiding it again would compound w (3, 9, 27, ...)."""
    from diffkd.api import prepare

    config = parse_config({"method": {"name": "progressive", "start_steps": 8, "final_steps": 2,
                                      "guidance_scale": 3.0},
                           "teacher": {"source": tiny_sd}, "data": {"prompts": ["a cat"]}, "run_eval": False})
    _, method, _ = prepare(config)
    batch = {"x0": torch.randn(3, 4, 4, 4), "encoder_hidden_states": torch.randn(3, 8, 16),
             "uncond_encoder_hidden_states": torch.randn(3, 8, 16)}

    def recording(step, seen):
        return lambda z, t, s, cond: seen.append(cond.guided) or step(z, t, s, cond)

    for index, guided in ((0, True), (1, False)):
        method.begin_round(index)
        seen = []
        method.round_teacher.ddim_step = recording(method.round_teacher.ddim_step, seen)
        method.loss("student", batch, torch.Generator().manual_seed(0))
        assert seen == [guided, guided], (index, seen)
