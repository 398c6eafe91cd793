"""Validation inside a run: which checkpoint to export, and when to stop.

A recipe's step count is tuned on one teacher; on another the student's quality may still be rising when the run
ends, or fall after a few hundred steps. So every ``train.validate_every`` steps the student samples a fixed batch
of noise with the scheduler it will be exported with, at each of the k it is validated for, and the Fréchet
distance (the evaluation's own formula, ``diffkd.evaluation.frechet``) of each k to a reference is recorded;
``diffkd.selection`` keeps the weights whose FDs have the least geometric mean, and the run exports those.

The reference is the run's own training images when it trains on an in-memory set (the quantity the evaluation
measures, on other noise), else the teacher's DDIM-64 samples of the *same* noise the student samples (paired: the
student is scored on how its samples differ from the teacher's, not on which digits one noise draw happened to
hold). Both were measured against the evaluation's ranking of a run's checkpoints (eval/RESULTS.md, "Does validation
rank checkpoints as the evaluation does?"): the teacher's samples of *other* noise, the first design, ranked a
2.3x-the-reference checkpoint best. Either is made once per run and cached in ``OUTPUT/validation/``.

The validation noise comes from a generator stream the evaluation never draws from (its batches are seeded
``seed * 1,000,003 + batch``), so the checkpoint is not chosen on the noise it is later judged on. The absolute
figures are biased upwards by the sample count; only their ranking across the run's checkpoints is used.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from diffkd import captioned
from diffkd.config import Config, DataConfig
from diffkd.data import load_images
from diffkd.errors import DiffkdError
from diffkd.evaluation.features import (
    LATENT_RANDOM_CONV,
    FeatureNetwork,
    latent_random_conv,
    load_feature_network,
    to_uint8,
)
from diffkd.evaluation.frechet import frechet_distance, gaussian_stats
from diffkd.evaluation.reference import load_real_set
from diffkd.io import LoadedPipeline
from diffkd.models import Conditioning
from diffkd.precision import autocast
from diffkd.sampling import ddim_sample, scheduler_sample

log = logging.getLogger(__name__)

REFERENCE_STEPS = 64
REFERENCE_FILE = "reference.safetensors"
NOISE_STREAM = 10**12  # added to train.seed: far above any seed the evaluation's batch_noise uses


def default_feature(channels: int, source: str = "", latent: bool = False) -> str:
    """The shipped classifier of the images the run trains on, as the evaluation scores them: the digits one reads
    grey images, the glyphs one glyphs; anything else gets the seeded random network, which needs neither a
    download nor training (``diffkd.evaluation.random_features``), on a latent teacher's latents themselves: no
    decoder pass per sample, and it ranked the panel's latent runs' checkpoints as the decoded images did
    (eval/RESULTS.md, "Validation in latent space")."""
    if channels == 1:
        return "digits-classifier"
    if source == "glyphs":
        return "glyphs-classifier"
    return LATENT_RANDOM_CONV if latent else "random-conv"


def references_teacher(config: Config) -> bool:
    """Whether validation scores against the teacher's samples of its own noise rather than the training images:
    ``train.validate_reference: teacher``, or ``auto`` on a streamed set (its images are never all in memory)."""
    reference = config.train.validate_reference
    return reference == "teacher" or (reference == "auto" and captioned.kind_of(config.data.source) is not None)


def validation_feature(name: str, teacher: LoadedPipeline) -> FeatureNetwork:
    """The network ``train.validate_feature`` names; the latent one reads this teacher's latent channels."""
    if name != LATENT_RANDOM_CONV:
        return load_feature_network(name, teacher.unet.device)
    if not teacher.latent:
        raise DiffkdError(f"train.validate_feature={LATENT_RANDOM_CONV} reads a latent teacher's latents, and this "
                          "teacher samples pixels: use random-conv (or auto)")
    return latent_random_conv(teacher.latent_shape[0], teacher.unet.device)


