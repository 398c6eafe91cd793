"""Which metrics an evaluation computes and which weights files they need, decided in one place.

The preflight before training (``check_weights``: a missing file costs seconds, not the night of training before
it) and the sweep itself ask ``plan_metrics``, so the two cannot disagree about whether LPIPS, CLIPScore or
Inception will be needed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from diffkd.errors import DiffkdError
from diffkd.eval_options import EvalConfig, unknown_feature
from diffkd.evaluation.clip import auto_clip_model, locate_clip
from diffkd.evaluation.glyphs_classifier import GLYPHS_CLASSIFIER, missing_classifier
from diffkd.evaluation.prompt_accuracy import prompts_name_glyphs
from diffkd.evaluation.reference import auto_feature
from diffkd.weights import INCEPTION, TORCHVISION, locate_checkpoint


@dataclass
class MetricPlan:
    """feature: the FD/KID feature network. lpips: True = required, None = when its backbone weights are on disk,
    False = off (``lpips_off`` says why). clip: CLIPScore on or off (``clip_off`` says why), with ``clip_model``.
    prompt_accuracy: the glyphs classifier checks each image against its prompt (``prompt_accuracy_off``: why not)."""

    feature: str
    lpips: bool | None
    clip: bool
    lpips_off: str = ""
    clip_off: str = ""
    clip_model: str = ""
    prompt_accuracy: bool = False
    prompt_accuracy_off: str = ""


def plan_metrics(config: EvalConfig, has_teacher: bool, text_conditioned: bool, has_prompts: bool,
                 prompts: Sequence[str] | None = None) -> MetricPlan:
    """The metrics of an evaluation with (or without) a reference teacher, of (any) text-conditioned pipelines,
    with (or without) prompts (``prompts``: the list itself, when known); ``eval.clip_score: true`` or
    ``eval.prompt_accuracy: true`` where they cannot run is refused."""
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
    accuracy, accuracy_off = _prompt_accuracy(config, text_conditioned and has_prompts, prompts)
    return MetricPlan(feature, lpips, clip, lpips_off, clip_off, auto_clip_model(config.clip_model, config.reference),
                      accuracy, accuracy_off)


def _prompt_accuracy(config: EvalConfig, text: bool, prompts: Sequence[str] | None) -> tuple[bool, str]:
    if config.prompt_accuracy is False:
        return False, "off (eval.prompt_accuracy = false)"
    problem = ("no text-conditioned pipeline with prompts" if not text else
               "not every prompt names a character and two colours" if prompts is not None
               and not prompts_name_glyphs(list(prompts)) else "")
    if problem and config.prompt_accuracy:
        raise DiffkdError(f"eval.prompt_accuracy=true but there is {problem}: prompt accuracy reads glyphs prompts "
                          "such as 'a red letter K on a blue background'; set eval.prompt_accuracy to false, or "
                          "leave it unset")
    if problem:
        return False, f"off ({problem})"
    return True, ""


def check_weights(config: EvalConfig, plan: MetricPlan, purpose: str) -> None:
    """Find every weights file ``plan`` requires, without loading it; raise naming the file and where to put it."""
    if plan.feature == "inception":
        locate_checkpoint(*INCEPTION, config.feature_weights, f"FID (Inception) {purpose}", "eval.feature_weights")
    elif plan.feature not in ("digits-classifier", "glyphs-classifier", "random-conv") and not Path(plan.feature).expanduser(
            ).is_file():
        raise unknown_feature(plan.feature)
    if (plan.prompt_accuracy or plan.feature == "glyphs-classifier") and not GLYPHS_CLASSIFIER.is_file():
        raise DiffkdError(missing_classifier())
    if plan.lpips:
        locate_checkpoint(*TORCHVISION[config.lpips_net], config.lpips_backbone_weights,
                          f"LPIPS ({config.lpips_net}) {purpose}", "eval.lpips_backbone_weights")
    if plan.clip:
        locate_clip(plan.clip_model, f"CLIPScore {purpose}")
