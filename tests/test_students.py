"""Compact students: derived from the teacher's config, initialised tensor by tensor from the teacher's weights."""

import time
from pathlib import Path

import pytest
import torch
from diffusers import DDIMScheduler, UNet2DConditionModel, UNet2DModel

from diffkd.config import StudentConfig
from diffkd.data import load_digits
from diffkd.errors import DiffkdError
from diffkd.io import load_pipeline
from diffkd.students import build_student, per_step_latency, weight_sources

SHIPPED_TEACHER = Path(__file__).resolve().parent.parent / "teachers" / "digits-16"


def deep_teacher(layers: int = 2) -> UNet2DModel:
    torch.manual_seed(0)
    return UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(16, 32),
                       layers_per_block=layers, norm_num_groups=8, attention_head_dim=8,
                       down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                       up_block_types=("AttnUpBlock2D", "UpBlock2D"))


def compact(**options) -> StudentConfig:
    return StudentConfig(architecture="compact", latency_batch_size=0, **options)


def test_copy_is_a_trainable_deep_copy(tiny_unet):
    student, report = build_student(tiny_unet, StudentConfig())
    assert student is not tiny_unet and report["initialised"] == 0
    for (name, a), b in zip(tiny_unet.state_dict().items(), student.state_dict().values()):
        assert torch.equal(a, b), name
    assert all(p.requires_grad for p in student.parameters())


def test_layer_dropping_keeps_the_kept_layers_weights_tensor_by_tensor():
    teacher = deep_teacher(layers=2)
    student, report = build_student(teacher, compact(layers_per_block=1))
    assert [len(b.resnets) for b in student.down_blocks] == [1, 1]
    assert [len(b.resnets) for b in student.up_blocks] == [2, 2]
    teacher_state, student_state = teacher.state_dict(), student.state_dict()
    sources = weight_sources(teacher, student)
    assert all(source is not None for source in sources.values())
    for name, source in sources.items():
        assert torch.equal(student_state[name], teacher_state[source]), (name, source)
    # the up block's last resnet (the one fed by the skip from the level above) comes from the teacher's last
    assert sources["up_blocks.0.resnets.1.conv1.weight"] == "up_blocks.0.resnets.2.conv1.weight"
    assert sources["up_blocks.0.attentions.1.to_q.weight"] == "up_blocks.0.attentions.2.to_q.weight"
    assert sources["down_blocks.1.resnets.0.conv1.weight"] == "down_blocks.1.resnets.0.conv1.weight"
    assert report["copied"] == len(student_state) and report["initialised"] == 0
    assert report["parameters"][1] < report["parameters"][0]
    out = student(torch.randn(2, 1, 8, 8), torch.tensor([10, 900])).sample
    assert out.shape == (2, 1, 8, 8) and torch.isfinite(out).all()


def test_dropping_the_mid_block():
    teacher = deep_teacher(layers=1)
    student, report = build_student(teacher, compact(drop_mid_block=True))
    assert student.mid_block is None and report["mid_block"] == [True, False]
    assert report["initialised"] == 0
    assert student(torch.randn(1, 1, 8, 8), torch.tensor([500])).sample.shape == (1, 1, 8, 8)


def test_half_width_scales_groups_reports_fresh_tensors_and_runs():
    teacher = deep_teacher(layers=1)
    student, report = build_student(teacher, compact(width_multiplier=0.5, narrow_init="fresh"))
    assert list(student.config.block_out_channels) == [8, 16]
    assert student.config.norm_num_groups == 4  # the teacher's 2 channels per group are kept
    assert report["initialised"] > 0 and "down_blocks.0" in report["initialised_blocks"]
    assert report["parameters"][1] <= 0.4 * report["parameters"][0]
    sources = weight_sources(teacher, student)
    teacher_state, student_state = teacher.state_dict(), student.state_dict()
    copied = [n for n, s in sources.items() if s is not None and teacher_state[s].shape == student_state[n].shape]
    assert len(copied) == report["copied"] and report["sliced"] == 0
    for name in copied:
        assert torch.equal(student_state[name], teacher_state[sources[name]]), name
    assert student(torch.randn(2, 1, 8, 8), torch.tensor([1, 999])).sample.shape == (2, 1, 8, 8)


