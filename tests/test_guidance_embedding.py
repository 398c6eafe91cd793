"""Guidance-embedded students: w is embedded as StableDiffusionPipeline embeds it, the new input starts at zero (the
student starts as the teacher), the CFG teacher uses each sample's own w, and an exported progressive student runs one
UNet pass per image per step at any guidance scale where the teacher runs two."""

import math
from pathlib import Path

import pytest
import torch
from diffusers import StableDiffusionPipeline, UNet2DConditionModel

from diffkd.api import distill
from diffkd.config import load_config, parse_config
from diffkd.evaluation.guidance_response import response_figures
from diffkd.guidance_embedding import (
    add_guidance_embedding,
    draw_guidance_scales,
    guidance_scale_embedding,
    student_conditioning,
    teacher_conditioning,
)
from diffkd.method_options import GuidanceRange
from diffkd.models import Conditioning, Denoiser


def tiny_text_unet() -> UNet2DConditionModel:
    torch.manual_seed(0)
    return UNet2DConditionModel(sample_size=4, in_channels=4, out_channels=4, block_out_channels=(8, 16),
                                layers_per_block=1, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=16,
                                norm_num_groups=4, attention_head_dim=2)


def test_embedding_by_hand_and_as_the_pipeline_computes_it():
    # d = 4: frequencies 10000^(-k / (d/2 - 1)) = 1, 1e-4; w = 1.0015 -> 1000 (w - 1) = 1.5
    embedding = guidance_scale_embedding(torch.tensor([1.0015]), 4)
    expected = torch.tensor([[math.sin(1.5), math.sin(1.5e-4), math.cos(1.5), math.cos(1.5e-4)]])
    torch.testing.assert_close(embedding, expected, atol=1e-5, rtol=1e-4)
    w = torch.tensor([1.0, 2.5, 7.0])
    pipeline_embedding = StableDiffusionPipeline.get_guidance_scale_embedding(None, w - 1, embedding_dim=32)
    torch.testing.assert_close(guidance_scale_embedding(w, 32), pipeline_embedding)
    assert guidance_scale_embedding(w, 7).shape == (3, 7)


def test_embedded_student_starts_as_the_teacher_and_can_learn_w():
    teacher = tiny_text_unet()
    student = add_guidance_embedding(teacher, 32)
    assert student.config.time_cond_proj_dim == 32 and teacher.config.time_cond_proj_dim is None
    assert student.time_embedding.cond_proj.weight.abs().sum() == 0
    z, t, hidden = torch.randn(2, 4, 4, 4), torch.tensor([100, 700]), torch.randn(2, 8, 16)
    cond = guidance_scale_embedding(torch.tensor([2.0, 8.0]), 32)
    with torch.no_grad():
        before = teacher(z, t, encoder_hidden_states=hidden).sample
        torch.testing.assert_close(student(z, t, encoder_hidden_states=hidden, timestep_cond=cond).sample, before)
        student.time_embedding.cond_proj.weight.normal_()
        after = student(z, t, encoder_hidden_states=hidden, timestep_cond=cond).sample
    assert not torch.allclose(after, before, atol=1e-4)
    assert add_guidance_embedding(student, 32) is student


def test_cfg_teacher_takes_each_samples_own_w():
    unet = tiny_text_unet()
    denoiser = Denoiser(unet, torch.linspace(0.999, 0.01, 1000), "epsilon")
    hidden, empty = torch.randn(2, 8, 16), torch.randn(2, 8, 16)
    plain = Conditioning(encoder_hidden_states=hidden, uncond_encoder_hidden_states=empty)
    z, t, w = torch.randn(2, 4, 4, 4), torch.tensor([300, 300]), torch.tensor([2.0, 6.0])
    with torch.no_grad():
        guided = denoiser.output(z, t, teacher_conditioning(plain, w))
        conditional = unet(z, t, encoder_hidden_states=hidden).sample
        uncond = unet(z, t, encoder_hidden_states=empty).sample
    for i in range(2):
        torch.testing.assert_close(guided[i], uncond[i] + w[i] * (conditional[i] - uncond[i]), atol=1e-5, rtol=1e-4)
    student = student_conditioning(plain, w, 16)
    assert not student.guided and student.uncond_encoder_hidden_states is None
    torch.testing.assert_close(student.timestep_cond, guidance_scale_embedding(w, 16))


