"""Which metrics an evaluation computes and which weights files they need, decided in one place.

The preflight before training (``check_weights``: a missing file costs seconds, not the night of training before
it) and the sweep itself ask ``plan_metrics``, so the two cannot disagree about whether LPIPS, CLIPScore or
Inception will be needed.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from diffkd.errors import DiffkdError
from diffkd.eval_options import EvalConfig
from diffkd.evaluation.reference import auto_feature
from diffkd.weights import INCEPTION, TORCHVISION, locate_checkpoint, locate_hf_model


@dataclass
class MetricPlan:
    """feature: the FD/KID feature network. lpips: True = required, None = when its backbone weights are on disk,
    False = off (``lpips_off`` says why). clip: CLIPScore on or off (``clip_off`` says why)."""

    feature: str
    lpips: bool | None
    clip: bool
    lpips_off: str = ""
    clip_off: str = ""


def plan_metrics(config: EvalConfig, has_teacher: bool, text_conditioned: bool, has_prompts: bool) -> MetricPlan:
    """The metrics of an evaluation with (or without) a reference teacher, of (any) text-conditioned pipelines,
    with (or without) prompts; ``eval.clip_score: true`` where CLIPScore cannot run is refused."""
    feature = auto_feature(config.reference) if config.feature == "auto" else config.feature
    lpips, lpips_off = config.lpips, ""
    if not config.fidelity or not has_teacher:
        lpips, lpips_off = False, "off (no fidelity)"
    elif config.lpips is False:
        lpips_off = "off (eval.lpips = false)"
    clip, clip_off = config.clip_score is not False, ""
    if config.clip_score is False:
        clip_off = "off (eval.clip_score = false)"
    elif not (text_conditioned and has_prompts):
        if config.clip_score:
            raise DiffkdError("eval.clip_score=true needs a text-conditioned pipeline and prompts (CLIPScore scores "
                              "images against their prompts): set eval.clip_score to false, or leave it unset")
        clip, clip_off = False, "off (no text-conditioned pipeline)"
    return MetricPlan(feature, lpips, clip, lpips_off, clip_off)


def check_weights(config: EvalConfig, plan: MetricPlan, purpose: str) -> None:
    """Find every weights file ``plan`` requires, without loading it; raise naming the file and where to put it."""
    if plan.feature == "inception":
        locate_checkpoint(*INCEPTION, config.feature_weights, f"FID (Inception) {purpose}", "eval.feature_weights")
    elif plan.feature != "digits-classifier" and not Path(plan.feature).expanduser().is_file():
        raise DiffkdError(f"eval.feature {plan.feature!r} is neither digits-classifier, inception nor a TorchScript "
                          "file")
    if plan.lpips:
        locate_checkpoint(*TORCHVISION[config.lpips_net], config.lpips_backbone_weights,
                          f"LPIPS ({config.lpips_net}) {purpose}", "eval.lpips_backbone_weights")
    if plan.clip:
        locate_hf_model(config.clip_model, f"CLIPScore {purpose}", "eval.clip_model")