def test_half_width_takes_every_other_channel_of_the_teacher():
    teacher = deep_teacher(layers=1)
    student, report = build_student(teacher, compact(width_multiplier=0.5))
    teacher_state, student_state = teacher.state_dict(), student.state_dict()
    sources = weight_sources(teacher, student)
    assert report["initialised"] == 0 and report["sliced"] > 0
    assert report["copied"] + report["sliced"] == len(student_state)
    for name, tensor in student_state.items():
        source = teacher_state[sources[name]]
        strides = [t // s for t, s in zip(source.shape, tensor.shape)]
        assert set(strides) <= {1, 2}, name
        assert torch.equal(tensor, source[tuple(slice(None, None, r) for r in strides)]), name


def test_sliced_sinusoidal_time_features_are_the_students_own():
    """Slicing the time embedding's input every other feature is right only because the half-width student's
    sinusoids are the teacher's even-indexed ones (at freq_shift 0, the default); this pins that fact of diffusers'
    Timesteps."""
    teacher = deep_teacher(layers=1)
    student, _ = build_student(teacher, compact(width_multiplier=0.5))
    t = torch.tensor([0, 17, 500, 999])
    assert torch.allclose(student.time_proj(t), teacher.time_proj(t)[:, ::2], atol=1e-6)


def test_sliced_student_starts_closer_to_a_trained_teacher_than_a_fresh_one():
    pipeline = load_pipeline(str(SHIPPED_TEACHER))
    teacher = pipeline.unet.eval()
    t = torch.linspace(0, 999, 8).long().repeat_interleave(64)
    alpha_bar = pipeline.scheduler.alphas_cumprod[t].view(-1, 1, 1, 1)
    images = load_digits(16)[:64].repeat(8, 1, 1, 1)
    noise = torch.randn(images.shape, generator=torch.Generator().manual_seed(0))
    z = alpha_bar.sqrt() * images + (1 - alpha_bar).sqrt() * noise
    errors = {}
    with torch.no_grad():
        target = teacher(z, t).sample
        for init in ("slice", "fresh"):
            torch.manual_seed(0)
            student, _ = build_student(teacher, compact(width_multiplier=0.5, narrow_init=init))
            errors[init] = (student(z, t).sample - target).pow(2).mean().item()
    print(f"MSE to the teacher's output before training: {errors}")  # the figure RESULTS quotes (pytest -s)
    assert errors["slice"] < 0.7 * errors["fresh"], errors


def test_latency_is_reported_when_asked():
    _, report = build_student(deep_teacher(1), StudentConfig(architecture="compact", width_multiplier=0.5,
                                                             latency_batch_size=2))
    latency = report["latency_ms_per_step"]
    assert latency["batch_size"] == 2 and latency["teacher"] > 0 and latency["student"] > 0


def test_per_step_latency_times_each_network_and_divides_the_right_way():
    """Each network's forward is made slower by a known sleep (100 ms teacher, 5 ms student): the reported
    milliseconds must include it, per network, and the speed-up must be teacher / student, well above 1."""
    teacher = deep_teacher(1)
    student, _ = build_student(teacher, compact(width_multiplier=0.5))
    teacher.register_forward_pre_hook(lambda *_: time.sleep(0.100))
    student.register_forward_pre_hook(lambda *_: time.sleep(0.005))
    latency = per_step_latency(teacher, student, batch_size=2, repeats=3)
    assert latency["teacher"] >= 100 and 5 <= latency["student"] < latency["teacher"], latency
    assert latency["speedup"] > 2, latency
    assert latency["speedup"] == pytest.approx(latency["teacher"] / latency["student"], abs=0.01)


def test_conditional_unet_compact_student_runs():
    torch.manual_seed(0)
    teacher = UNet2DConditionModel(sample_size=4, in_channels=4, out_channels=4, block_out_channels=(8, 16),
                                   layers_per_block=2, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                   up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=16,
                                   norm_num_groups=4, attention_head_dim=2)
    student, report = build_student(teacher, compact(layers_per_block=1, drop_mid_block=True))
    assert report["initialised"] == 0 and student.mid_block is None
    out = student(torch.randn(2, 4, 4, 4), torch.tensor([3, 700]), encoder_hidden_states=torch.randn(2, 3, 16))
    assert out.sample.shape == (2, 4, 4, 4)


def test_width_that_breaks_groupnorm_is_one_clear_error():
    with pytest.raises(DiffkdError, match="norm_num_groups.*width_multiplier that keeps whole groups"):
        build_student(deep_teacher(1), compact(width_multiplier=0.3))
    with pytest.raises(DiffkdError, match="not divisible by norm_num_groups=3"):
        build_student(deep_teacher(1), compact(width_multiplier=0.5, norm_num_groups=3))


def test_non_unet_teacher_is_refused():
    with pytest.raises(DiffkdError, match="UNet2DModel or UNet2DConditionModel.*architecture=copy"):
        build_student(torch.nn.Conv2d(1, 1, 1), compact())


def test_student_config_validates():
    with pytest.raises(DiffkdError, match="width_multiplier"):
        StudentConfig(architecture="compact", width_multiplier=0)
    with pytest.raises(DiffkdError, match="norm_num_groups"):
        StudentConfig(norm_num_groups=0)
    with pytest.raises(DiffkdError, match="student.narrow_init"):
        StudentConfig(narrow_init="random")


def test_init_from_starts_the_student_from_another_unet_of_the_teachers_shape(tiny_teacher, tmp_path):
    """student.init_from: the copy student holds the other pipeline's UNet weights, not the teacher's; a UNet of
    another shape is refused in one line that names the option."""
    from diffkd.api import prepare
    from diffkd.config import parse_config
    from tests import faults
    from tests.conftest import make_tiny_unet

    other = load_pipeline(tiny_teacher).pipeline
    with torch.no_grad():
        for parameter in other.unet.parameters():
            parameter.add_(0.5)
    other.save_pretrained(tmp_path / "other")
    config = faults.dmd_config(tiny_teacher)
    config["student"] = {"init_from": str(tmp_path / "other")}
    teacher, method, report = prepare(parse_config(config))
    student = dict(method.student.named_parameters())
    for name, parameter in other.unet.named_parameters():
        assert torch.equal(student[name], parameter)
        assert not torch.equal(dict(teacher.unet.named_parameters())[name], parameter)
    assert report["init_from"] == str(tmp_path / "other")

    narrower = load_pipeline(tiny_teacher).pipeline
    narrower.unet = make_tiny_unet()  # (8, 16) channels where the teacher has (16, 32)
    narrower.save_pretrained(tmp_path / "narrower")
    config["student"] = {"init_from": str(tmp_path / "narrower")}
    with pytest.raises(DiffkdError, match=r"^student\.init_from=.*does not fit the teacher's") as error:
        prepare(parse_config(config))
    assert "\n" not in str(error.value)

    other.register_modules(scheduler=DDIMScheduler.from_config(other.scheduler.config, prediction_type="sample"))
    other.save_pretrained(tmp_path / "other-sample")
    config["student"] = {"init_from": str(tmp_path / "other-sample")}
    with pytest.raises(DiffkdError, match=r"predicts sample but this dmd student predicts"):
        prepare(parse_config(config))