def test_w_is_drawn_uniformly_in_the_range_from_the_generator():
    guidance = GuidanceRange(w_min=2.0, w_max=6.0)
    w = draw_guidance_scales(4000, guidance, torch.Generator().manual_seed(3))
    assert 2.0 <= w.min() and w.max() <= 6.0 and abs(w.mean().item() - 4.0) < 0.1
    torch.testing.assert_close(w, draw_guidance_scales(4000, guidance, torch.Generator().manual_seed(3)))


def count_passes(unet: torch.nn.Module) -> tuple[list[int], list]:
    """Per forward call: the batch size, and the timestep_cond it was given."""
    sizes, conds = [], []

    def hook(module, args, kwargs):
        sizes.append((args[0] if args else kwargs["sample"]).shape[0])
        conds.append(kwargs.get("timestep_cond"))
    unet.register_forward_pre_hook(hook, with_kwargs=True)
    return sizes, conds


RECIPES = Path(__file__).resolve().parents[1] / "configs"
TINY_TEXT_RUN = ["data.source=digits", "data.convert=true", "data.prompts=[a cat, a dog]", "train.batch_size=4",
                 "train.learning_rate=1e-2", "train.warmup_steps=0", "train.device=cpu",
                 "method.guidance.embedding_dim=16"]


def assert_one_pass_per_step_at_any_w(folder: Path, teacher_folder: str, steps: int) -> None:
    """The exported student, loaded by StableDiffusionPipeline, runs one UNet pass per image per step told w where
    the teacher with classifier-free guidance runs two."""
    student = StableDiffusionPipeline.from_pretrained(folder)
    teacher = StableDiffusionPipeline.from_pretrained(teacher_folder)
    assert student.unet.config.time_cond_proj_dim == 16
    assert student.unet.time_embedding.cond_proj.weight.abs().sum() > 0  # w reached the student
    options = {"num_inference_steps": steps, "height": 8, "width": 8, "output_type": "np", "num_images_per_prompt": 3}
    for w in (2.0, 4.0):
        sizes, conds = count_passes(student.unet)
        images = student("a cat", guidance_scale=w, **options).images
        assert images.shape == (3, 8, 8, 3)
        assert sum(sizes) / 3 == steps  # one pass per image per step
        torch.testing.assert_close(conds[0], guidance_scale_embedding(torch.full((3,), w), 16))
        teacher_sizes, _ = count_passes(teacher.unet)
        teacher("a cat", guidance_scale=w, **options)
        assert sum(teacher_sizes) / 3 == 2 * steps  # classifier-free guidance: two per step
        student.unet._forward_pre_hooks.clear()
        teacher.unet._forward_pre_hooks.clear()


@pytest.mark.slow
def test_guidance_progressive_student_runs_one_pass_per_step_at_any_w(tiny_sd, tmp_path):
    """The glyphs recipe, on the tiny text teacher: 4 (guidance) -> 2 steps."""
    config = load_config(RECIPES / "glyphs-guidance-progressive.yaml", [
        "method.start_steps=4", "method.final_steps=2", "method.steps_per_round=2", "method.imitation_steps=2",
        f"teacher.source={tiny_sd}", *TINY_TEXT_RUN])
    assert_one_pass_per_step_at_any_w(distill(config, tmp_path / "run"), tiny_sd, 2)


@pytest.mark.slow
def test_guidance_consistency_student_runs_one_pass_per_step_at_any_w(tiny_sd, tmp_path):
    """The glyphs LCM recipe, on the tiny text teacher: a guidance round, then a w-conditioned consistency student
    sampled by its LCMScheduler at 4 steps."""
    config = load_config(RECIPES / "glyphs-guidance-consistency.yaml", [
        "method.guidance_steps=2", "method.num_steps=3", "method.teacher_grid=20", f"teacher.source={tiny_sd}",
        *TINY_TEXT_RUN])
    folder = distill(config, tmp_path / "run")
    assert StableDiffusionPipeline.from_pretrained(folder).scheduler.__class__.__name__ == "LCMScheduler"
    assert_one_pass_per_step_at_any_w(folder, tiny_sd, 4)


