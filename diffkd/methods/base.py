"""What every method is: a small object that names its trainable networks and computes one batch's loss.

The trainer drives ``rounds()``, calls ``begin_round`` at each round's start, and in each optimiser step runs the
method's ``phases()`` in order, calling ``loss(phase, batch, generator)`` for each update and ``after_step`` once
the step is done; it never knows which method it runs. It owns every optimiser, the gradient accumulation,
clipping, the non-finite policy, the export EMA, checkpoints and resume, for all networks alike. A method never
knows about accelerate: its networks are plain modules, used as such in ``loss``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from diffkd.conditioning import batch_conditioning
from diffkd.config import Config, MethodConfig
from diffkd.errors import DiffkdError
from diffkd.io import LoadedPipeline
from diffkd.losses.terms import LossTerms
from diffkd.models import Conditioning


@dataclass
class Round:
    """A stretch of training with its own optimiser state and LR schedule (a halving, for progressive).

    ``loss_falls``: whether a working round's headline loss falls, so the round-health check can judge it; False
    where the loss measures a moving target (DMD's generator against its fake score, a GAN's, consistency's against
    its target network)."""

    name: str
    num_steps: int
    loss_falls: bool = True


@dataclass
class Network:
    """A trainable network and its optimiser settings (None: the ``train`` section's value).

    ``exported``: the one network saved as the pipeline's UNet (the student). ``export_ema``: the export EMA
    (``train.ema_decay``) follows it and replaces its weights at each round's end.
    """

    module: nn.Module
    learning_rate: float | None = None
    adam_betas: tuple[float, float] | None = None
    weight_decay: float | None = None
    exported: bool = False
    export_ema: bool = False


@dataclass
class Phase:
    """Part of one optimiser step: ``repeats`` updates of ``networks``, each from its own ``Method.loss(name, ...)``
    (e.g. DMD2's two-time-scale rule: a "critic" phase of 5 updates, then a "student" phase of 1). Each update has
    its own batch, gradient clipping (None: ``train.grad_clip``) and finite checks; a network is in one phase."""

    name: str
    networks: tuple[str, ...]
    repeats: int = 1
    grad_clip: float | None = None


@dataclass
class ExportSpec:
    """How the trained student is saved: its scheduler, its step count, model-card facts and the pipeline component
    it becomes (None: the teacher's network, a UNet or a transformer; "vae" for a stage that trains a pipeline's
    autoencoder)."""

    scheduler: object
    num_inference_steps: int
    prediction_type: str
    card: dict = field(default_factory=dict)
    component: str | None = None
    # Scheduler classes besides the exported one that were measured to sample this kind of student well when built
    # with ``from_config`` of its scheduler (eval/RESULTS.md, "Scheduler swaps"); the model card names them and
    # warns off the rest, since a swap that looks harmless can give noise (Euler on a consistency student).
    also_samples_with: tuple[str, ...] = ()
    # The same student exported with another scheduler, by class name: a run with a validator scores each at its
    # end and exports one only when it is clearly better than this spec's (``diffkd.sampler_choice``).
    alternatives: dict[str, ExportSpec] = field(default_factory=dict)


class Method:
    """Base class; subclasses set ``config_class`` and ``name`` and implement ``dataset``, ``rounds``, ``loss`` and
    ``export_spec``; a method with more than the student to train also overrides ``networks`` and ``phases``."""

    name: str = ""
    config_class: type[MethodConfig] = MethodConfig
    needs_teacher: bool = True
    # Whether training reads data.prompts even where the data set brings its own captions (a teacher-sample cache
    # drawn from prompts, say); otherwise such prompts are refused as unused (diffkd.preflight).
    reads_data_prompts: bool = False

    def __init__(self, config: Config, teacher: LoadedPipeline, student: nn.Module):
        self.config = config
        self.options = config.method
        self.teacher = teacher
        self.student = student

    @property
    def prediction_type(self) -> str:
        """The student's parameterisation: the method's ``student_prediction_type``; 'teacher' (or a method
        without that option) keeps the teacher's, 'auto' is the noise path's choice for a few-step student
        (``NoisePath.few_step_prediction_type``) but the teacher's for a LoRA student, whose adapters users load onto
        the teacher's own pipeline (LCM-LoRA). On a rectified-flow path 'v_prediction' is the path's velocity
        (flow): the rectified-flow schedulers a flow student exports with sample nothing else."""
        chosen = getattr(self.options, "student_prediction_type", "teacher")
        teacher = self.teacher.denoiser
        if chosen == "teacher":
            return teacher.prediction_type
        if chosen == "auto":  # a LoRA student's adapters load onto the teacher's pipeline, read by its scheduler
            if self.config.student.lora is not None:
                return teacher.prediction_type
            return teacher.path.few_step_prediction_type(teacher.prediction_type)
        if chosen == "v_prediction" and "flow" in teacher.path.prediction_types:
            return "flow"
        if chosen not in teacher.path.prediction_types:
            raise DiffkdError(f"method.student_prediction_type={chosen} cannot be sampled on the teacher's "
                              f"{teacher.path.family} path; use one of {', '.join(teacher.path.prediction_types)} "
                              "or 'teacher'")
        return chosen

    def check(self) -> None:
        """Refuse, before any work, a config this teacher cannot be distilled with (raise DiffkdError)."""

    def dataset(self) -> dict[str, torch.Tensor]:
        """Training rows as tensors of equal length, or a diffkd.streaming.StreamedRows for a set read from disk as
        it is drawn; the trainer draws batches of rows from them either way."""
        raise NotImplementedError

    def rounds(self) -> list[Round]:
        raise NotImplementedError

    def begin_round(self, index: int) -> None:
        """Called when round ``index`` starts fresh (not when it is resumed mid-way)."""

    def networks(self) -> dict[str, Network]:
        """Every trainable network by name; built once (in ``__init__``), the same modules at every call."""
        return {"student": Network(self.student, exported=True, export_ema=True)}

    def phases(self) -> list[Phase]:
        """The updates of one optimiser step, in order; by default one update of every network."""
        return [Phase("student", tuple(self.networks()))]

    def followers(self) -> dict[str, nn.Module]:
        """Frozen networks that ``after_step`` updates from the trained ones (a consistency model's target network);
        checkpoints save and restore them."""
        return {}

    def loss(self, phase: str, batch: dict[str, torch.Tensor], generator: torch.Generator) -> LossTerms:
        """The loss of one update of ``phase`` on ``batch``; all randomness is drawn from ``generator``."""
        raise NotImplementedError

    def after_step(self) -> None:
        """Called after every completed optimiser step (all phases applied, the export EMA updated)."""

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """Tensors a resumed run needs that are not the student's (a round's frozen teacher, say)."""
        return {}

    def load_state_tensors(self, index: int, tensors: dict[str, torch.Tensor]) -> None:
        """Restore what ``state_tensors`` saved, for a run resumed inside round ``index``."""

    def conditioning(self, batch: dict[str, torch.Tensor], generator: torch.Generator
                     ) -> tuple[Conditioning, Conditioning]:
        """(the teacher's conditioning, the student's) of a batch of text rows: the teacher guided at
        ``method.guidance_scale``, the student one unguided pass (the guidance is distilled into it). In-run
        validation samples both with it; a method whose student takes w otherwise overrides it."""
        cond = batch_conditioning(batch, getattr(self.options, "guidance_scale", 1.0))
        return cond, cond.unguided()

    def export_spec(self) -> ExportSpec:
        raise NotImplementedError
