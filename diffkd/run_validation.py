"""Validation inside a run: which checkpoint to export, and when to stop, without any real data.

A recipe's step count is tuned on one teacher; on another the student's quality may still be rising when the run
ends, or (DMD) fall after a few hundred steps. So every ``train.validate_every`` steps the student samples a fixed
batch of noise with the scheduler it will be exported with, at ``k`` steps, and the Fréchet distance (the
evaluation's own formula, ``diffkd.evaluation.frechet``) to the teacher's DDIM-64 samples of other fixed noise is
recorded. The reference needs no data set: it is the teacher's own reference sampler, run once per run and cached
in ``OUTPUT/validation/``. The trainer keeps the weights of the best validation (``diffkd.selection``), checkpoints them,
and the run exports those.

The absolute figure is biased upwards by the small sample count (a few hundred); only its ranking across the run's
checkpoints is used, and that ranking is what the evaluation afterwards is asked to confirm.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from diffkd.evaluation.features import FeatureNetwork, load_feature_network, to_uint8
from diffkd.evaluation.frechet import frechet_distance, gaussian_stats
from diffkd.io import LoadedPipeline
from diffkd.models import Denoiser
from diffkd.sampling import ddim_sample, scheduler_sample

log = logging.getLogger(__name__)

REFERENCE_STEPS = 64
REFERENCE_FILE = "reference.safetensors"


def default_feature(channels: int) -> str:
    """The digits classifier reads grey images; anything else gets the seeded random network, which needs neither
    a download nor training (``diffkd.evaluation.random_features``)."""
    return "digits-classifier" if channels == 1 else "random-conv"


class Validator:
    """Scores a student network: k-step samples of fixed noise, FD to the teacher's cached DDIM-64 samples."""

    def __init__(self, teacher: LoadedPipeline, scheduler, prediction_type: str, steps: int, samples: int,
                 feature: str, folder: Path, seed: int = 0, batch: int = 128):
        if teacher.text_conditioned:
            raise ValueError("in-run validation needs an unconditional teacher")
        self.teacher, self.scheduler, self.prediction_type = teacher, scheduler, prediction_type
        self.steps, self.samples, self.folder, self.seed, self.batch = steps, samples, folder, seed, batch
        self.feature: FeatureNetwork = load_feature_network(
            default_feature(teacher.image_channels) if feature == "auto" else feature, teacher.unet.device)
        shape = (teacher.unet.config.in_channels, teacher.unet.config.sample_size, teacher.unet.config.sample_size)
        self.student_noise = torch.randn(samples, *shape, generator=torch.Generator().manual_seed(seed))
        self.reference_noise = torch.randn(samples, *shape, generator=torch.Generator().manual_seed(seed + 1))
        self._reference: tuple[torch.Tensor, torch.Tensor] | None = None

    def describe(self) -> dict:
        return {"steps": self.steps, "samples": self.samples, "feature": self.feature.name,
                "reference": f"teacher DDIM-{REFERENCE_STEPS}, {self.samples} samples"}

    def reference(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and covariance of the teacher's DDIM-64 samples' features, made once and kept in the run folder
        (a resumed run reads them back instead of paying the 64-step sampling again)."""
        if self._reference is None:
            path = self.folder / REFERENCE_FILE
            if path.is_file():
                stored = load_file(str(path))
                if stored["noise_sum"].item() == float(self.reference_noise.double().sum()):
                    self._reference = stored["mu"], stored["sigma"]
            if self._reference is None:
                images = self._sample(lambda z: ddim_sample(self.teacher.denoiser, z, REFERENCE_STEPS),
                                      self.reference_noise)
                self._reference = gaussian_stats(self.feature(to_uint8(images)))
                self.folder.mkdir(parents=True, exist_ok=True)
                save_file({"mu": self._reference[0], "sigma": self._reference[1],
                           "noise_sum": self.reference_noise.double().sum().reshape(1)}, str(path))
        return self._reference

    @torch.no_grad()
    def __call__(self, student: nn.Module) -> float:
        """FD of ``student``'s k-step samples (its exported scheduler) to the reference."""
        mu, sigma = self.reference()
        teacher = self.teacher.denoiser
        model = Denoiser(student, teacher.path, self.prediction_type, clip_sample=teacher.clip_sample,
                         vae=teacher.vae)
        was_training = student.training
        student.eval()
        try:
            images = self._sample(lambda z: scheduler_sample(
                model, type(self.scheduler).from_config(self.scheduler.config), z, self.steps), self.student_noise)
        finally:
            student.train(was_training)
        return frechet_distance(*gaussian_stats(self.feature(to_uint8(images))), mu, sigma)

    def _sample(self, sampler, noise: torch.Tensor) -> torch.Tensor:
        device = self.teacher.unet.device
        return torch.cat([self.teacher.denoiser.decode(sampler(chunk.to(device))).cpu()
                          for chunk in noise.split(self.batch)])


def timed(validator: Validator, student: nn.Module) -> tuple[float, float]:
    """The FD and the seconds it took (the run reports validation's share of its wall time)."""
    started = time.perf_counter()
    fd = validator(student)
    return fd, time.perf_counter() - started


def plot_record(record: dict, label: str, path: Path) -> Path:
    """The validation FD over the run, the exported step marked: where the run peaked, and whether it was still
    improving when it ended (train longer) or had long passed its best (train shorter)."""
    from matplotlib.figure import Figure  # the object API: no pyplot state, no GUI backend

    figure = Figure(figsize=(6, 3.6))
    ax = figure.subplots()
    steps, fds = [h["step"] for h in record["history"]], [h["fd"] for h in record["history"]]
    ax.plot(steps, fds, marker="o", label="validation")
    ax.plot([record["best_step"]], [record["best_fd"]], marker="*", markersize=14, linestyle="",
            label=f"exported: step {record['best_step']}")
    ax.set_xlabel("optimiser step")
    ax.set_ylabel(f"{label} to the teacher's DDIM-{REFERENCE_STEPS}")
    ax.set_yscale("log")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110, bbox_inches="tight")
    return path