def test_consistency_tells_the_teacher_and_both_student_networks_each_samples_w(tiny_sd):
    from diffkd.api import prepare

    config = parse_config({
        "method": {"name": "consistency", "teacher_grid": 20, "target_ema": 0.9,
                   "guidance": {"w_min": 2.0, "w_max": 6.0, "embedding_dim": 16}},
        "teacher": {"source": tiny_sd}, "data": {"prompts": ["a cat"]}, "run_eval": False})
    teacher, method, _ = prepare(config)
    assert method.student.config.time_cond_proj_dim == 16 and method.target.config.time_cond_proj_dim == 16
    assert teacher.unet.config.time_cond_proj_dim is None
    batch = {"x0": torch.randn(3, 4, 4, 4), "encoder_hidden_states": torch.randn(3, 8, 16),
             "uncond_encoder_hidden_states": torch.randn(3, 8, 16)}
    cond, student_cond = method.conditioning(batch, torch.Generator().manual_seed(0))
    w = cond.guidance_scale
    assert w.shape == (3,) and 2 <= w.min() and w.max() <= 6 and cond.guided and not student_cond.guided
    torch.testing.assert_close(student_cond.timestep_cond, guidance_scale_embedding(w, 16))
    assert method.export_spec().card["guidance_range"] == [2.0, 6.0]


def test_consistency_guidance_round_regresses_on_the_cfg_teachers_x_then_restarts_the_target(tiny_sd):
    from diffkd.api import prepare

    config = parse_config({
        "method": {"name": "consistency", "teacher_grid": 20, "target_ema": 0.9, "guidance_steps": 7,
                   "num_steps": 5, "guidance": {"w_min": 2.0, "w_max": 6.0, "embedding_dim": 16}},
        "teacher": {"source": tiny_sd}, "data": {"prompts": ["a cat"]}, "run_eval": False})
    teacher, method, _ = prepare(config)
    assert [(r.name, r.num_steps) for r in method.rounds()] == [("guidance", 7), ("consistency on 20 points, skip 1", 5)]
    torch.manual_seed(1)
    for p in method.student.time_embedding.cond_proj.parameters():  # the student's w input is no longer zero
        p.data.normal_(0, 0.1)
    batch = {"x0": torch.randn(3, 4, 4, 4), "encoder_hidden_states": torch.randn(3, 8, 16),
             "uncond_encoder_hidden_states": torch.randn(3, 8, 16)}
    method.begin_round(0)
    loss = method.loss("student", batch, torch.Generator().manual_seed(5))
    assert set(loss.terms) == {"guidance"}

    draws = torch.Generator().manual_seed(5)
    t = torch.tensor(method.grid[1:])[torch.randint(0, 20, (3,), generator=draws)]
    eps = torch.randn(3, 4, 4, 4, generator=draws)
    w = 2.0 + 4.0 * torch.rand(3, generator=draws)
    alpha_bar = teacher.scheduler.alphas_cumprod[t].view(-1, 1, 1, 1)
    z = alpha_bar.sqrt() * batch["x0"] + (1 - alpha_bar).sqrt() * eps
    with torch.no_grad():
        conditional = teacher.unet(z, t, encoder_hidden_states=batch["encoder_hidden_states"]).sample
        unconditional = teacher.unet(z, t, encoder_hidden_states=batch["uncond_encoder_hidden_states"]).sample
        guided = unconditional + w.view(-1, 1, 1, 1) * (conditional - unconditional)
        own = method.student(z, t, encoder_hidden_states=batch["encoder_hidden_states"],
                             timestep_cond=guidance_scale_embedding(w, 16)).sample
    x_teacher = (z - (1 - alpha_bar).sqrt() * guided) / alpha_bar.sqrt()
    x_student = (z - (1 - alpha_bar).sqrt() * own) / alpha_bar.sqrt()
    torch.testing.assert_close(loss.total, (x_student - x_teacher).pow(2).mean(), rtol=1e-4, atol=1e-6)

    assert not torch.equal(method.target.time_embedding.cond_proj.weight, method.student.time_embedding.cond_proj.weight)
    method.begin_round(1)  # the consistency round's target network starts from the guidance round's student
    for a, b in zip(method.target.parameters(), method.student.parameters(), strict=True):
        assert torch.equal(a, b)
    assert set(method.loss("student", batch, torch.Generator().manual_seed(5)).terms) == {"consistency"}


