"""What every method is: a small object that computes one batch's loss from (teacher, student, batch).

The trainer drives ``rounds()``, calls ``begin_round`` at each round's start and ``loss`` at each step; it never
knows which method it runs. A method never knows about accelerate: it gets the (possibly wrapped) student as a
plain callable module.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from diffkd.config import Config, MethodConfig
from diffkd.io import LoadedPipeline


@dataclass
class Round:
    """A stretch of training with its own optimiser state and LR schedule (a halving, for progressive)."""

    name: str
    num_steps: int


@dataclass
class LossTerms:
    """Named loss terms (each a scalar) and their weights; ``total`` is the weighted sum that is optimised.
    ``metrics`` are logged beside them (as ``metric/NAME``) but never optimised: diagnostics such as the loss per
    timestep bucket."""

    terms: dict[str, torch.Tensor]
    weights: dict[str, float] = field(default_factory=dict)
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def total(self) -> torch.Tensor:
        return sum(self.weights.get(name, 1.0) * value for name, value in self.terms.items())

    def add(self, name: str, value: torch.Tensor, weight: float = 1.0) -> None:
        self.terms[name] = value
        self.weights[name] = weight

    def logs(self) -> dict[str, float]:
        values = {f"loss/{name}": float(value.detach()) for name, value in self.terms.items()}
        values["loss/total"] = float(self.total.detach())
        values.update({f"metric/{name}": float(value.detach()) for name, value in self.metrics.items()})
        return values


@dataclass
class ExportSpec:
    """How the trained student is saved: its scheduler, its step count and model-card facts."""

    scheduler: object
    num_inference_steps: int
    prediction_type: str
    card: dict = field(default_factory=dict)


class Method:
    """Base class; subclasses set ``config_class`` and ``name`` and implement the four hooks below."""

    name: str = ""
    config_class: type[MethodConfig] = MethodConfig
    needs_teacher: bool = True

    def __init__(self, config: Config, teacher: LoadedPipeline, student: nn.Module):
        self.config = config
        self.options = config.method
        self.teacher = teacher
        self.student = student

    @property
    def prediction_type(self) -> str:
        """The student's parameterisation: the method's ``student_prediction_type``; 'teacher' (or a method
        without that option) keeps the teacher's."""
        chosen = getattr(self.options, "student_prediction_type", "teacher")
        return self.teacher.denoiser.prediction_type if chosen == "teacher" else chosen

    def check(self) -> None:
        """Refuse, before any work, a config this teacher cannot be distilled with (raise DiffkdError)."""

    def dataset(self) -> dict[str, torch.Tensor]:
        """Training rows as tensors of equal length; the trainer draws batches of rows from them."""
        raise NotImplementedError

    def rounds(self) -> list[Round]:
        raise NotImplementedError

    def begin_round(self, index: int) -> None:
        """Called when round ``index`` starts fresh (not when it is resumed mid-way)."""

    def extra_modules(self) -> nn.ModuleDict:
        """Trainable modules that are not exported (e.g. feature projections)."""
        return nn.ModuleDict()

    def loss(self, batch: dict[str, torch.Tensor], student: nn.Module, generator: torch.Generator) -> LossTerms:
        raise NotImplementedError

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """Tensors a resumed run needs that are not the student's (a round's frozen teacher, say)."""
        return {}

    def load_state_tensors(self, index: int, tensors: dict[str, torch.Tensor]) -> None:
        """Restore what ``state_tensors`` saved, for a run resumed inside round ``index``."""

    def export_spec(self) -> ExportSpec:
        raise NotImplementedError
