"""KD terms: zero on identical inputs, positive otherwise, scale-free per tap, and summed with their weights."""

import copy

import pytest
import torch
from diffusers import DDIMPipeline

from diffkd.config import LossConfig, StudentConfig
from diffkd.io import LoadedPipeline, denoiser_of
from diffkd.losses.features import FeatureAlignment, block_taps, capture, probe_widths
from diffkd.losses.kd import AuxiliaryLosses, OutputKD
from diffkd.losses.terms import LossTerms
from diffkd.models import Denoiser
from diffkd.students import build_student
from tests.conftest import make_scheduler


def teacher_pipeline(unet) -> LoadedPipeline:
    pipeline = DDIMPipeline(unet.requires_grad_(False).eval(), make_scheduler())
    return LoadedPipeline("tiny", pipeline, denoiser_of(pipeline))


def features_of(unet, taps, z, t):
    with capture(unet, [tap[0] for tap in taps]) as features:
        unet(z, t)
    return dict(features)


def test_projections_make_mismatched_widths_comparable(tiny_unet):
    student, _ = build_student(tiny_unet, StudentConfig(architecture="compact", width_multiplier=0.5,
                                                        latency_batch_size=0))
    taps = block_taps(tiny_unet, student)
    alignment = FeatureAlignment(taps, probe_widths(tiny_unet, student, taps))
    assert set(alignment.projections) == {"down_blocks_0", "down_blocks_1", "mid_block", "up_blocks_0", "up_blocks_1"}
    assert alignment.projections["down_blocks_0"].weight.shape == (8, 4, 1, 1)
    z, t = torch.randn(2, 1, 8, 8), torch.tensor([5, 600])
    losses = alignment(features_of(student, taps, z, t), features_of(tiny_unet, taps, z, t))
    assert set(losses) == {tap[0] for tap in taps} and all(v > 0 for v in losses.values())
    sum(losses.values()).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in alignment.projections.parameters())


def test_feature_loss_is_zero_on_identical_features_positive_otherwise_and_scale_free():
    alignment = FeatureAlignment([("a", "a")], {"a": (4, 4)})
    assert len(alignment.projections) == 0
    f = torch.randn(3, 4, 5, 5)
    assert alignment({"a": f}, {"a": f})["a"] == 0
    g = f + 0.1 * torch.randn_like(f)
    loss = alignment({"a": g}, {"a": f})["a"]
    assert loss > 0
    torch.testing.assert_close(alignment({"a": 1000 * g}, {"a": 1000 * f})["a"], loss)
    # golden number: relative error ||g - f||^2 / ||f||^2, per sample then averaged
    expected = ((g - f).pow(2).flatten(1).mean(1) / f.pow(2).flatten(1).mean(1)).mean()
    torch.testing.assert_close(loss, expected)


def test_output_kd_is_zero_on_identical_predictions_and_matches_the_student_parameterisation():
    x0, eps = torch.randn(2, 2, 1, 4, 4)
    alpha, sigma = torch.tensor([0.6, 0.8]), torch.tensor([0.8, 0.6])
    kd = OutputKD("v_prediction")
    assert kd((x0, eps), (x0, eps), alpha, sigma) == 0
    other = (x0 + 0.5, eps)
    v = alpha.view(2, 1, 1, 1) * eps - sigma.view(2, 1, 1, 1) * x0
    v_other = alpha.view(2, 1, 1, 1) * eps - sigma.view(2, 1, 1, 1) * (x0 + 0.5)
    torch.testing.assert_close(kd((x0, eps), other, alpha, sigma), (v - v_other).pow(2).mean())


def auxiliary(teacher_unet, student, **weights) -> AuxiliaryLosses:
    config = LossConfig(**weights)
    return AuxiliaryLosses(config, teacher_pipeline(teacher_unet), student, "v_prediction", lpips_pnet_rand=True)


def run_terms(aux: AuxiliaryLosses, teacher: LoadedPipeline, student) -> LossTerms:
    z = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(3))
    t = torch.tensor([20, 300, 600, 990])
    model = Denoiser(student, teacher.denoiser.path, "v_prediction")
    with aux.watch(student):
        x0, eps = model.x0_eps(z, t)
    reference = teacher.denoiser.x0_eps(z, t)[0].clamp(-1, 1)
    terms = LossTerms({"task": x0.pow(2).mean()})
    return aux.add(terms, z, t, None, (x0, eps), images=(x0, reference))


def test_every_term_is_zero_for_a_student_equal_to_its_teacher(tiny_unet):
    teacher = teacher_pipeline(tiny_unet)
    student = copy.deepcopy(tiny_unet)
    aux = auxiliary(tiny_unet, student, output_kd=1.0, feature_kd=1.0, lpips=1.0)
    terms = run_terms(aux, teacher, student)
    kd_terms = {k: v for k, v in terms.terms.items() if k != "task"}
    assert "output_kd" in kd_terms and "lpips" in kd_terms and "feature/mid_block" in kd_terms
    for name, value in kd_terms.items():
        assert value.abs() < 1e-6, name


def test_terms_are_positive_for_a_different_student_and_total_is_the_weighted_sum(tiny_unet):
    teacher = teacher_pipeline(tiny_unet)
    student, _ = build_student(tiny_unet, StudentConfig(architecture="compact", width_multiplier=0.5,
                                                        latency_batch_size=0))
    aux = auxiliary(tiny_unet, student, output_kd=0.5, feature_kd=2.0, lpips=0.25)
    terms = run_terms(aux, teacher, student)
    features = [k for k in terms.terms if k.startswith("feature/")]
    assert len(features) == 5
    assert all(v > 0 for v in terms.terms.values())
    expected = terms.terms["task"] + 0.5 * terms.terms["output_kd"] + 0.25 * terms.terms["lpips"] + \
        2.0 / 5 * sum(terms.terms[k] for k in features)
    torch.testing.assert_close(terms.total, expected)
    logs = terms.logs()
    assert {"loss/task", "loss/output_kd", "loss/lpips", "loss/feature/down_blocks.0", "loss/total"} <= set(logs)
    terms.total.backward()
    assert all(p.grad is not None for p in aux.modules().parameters())
    assert all(not m._forward_hooks for m in list(student.modules()) + list(tiny_unet.modules()))


def test_switched_off_terms_add_nothing(tiny_unet):
    teacher = teacher_pipeline(tiny_unet)
    student = copy.deepcopy(tiny_unet)
    aux = auxiliary(tiny_unet, student)
    assert not aux.needs_teacher_pass and len(aux.modules()) == 0
    assert set(run_terms(aux, teacher, student).terms) == {"task"}


def test_missing_lpips_weights_fail_at_construction_in_one_line(tiny_unet, tmp_path):
    from diffkd.errors import DiffkdError

    missing = tmp_path / "alexnet.pth"
    with pytest.raises(DiffkdError, match="alexnet.pth"):
        AuxiliaryLosses(LossConfig(lpips=1.0, lpips_backbone_weights=str(missing)), teacher_pipeline(tiny_unet),
                        copy.deepcopy(tiny_unet), "v_prediction")