def test_a_consistency_guidance_round_without_guidance_is_refused():
    with pytest.raises(Exception, match="method.guidance_steps trains a guidance round, which needs a guided teacher"):
        parse_config({"method": {"name": "consistency", "guidance_steps": 100}})


def test_guidance_round_learns_the_cfg_teacher_then_halvings_the_w_conditioned_student(tiny_sd):
    from diffkd.api import prepare

    config = parse_config({
        "method": {"name": "progressive", "start_steps": 8, "final_steps": 2, "steps_per_round": 5,
                   "guidance": {"w_min": 2.0, "w_max": 6.0, "embedding_dim": 16}, "student_prediction_type": "teacher"},
        "teacher": {"source": tiny_sd}, "data": {"prompts": ["a cat"]}, "run_eval": False})
    teacher, method, _ = prepare(config)
    assert [(r.name, r.num_steps) for r in method.rounds()] == [("8 (guidance)", 5), ("8->4", 5), ("4->2", 5)]
    assert teacher.denoiser.prediction_type == "epsilon" and method.prediction_type == "epsilon"
    assert not method.uses_z_space()  # target_space auto: the guidance round regresses in x space, though eps
    assert method.student.config.time_cond_proj_dim == 16 and teacher.unet.config.time_cond_proj_dim is None
    assert method.round_teacher is teacher.denoiser
    batch = {"x0": torch.randn(3, 4, 4, 4), "encoder_hidden_states": torch.randn(3, 8, 16),
             "uncond_encoder_hidden_states": torch.randn(3, 8, 16)}
    cond, student_cond = method.conditioning(batch, torch.Generator().manual_seed(0))
    w = cond.guidance_scale
    assert w.shape == (3,) and cond.guided and not student_cond.guided
    torch.testing.assert_close(student_cond.timestep_cond, guidance_scale_embedding(w, 16))
    method.begin_round(1)
    assert method.round_teacher is not teacher.denoiser  # the first halving distils the guidance round's student
    assert method.round_teacher.unet.config.time_cond_proj_dim == 16
    assert method.uses_z_space()  # a halving taught by an eps network lands in z space


def test_evaluation_runs_an_embedded_student_once_per_step_told_w(tiny_sd):
    from diffkd.evaluation.sweep import OWN, Model, Prompts, Setting, with_guidance
    from diffkd.io import load_pipeline

    pipe = load_pipeline(tiny_sd)
    teacher = Model("teacher", tiny_sd, pipe, {}, student=False)
    embedded = load_pipeline(tiny_sd)
    embedded.pipeline.unet = add_guidance_embedding(embedded.unet, 16)
    student = Model("student", tiny_sd, embedded, {"guidance_range": [2.0, 6.0]}, student=True)
    prompts = Prompts(["a cat", "a dog"], guidance_scale=4.0)
    assert with_guidance(prompts.condition(teacher, 0, 3), Setting(teacher, "ddim", 2, guidance=4.0)).guided
    cond = with_guidance(prompts.condition(student, 0, 3), Setting(student, OWN, 2, guidance=3.0))
    assert not cond.guided  # one pass per step, told the setting's w
    torch.testing.assert_close(cond.timestep_cond, guidance_scale_embedding(torch.full((3,), 3.0), 16))


def test_guidance_response_figures_by_hand():
    """Teacher latents move by dT = (3, 4) between w = 2 and 6 (|dT| = 5); a student that moves by (0, 2.5) has
    response 0.5 and alignment cos = 10 / (2.5 * 5) = 0.8; a student that ignores w has response 0."""
    teacher = {2.0: torch.tensor([[0.0, 0.0]]), 6.0: torch.tensor([[3.0, 4.0]])}
    student = {2.0: torch.tensor([[1.0, 0.0]]), 6.0: torch.tensor([[1.0, 2.5]])}
    figures = response_figures(student, teacher)
    assert figures["response"] == pytest.approx(0.5)
    assert figures["alignment"] == pytest.approx(0.8)
    assert figures["error@2"] == pytest.approx(1 / 5)  # |(1, 0)| / 5
    assert figures["error@6"] == pytest.approx(((2 ** 2 + 1.5 ** 2) ** 0.5) / 5)
    frozen = response_figures({2.0: student[2.0], 6.0: student[2.0]}, teacher)
    assert frozen["response"] == 0
