"""LoRA students: only the adapters train, and the exported folder loads onto the teacher's pipeline with diffusers'
own ``load_lora_weights`` to give exactly the student that was trained."""

import pytest
import torch
import yaml
from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel

from diffkd import checkpoint
from diffkd.api import distill
from diffkd.config import LoraOptions, parse_config
from diffkd.errors import DiffkdError
from diffkd.io import load_pipeline
from diffkd.lora import LORA_FILE, adapter_state_dict, lora_student
from diffkd.trainer import trainable

ATTENTION = ["to_q", "to_k", "to_v", "to_out.0"]


def lora_config(teacher: str, **lora) -> dict:
    return {"method": {"name": "progressive", "start_steps": 4, "final_steps": 2, "steps_per_round": 3,
                       "guidance_scale": 3.0},
            "teacher": {"source": teacher},
            "student": {"lora": {"rank": 4, "alpha": 8, "target_modules": ATTENTION, **lora}},
            "data": {"source": "digits", "convert": True, "prompts": ["a cat", "a dog"]},
            "train": {"batch_size": 4, "learning_rate": 1e-2, "device": "cpu"},
            "run_eval": False}


def test_only_the_adapters_train_and_the_student_starts_as_the_teacher(tiny_sd):
    teacher = load_pipeline(tiny_sd)
    student = lora_student(teacher.unet, LoraOptions(rank=4, alpha=8, target_modules=ATTENTION))
    trained = {n: p for n, p in student.named_parameters() if p.requires_grad}
    assert trained and all(".lora_A." in n or ".lora_B." in n for n in trained)
    assert {id(p) for p in trained.values()} == {id(p) for p in trainable(student)}
    # 4 transformer blocks (1 down, 1 mid, 2 up) x 2 attentions (self, cross) x 4 projections, each A and B
    assert len(trained) == 4 * 2 * 4 * 2
    z, t, hidden = torch.randn(2, 4, 4, 4), torch.tensor([100, 700]), torch.randn(2, 8, 16)
    with torch.no_grad():
        torch.testing.assert_close(student(z, t, encoder_hidden_states=hidden).sample,
                                   teacher.unet(z, t, encoder_hidden_states=hidden).sample)
    assert not any(".lora" in name for name in teacher.unet.state_dict())  # the teacher itself is untouched


def test_targets_that_match_nothing_are_named(tiny_sd):
    teacher = load_pipeline(tiny_sd)
    with pytest.raises(DiffkdError, match=r"^student.lora.target_modules \['to_qq'\] match no layer"):
        lora_student(teacher.unet, LoraOptions(target_modules=["to_q", "to_qq"]))


@pytest.mark.slow
def test_exported_adapters_on_the_teacher_pipeline_are_the_trained_student(tiny_sd, tmp_path):
    folder = distill(parse_config(lora_config(tiny_sd, fuse=True)), tmp_path / "run")
    assert (folder / LORA_FILE).is_file() and (folder / "scheduler" / "scheduler_config.json").is_file()

    # the trained student, rebuilt independently from the run's last checkpoint (weights as trained, adapters too)
    teacher = load_pipeline(tiny_sd)
    student = lora_student(teacher.unet, LoraOptions(rank=4, alpha=8, target_modules=ATTENTION))
    tensors, _ = checkpoint.load(checkpoint.latest(tmp_path / "run" / "checkpoints"))
    checkpoint.load_network_state(student, tensors["student"])  # the adapters; the base is the teacher's
    assert any(v.abs().sum() > 0 for k, v in adapter_state_dict(student).items() if "lora_B" in k)  # it trained

    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd)
    pipe.load_lora_weights(folder)
    pipe.scheduler = DDIMScheduler.from_pretrained(folder, subfolder="scheduler")
    fused = UNet2DConditionModel.from_pretrained(folder.with_name("student-fused"), subfolder="unet")
    z, t, hidden = torch.randn(2, 4, 4, 4), torch.tensor([100, 700]), torch.randn(2, 8, 16)
    with torch.no_grad():
        expected = student(z, t, encoder_hidden_states=hidden).sample
        torch.testing.assert_close(pipe.unet(z, t, encoder_hidden_states=hidden).sample, expected)
        torch.testing.assert_close(fused(z, t, encoder_hidden_states=hidden).sample, expected, atol=1e-5, rtol=1e-4)
        assert not torch.allclose(teacher.unet(z, t, encoder_hidden_states=hidden).sample, expected, atol=1e-4)
    assert pipe.scheduler.config.prediction_type == "v_prediction"
    assert pipe.scheduler.config.timestep_spacing == "trailing"
    images = pipe("a cat", num_inference_steps=2, guidance_scale=1.0, height=8, width=8, output_type="np").images
    assert images.shape == (1, 8, 8, 3)

    card = (folder / "README.md").read_text()
    front = yaml.safe_load(card.split("---")[1])
    assert front["student_architecture"]["lora"]["rank"] == 4 and front["num_inference_steps"] == 2
    assert f"pipe.load_lora_weights({str(folder)!r})" in card
    assert 'DDIMScheduler.from_pretrained' in card and "num_inference_steps=2" in card


