"""One decision of which metrics an evaluation runs and which weights they need, for the preflight before training
and for the sweep (diffkd.evaluation.plan)."""

from types import SimpleNamespace

import pytest
import torch

from diffkd.api import check_evaluation
from diffkd.config import parse_config
from diffkd.errors import DiffkdError
from diffkd.eval_options import EvalConfig
from diffkd.evaluation.plan import check_weights, plan_metrics


@pytest.fixture
def empty_hub(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))


@pytest.mark.parametrize("options, has_teacher, text, expected", [
    ({}, True, False, ("digits-classifier", None, False, "", "off (no text-conditioned pipeline)")),
    ({"fidelity": False}, True, False, ("digits-classifier", False, False, "off (no fidelity)",
                                        "off (no text-conditioned pipeline)")),
    ({}, False, False, ("digits-classifier", False, False, "off (no fidelity)", "off (no text-conditioned pipeline)")),
    ({"lpips": False}, True, False, ("digits-classifier", False, False, "off (eval.lpips = false)",
                                     "off (no text-conditioned pipeline)")),
    ({"lpips": True, "reference": "some/folder"}, True, True, ("inception", True, True, "", "")),
    ({"clip_score": False, "feature": "net.pt"}, True, True, ("net.pt", None, False, "",
                                                              "off (eval.clip_score = false)")),
])
def test_plan_decides_feature_lpips_and_clip(options, has_teacher, text, expected):
    plan = plan_metrics(EvalConfig(**options), has_teacher, text_conditioned=text, has_prompts=text)
    assert (plan.feature, plan.lpips, plan.clip, plan.lpips_off, plan.clip_off) == expected


def test_clip_asked_for_where_it_cannot_run_is_refused():
    with pytest.raises(DiffkdError, match="eval.clip_score=true needs a text-conditioned pipeline and prompts"):
        plan_metrics(EvalConfig(clip_score=True), True, text_conditioned=False, has_prompts=False)
    with pytest.raises(DiffkdError, match="needs a text-conditioned pipeline and prompts"):
        plan_metrics(EvalConfig(clip_score=True), True, text_conditioned=True, has_prompts=False)


def test_check_weights_names_each_missing_file(empty_hub, tmp_path):
    inception = EvalConfig(feature="inception")
    with pytest.raises(DiffkdError, match="FID \\(Inception\\) before x needs weights-inception-2015-12-05"):
        check_weights(inception, plan_metrics(inception, True, False, False), "before x")
    lpips = EvalConfig(lpips=True)
    with pytest.raises(DiffkdError, match="LPIPS \\(alex\\) before x needs alexnet-owt-7be5be79.pth"):
        check_weights(lpips, plan_metrics(lpips, True, False, False), "before x")
    clip = EvalConfig(clip_model="nobody/no-clip")
    with pytest.raises(DiffkdError, match="CLIPScore before x needs the model 'nobody/no-clip'"):
        check_weights(clip, plan_metrics(clip, True, True, True), "before x")
    missing_net = EvalConfig(feature=str(tmp_path / "net.pt"))
    with pytest.raises(DiffkdError, match="neither digits-classifier, glyphs-classifier, random-conv, inception nor a TorchScript file"):
        check_weights(missing_net, plan_metrics(missing_net, True, False, False), "before x")
    latent = EvalConfig(feature="latent-random-conv")
    with pytest.raises(DiffkdError, match="only in-run validation reads.*use random-conv"):
        check_weights(latent, plan_metrics(latent, True, False, False), "before x")
    check_weights(EvalConfig(), plan_metrics(EvalConfig(), True, False, False), "before x")  # digits: nothing to find


def test_preflight_sees_the_training_prompts_the_evaluation_will_use(empty_hub):
    """The evaluation after training scores a text teacher on data.prompts when eval names none: the preflight must
    then look for the CLIP model too, not find out after training."""
    text_teacher = SimpleNamespace(text_conditioned=True, image_size=16, image_channels=1)
    config = parse_config({"data": {"prompts": ["a cat"]}, "eval": {"clip_model": "nobody/no-clip"}})
    with pytest.raises(DiffkdError, match="CLIPScore in the evaluation after training needs the model"):
        check_evaluation(config, text_teacher)
    check_evaluation(parse_config({"eval": {"clip_model": "nobody/no-clip"}}), SimpleNamespace(text_conditioned=False, image_size=16,
                                                                                   image_channels=1))
