"""The network passes of one optimiser step of each method, as the memory plan replays them.

A step's peak memory is set by which networks sit on the device (trained, frozen, followers), which are trained
(gradients and Adam moments), and the order and kind of the passes: a pass with gradient keeps its activations
until the backward, a pass without frees them as it goes, so a no-grad pass taken after a grad pass stacks on top
of the saved activations. ``step_spec`` reads that structure off a method's options, pass for pass as its
``loss`` runs them (the methods' docstrings say why each pass is there); ``diffkd.plan`` replays it on real-size
networks under fake tensors. That it matches the methods' code is measured, not assumed: tests/test_plan.py and
eval/plan_check.py hold the plan against the real step's tracked peak on models small enough to run.
"""

from __future__ import annotations

from dataclasses import dataclass, field

STUDENT, TEACHER, TARGET, FAKE = "student", "teacher", "target", "fake_score"


@dataclass(frozen=True)
class Pass:
    """One pass of ``network`` on ``batch_factor`` x the update's batch (2 for a classifier-free guided pass), with
    gradient (its activations kept for the backward) or without."""

    network: str
    grad: bool
    batch_factor: int = 1


@dataclass
class PhaseSpec:
    name: str
    trained: tuple[str, ...]
    passes: list[Pass]
    repeats: int = 1


@dataclass
class StepSpec:
    """Networks on the device: ``trained`` (name -> LoRA rank, 0 for a whole network), ``frozen`` and
    ``followers`` (EMA target copies of a trained network), and the phases of one optimiser step."""

    trained: dict[str, int]
    frozen: tuple[str, ...]
    followers: dict[str, str] = field(default_factory=dict)
    phases: list[PhaseSpec] = field(default_factory=list)


def guided_batch_factor(scale: float) -> int:
    """A teacher pass guided at ``scale`` runs the conditional and unconditional rows at once."""
    return 2 if scale != 1.0 else 1


def step_spec(method: str, options, student_lora_rank: int = 0) -> StepSpec:
    """The step of ``method`` with ``options`` (its MethodConfig); ``student_lora_rank`` > 0: the student is
    adapters of that rank on a frozen copy of the teacher (its base weights counted with it)."""
    if method == "progressive":
        cfg = guided_batch_factor(getattr(options, "guidance_scale", 1.0))
        # the round teacher's two DDIM steps (imitation: one), then the student's pass with gradient
        passes = [Pass(TEACHER, False, cfg), Pass(TEACHER, False, cfg), Pass(STUDENT, True)]
        return StepSpec({STUDENT: student_lora_rank}, (TEACHER,), phases=[PhaseSpec("student", (STUDENT,), passes)])
    if method == "consistency":
        cfg = guided_batch_factor(options.guidance_scale)
        teacher = [Pass(TEACHER, False, cfg)] * (1 if options.solver == "ddim" else 2)
        target = TARGET if options.target_ema > 0 else STUDENT
        passes = [*teacher, Pass(target, False), Pass(STUDENT, True)]
        followers = {TARGET: STUDENT} if options.target_ema > 0 else {}
        return StepSpec({STUDENT: student_lora_rank}, (TEACHER,), followers,
                        [PhaseSpec("student", (STUDENT,), passes)])
    if method == "dmd":
        cfg = guided_batch_factor(options.guidance_scale)
        steps = options.student_steps if options.backward_simulation == "unrolled" else 1
        # the fake score denoises the generator's sample (backward simulation without gradient)
        fake = [*[Pass(STUDENT, False)] * steps, Pass(FAKE, True)]
        # the generator's sample with gradient (every step when unrolled), the real and fake scores without
        generator = [*[Pass(STUDENT, True)] * steps, Pass(TEACHER, False, cfg), Pass(FAKE, False)]
        return StepSpec({STUDENT: student_lora_rank, FAKE: options.fake_score_lora_rank}, (TEACHER,),
                        phases=[PhaseSpec("fake_score", (FAKE,), fake, options.fake_updates),
                                PhaseSpec("generator", (STUDENT,), generator)])
    raise ValueError(f"no memory plan for method {method!r}: plan progressive, consistency or dmd")