def test_adapter_file_is_a_small_share_of_an_sd15_shaped_unet():
    """Rank 16 on the LCM-LoRA layers of SD-1.5's UNet (built from its config on the meta device: no weights, no
    download) holds ~2% of the UNet's parameters, within the 10% a shared adapter should be."""
    unet_config = {"sample_size": 64, "cross_attention_dim": 768, "attention_head_dim": 8,
                   "block_out_channels": (320, 640, 1280, 1280), "layers_per_block": 2}
    with torch.device("meta"):
        unet = UNet2DConditionModel(**unet_config)
        student = lora_student(unet, LoraOptions(rank=16))
    base = sum(p.numel() for p in unet.parameters())
    adapters = sum(p.numel() for p in trainable(student))
    ratio = adapters / base
    assert base > 850_000_000  # SD-1.5's UNet: 859.5 M parameters
    assert 0.005 < ratio < 0.10, ratio


@pytest.mark.slow
def test_killed_lora_run_resumes_bit_identical(tmp_path):
    """Killed after backward in round 2 (its frozen teacher and the adapters' EMA restored from the checkpoint)."""
    from tests import faults
    from tests.conftest import make_tiny_sd_pipeline

    teacher = make_tiny_sd_pipeline(tmp_path / "teacher")
    config = faults.write_yaml(faults.lora_config(teacher), tmp_path / "lora.yaml")
    distill(parse_config(faults.lora_config(teacher)), tmp_path / "reference")  # in process: one start-up less
    reference = faults.exported_weights(tmp_path / "reference", "lora")
    newest = checkpoint.latest(tmp_path / "reference" / "checkpoints")
    assert newest.name == "ckpt-r02-s00000000"  # after round 2: the student's adapters, not a UNet copy
    tensors, _ = checkpoint.load(newest)
    assert tensors["student"] and all(".lora_A." in k or ".lora_B." in k for k in tensors["student"])
    point = faults.KillPoint("LoRA: after backward, round 2 step 2", [{"kind": "after-backward", "at": 5}], "lora")
    result = faults.kill_and_resume(point, config, reference, tmp_path / "killed")
    assert result.killed and result.identical, result.detail
    assert result.resumed_from == ["ckpt-r01-s00000000"]
    tensors, _ = checkpoint.load(tmp_path / "killed" / "checkpoints" / "ckpt-r01-s00000002")  # mid-round 2
    assert tensors["method"] and all(".lora_" in k for k in tensors["method"])  # the frozen round teacher's adapters