def validation_noise(count: int, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    return torch.randn(count, *shape, generator=torch.Generator().manual_seed(NOISE_STREAM + seed))


@dataclass
class TextValidation:
    """What a text teacher's validation samples are conditioned on: one row of encoded prompt columns per noise
    (``diffkd.conditioning.encode_captions``), and the method's (teacher, student) conditioning of a batch of them
    (``Method.conditioning``: the teacher guided, the student as it is exported: unguided, or told w)."""

    rows: dict[str, torch.Tensor]
    pair: Callable[[dict[str, torch.Tensor], torch.Generator], tuple[Conditioning, Conditioning]]
    prompts: str  # where the prompts came from, for the model card
    key: str  # identifies prompts and guidance in the cached teacher reference


class Validator:
    """Scores a student network: FD of its k-step samples of fixed noise to the reference, for each k."""

    def __init__(self, teacher: LoadedPipeline, scheduler, prediction_type: str, steps: tuple[int, ...],
                 samples: int, feature: str, folder: Path, seed: int = 0, data: DataConfig | None = None,
                 batch: int = 128, text: TextValidation | None = None, precision: str = "no"):
        if teacher.text_conditioned != (text is not None):
            raise ValueError("a text teacher's validation needs its prompts (TextValidation), and only it")
        self.teacher, self.scheduler, self.prediction_type = teacher, scheduler, prediction_type
        self.steps, self.samples, self.folder, self.data, self.batch = tuple(steps), samples, folder, data, batch
        self.text, self.seed, self.precision = text, seed, precision
        self.feature = validation_feature(feature, teacher)
        self.noise = validation_noise(samples, teacher.latent_shape, seed)
        self._reference: tuple[torch.Tensor, torch.Tensor] | None = None

    @property
    def reference_name(self) -> str:
        return (f"the training images ({self.data.source})" if self.data is not None
                else f"the teacher's DDIM-{REFERENCE_STEPS} samples of the same noise"
                     + (" and prompts" if self.text is not None else ""))

    @property
    def feature_identity(self) -> str:
        """The feature network its FDs are measured in (name and weights), kept with the run's validation record."""
        return f"{self.feature.name} (weights sha256 {self.feature.weights_sha256[:16]})"

    def describe(self) -> dict:
        return {"steps": list(self.steps), "samples": self.samples, "feature": self.feature.name,
                "reference": self.reference_name, **({"prompts": self.text.prompts} if self.text else {})}

    def reference(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and covariance of the reference's features, made once and kept in the run folder (a resumed run
        reads them back instead of paying the 64-step sampling or the image decoding again): the training images'
        through the evaluation's own real-set statistics (their latents, encoded here, for a latent feature), the
        teacher's samples cached here."""
        if self._reference is None and self.data is not None and not self.feature.latents:
            real = load_real_set(self.data.source, self.feature, self.teacher.image_size, self.teacher.image_channels,
                                 self.folder, resize=self.data.resize, convert=self.data.convert)
            self._reference = real.mu, real.sigma
        if self._reference is None:
            path, key = self.folder / REFERENCE_FILE, self._reference_key()
            if path.is_file():
                stored = load_file(str(path))
                if "key" in stored and bytes(stored["key"].tolist()).decode() == key:
                    self._reference = stored["mu"], stored["sigma"]
            if self._reference is None:
                self._reference = gaussian_stats(self._reference_features())
                self.folder.mkdir(parents=True, exist_ok=True)
                save_file({"mu": self._reference[0], "sigma": self._reference[1],
                           "key": torch.tensor(list(key.encode()), dtype=torch.uint8)}, str(path))
        return self._reference

    @torch.no_grad()
    def __call__(self, student: nn.Module, scheduler=None) -> dict[int, float]:
        """FD of ``student``'s k-step samples to the reference, for each k: with its exported scheduler, or with
        ``scheduler`` (a candidate of ``diffkd.sampler_choice``)."""
        scheduler = self.scheduler if scheduler is None else scheduler
        mu, sigma = self.reference()
        model = self.teacher.denoiser.like(student, self.prediction_type)
        was_training = student.training
        student.eval()
        try:
            return {k: frechet_distance(*gaussian_stats(self._features(lambda z, conds, k=k: scheduler_sample(
                model, type(scheduler).from_config(scheduler.config), z, k, conds[1]))), mu, sigma)
                    for k in self.steps}
        finally:
            student.train(was_training)

    def conditions(self, index: int, noise: torch.Tensor) -> tuple[Conditioning | None, ...]:
        """(the teacher's, the student's) conditioning of chunk ``index`` of the validation noise: the same rows and
        the same draws (a w range's w per sample) at every validation; none for an unconditional teacher."""
        if self.text is None:
            return None, None
        start = index * self.batch
        rows = {k: v[start:start + len(noise)].to(noise.device) for k, v in self.text.rows.items()}
        generator = torch.Generator().manual_seed(NOISE_STREAM + self.seed + index)
        return self.text.pair({**rows, "x0": noise}, generator)

    def _features(self, sampler: Callable[[torch.Tensor, tuple], torch.Tensor]) -> torch.Tensor:
        """Features of the sampled latents (decoded to images, unless the feature reads latents)."""
        device = self.teacher.unet.device
        features = []
        for index, chunk in enumerate(self.noise.split(self.batch)):
            z = chunk.to(device)
            with self._autocast(device):
                latents = sampler(z, self.conditions(index, z)).float()
            features.append(self.feature(latents if self.feature.latents else
                                         to_uint8(self.teacher.denoiser.decode(latents))))  # float64, on the CPU
        return torch.cat(features)

    def _autocast(self, device: torch.device):
        """The networks sample under the run's autocast (train.mixed_precision), as they train: train.frozen_dtype
        stores the frozen weights (the teacher, a LoRA student's base) at that dtype while the run trains."""
        return autocast(device.type, self.precision)

    def _reference_key(self) -> str:
        """What the cached reference was made from: the set and feature network (training latents), or the feature,
        the noise and, for text, the prompts, guidance and the batch the conditions are drawn in (a w range draws per
        batch; the teacher's samples; an unconditional run's key is what it always was, so a run resumed across
        versions reuses its cache)."""
        if self.data is not None:
            data = self.data
            return f"{self.feature.name}|{self.feature.weights_sha256}|{data.source}|{data.resize}|{data.convert}"
        key = f"{self.feature.name}|{self.noise.double().sum().item()!r}"
        return key + (f"|{self.text.key}|drawn {self.batch} at once" if self.text else "")

    def _reference_features(self) -> torch.Tensor:
        """The training images' latents (a latent feature) or the teacher's DDIM-64 samples of the same noise."""
        if self.data is not None:
            return self._training_latent_features()
        return self._features(lambda z, conds: ddim_sample(self.teacher.denoiser, z, REFERENCE_STEPS, conds[0]))

    @torch.no_grad()
    def _training_latent_features(self) -> torch.Tensor:
        """Features of the training images' latents, as the teacher's autoencoder encodes them for training."""
        data, teacher = self.data, self.teacher
        images = load_images(data.source, teacher.image_size, teacher.image_channels, data.resize, data.convert)
        device = teacher.unet.device
        return torch.cat([self.feature(teacher.denoiser.encode(chunk.to(device)))
                          for chunk in images.split(self.batch)])


def plot_record(record: dict, label: str, path: Path) -> Path:
    """The validation FD of each k over the run, the exported step marked: where the run peaked, and whether it was
    still improving when it ended (train longer) or had long passed its best (train shorter)."""
    from matplotlib.figure import Figure  # the object API: no pyplot state, no GUI backend

    figure = Figure(figsize=(6, 3.6))
    ax = figure.subplots()
    history = record["history"]
    steps = [h["step"] for h in history]
    for k in history[0]["fd_per_k"]:
        ax.plot(steps, [h["fd_per_k"][k] for h in history], marker="o", label=f"{k} steps")
    best = next(h for h in history if h["step"] == record["best_step"])
    ax.plot([record["best_step"]] * len(best["fd_per_k"]), list(best["fd_per_k"].values()), marker="*",
            markersize=14, linestyle="", label=f"exported: step {record['best_step']}")
    ax.set_xlabel("optimiser step")
    ax.set_ylabel(f"{label} to the reference")
    ax.set_yscale("log")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110, bbox_inches="tight")
    return path
