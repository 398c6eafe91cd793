"""Knowledge-distillation terms that any method adds to its own loss: output KD, feature KD and LPIPS.

BK-SDM (Kim et al. 2023, eq. 4) trains its compact student on L_task + w_out * L_outKD + w_feat * L_featKD. A method
computes its own task term; ``AuxiliaryLosses`` adds the others that ``LossConfig`` switches on, each as its own
named, weighted term of ``LossTerms`` so that every one of them is logged separately.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from diffkd import schedule
from diffkd.config import LossConfig
from diffkd.io import LoadedPipeline
from diffkd.losses.features import FeatureAlignment, block_taps, capture, parse_taps, probe_widths
from diffkd.losses.perceptual import LPIPSLoss
from diffkd.losses.terms import LossTerms
from diffkd.models import Conditioning


class OutputKD:
    """||f_S(z_t, t) - f_T(z_t, t)||^2 in the student's parameterisation f (BK-SDM's L_outKD, eq. 3): the
    teacher's prediction at the very input the student saw, available at every noise level."""

    def __init__(self, prediction_type: str):
        self.prediction_type = prediction_type

    def __call__(self, student: tuple[torch.Tensor, torch.Tensor], teacher: tuple[torch.Tensor, torch.Tensor],
                 alpha: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        pred = schedule.from_x0_eps(*student, alpha, sigma, self.prediction_type)
        target = schedule.from_x0_eps(*teacher, alpha, sigma, self.prediction_type)
        return (pred - target.detach()).pow(2).mean()


class PerceptualKD:
    """LPIPS (Zhang et al. 2018) between the student's and the reference's images, decoded through the VAE for
    latent teachers; images are clamped to [-1, 1], the range LPIPS was calibrated on."""

    def __init__(self, teacher: LoadedPipeline, net: str, backbone_weights: str | None, pnet_rand: bool = False):
        self.decode = teacher.denoiser.decode
        self.lpips = LPIPSLoss(net=net, backbone_weights=backbone_weights, pnet_rand=pnet_rand)
        self.lpips.to(teacher.unet.device)

    def __call__(self, x0_student: torch.Tensor, x0_reference: torch.Tensor) -> torch.Tensor:
        student = self.decode(x0_student).clamp(-1, 1)
        with torch.no_grad():
            reference = self.decode(x0_reference).clamp(-1, 1)
        return self.lpips(student, reference).mean()


class AuxiliaryLosses:
    """The configured KD terms for one (teacher, student) pair.

    Use: ``with aux.watch(student): x0, eps = student_model.x0_eps(z, t)`` then ``aux.add(terms, z, t, ...)``.
    ``watch`` taps the student's forward; ``add`` runs the teacher once at (z, t) (only when output or feature KD is
    on) and appends ``output_kd``, ``feature/<tap>`` and ``lpips`` terms with their weights.
    """

    def __init__(self, config: LossConfig, teacher: LoadedPipeline, student: nn.Module, prediction_type: str,
                 lpips_pnet_rand: bool = False):
        self.config = config
        self.teacher = teacher.denoiser
        self.output_kd = OutputKD(prediction_type)
        self.features: FeatureAlignment | None = None
        if config.feature_kd > 0:
            taps = parse_taps(config.feature_taps) if config.feature_taps else block_taps(teacher.unet, student)
            widths = probe_widths(teacher.unet, student, taps)
            self.features = FeatureAlignment(taps, widths).to(teacher.unet.device)
        self.perceptual = (PerceptualKD(teacher, config.lpips_net, config.lpips_backbone_weights, lpips_pnet_rand)
                           if config.lpips > 0 else None)
        self._student_features: dict[str, torch.Tensor] = {}

    @property
    def needs_teacher_pass(self) -> bool:
        return self.config.output_kd > 0 or self.features is not None

    def modules(self) -> nn.ModuleDict:
        """What trains with the student but is not exported: the feature projections."""
        return nn.ModuleDict({"features": self.features} if self.features is not None else {})

    @contextlib.contextmanager
    def watch(self, student: nn.Module) -> Iterator[None]:
        """Tap the student's forward passes inside the block (a no-op without feature KD)."""
        if self.features is None:
            yield
            return
        with capture(student, [tap.student for tap in self.features.taps]) as features:
            yield
        self._student_features = dict(features)

    def add(self, terms: LossTerms, z: torch.Tensor, t: torch.Tensor, cond: Conditioning | None,
            student: tuple[torch.Tensor, torch.Tensor],
            images: tuple[torch.Tensor, torch.Tensor] | None = None, teacher_terms: bool = True) -> LossTerms:
        """Append the configured terms; ``student`` is the student's (x0, eps) at (z, t) and ``images`` the
        (student x0, reference x0) pair that LPIPS compares. ``teacher_terms=False`` leaves out the terms against
        the teacher's pass (output and feature KD) for a step where that pass is not the target."""
        if self.needs_teacher_pass and teacher_terms:
            teacher_features, teacher_x0_eps = self._teacher_pass(z, t, cond)
            if self.config.output_kd > 0:
                alpha, sigma = self.teacher.alpha_sigma(t.expand(z.shape[0]) if t.ndim == 0 else t)
                terms.add("output_kd", self.output_kd(student, teacher_x0_eps, alpha, sigma), self.config.output_kd)
            if self.features is not None:
                per_tap = self.features(self._student_features, teacher_features)
                for name, value in per_tap.items():
                    terms.add(f"feature/{name}", value, self.config.feature_kd / len(per_tap))
                self._student_features = {}
        if self.perceptual is not None and images is not None:
            terms.add("lpips", self.perceptual(*images), self.config.lpips)
        return terms

    @torch.no_grad()
    def _teacher_pass(self, z: torch.Tensor, t: torch.Tensor, cond: Conditioning | None
                      ) -> tuple[dict[str, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
        paths = [tap.teacher for tap in self.features.taps] if self.features is not None else []
        with capture(self.teacher.unet, paths) as features:
            x0_eps = self.teacher.x0_eps(z, t, cond)
        if cond is not None and cond.guided:  # the guided pass doubles the batch: keep the conditional half
            features = {k: v.chunk(2)[1] for k, v in features.items()}
        return dict(features), x0_eps