@pytest.mark.slow
def test_lcm_lora_recipe_loads_onto_the_teacher_with_its_lcm_scheduler(tiny_sd, tmp_path):
    """LCM-LoRA (the glyphs recipe, its default target layers, on the tiny text teacher): load_lora_weights puts the
    trained consistency student on the teacher's pipeline, sampled by the LCMScheduler saved beside the adapters."""
    from pathlib import Path

    from diffusers import LCMScheduler

    from diffkd.config import load_config

    recipe = Path(__file__).resolve().parents[1] / "configs" / "glyphs-lora-consistency.yaml"
    config = load_config(recipe, ["method.num_steps=3", "method.teacher_grid=20", f"teacher.source={tiny_sd}",
                                  "data.source=digits", "data.convert=true", "data.prompts=[a cat, a dog]",
                                  "train.batch_size=4", "train.learning_rate=1e-2", "train.warmup_steps=0",
                                  "train.device=cpu", "student.lora.rank=4", "student.lora.fuse=false"])
    folder = distill(config, tmp_path / "run")
    student = lora_student(load_pipeline(tiny_sd).unet, config.student.lora)
    tensors, _ = checkpoint.load(checkpoint.latest(tmp_path / "run" / "checkpoints"))
    checkpoint.load_network_state(student, tensors["student"])  # the adapters as trained
    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd)
    pipe.load_lora_weights(folder)
    pipe.scheduler = LCMScheduler.from_pretrained(folder, subfolder="scheduler")
    z, t, hidden = torch.randn(2, 4, 4, 4), torch.tensor([99, 699]), torch.randn(2, 8, 16)
    with torch.no_grad():
        torch.testing.assert_close(pipe.unet(z, t, encoder_hidden_states=hidden).sample,
                                   student(z, t, encoder_hidden_states=hidden).sample)
    assert pipe.scheduler.config.original_inference_steps == 20
    images = pipe("a cat", num_inference_steps=4, guidance_scale=1.0, height=8, width=8, output_type="np").images
    assert images.shape == (1, 8, 8, 3) and not (folder.parent / "student-fused").exists()
    assert "LCMScheduler.from_pretrained" in (folder / "README.md").read_text()


def test_the_adapted_layer_is_w_plus_alpha_over_rank_b_a_by_hand(tiny_sd, tmp_path):
    """alpha = 6, rank = 4: scale 1.5, in the trained student and in the weights diffusers' load_lora_weights +
    fuse_lora make from the exported file (a LoRA whose scale silently became 1 fails here)."""
    from diffusers import StableDiffusionPipeline

    from diffkd.lora import save_lora_student

    teacher = load_pipeline(tiny_sd)
    options = LoraOptions(rank=4, alpha=6, target_modules=["to_q"])
    student = lora_student(teacher.unet, options)
    name = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    layer = student.get_submodule(name)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for module in student.modules():
            for part in ("lora_A", "lora_B"):
                if hasattr(module, part):
                    weight = getattr(module, part)["default"].weight
                    weight.copy_(torch.randn(weight.shape, generator=generator))
    w = teacher.unet.get_submodule(name).weight
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    by_hand = w + (6 / 4) * b @ a
    x = torch.randn(3, w.shape[1], generator=generator)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), x @ by_hand.T)

    folder = save_lora_student(tmp_path / "lora", teacher, student, DDIMScheduler(), {"teacher": tiny_sd}, False)
    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd)
    pipe.load_lora_weights(folder)
    pipe.fuse_lora()
    torch.testing.assert_close(pipe.unet.get_submodule(name).weight, by_hand)
    card = yaml.safe_load((folder / "README.md").read_text().split("---")[1])
    assert card["lora_file_bytes"] == (folder / LORA_FILE).stat().st_size > 0


def test_a_sharded_lora_student_is_refused_in_one_line(tiny_sd):
    data = lora_config(tiny_sd)
    data["train"]["shard"] = True
    with pytest.raises(DiffkdError, match="drop train.shard") as error:
        parse_config(data)  # so diffkd plan refuses it too
    assert "\n" not in str(error.value)
