"""The public entry points: distil (or train) per a Config into an output folder, and load the result.

Everything that can be checked is checked before anything is written: the config, the output folder
(``diffkd.run_folder``), the teacher, the method's own preconditions and the weights the evaluation will need. Then the run writes ``config.yaml``, trains with checkpoints,
exports the pipeline and (for distillation) evaluates it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass, replace
from pathlib import Path

import diffusers
import torch
from accelerate import Accelerator

from diffkd import captioned, checkpoint, run_folder, sampler_choice
from diffkd.conditioning import encode_captions, validation_prompts
from diffkd.config import Config, dump_config
from diffkd.data import check_fit
from diffkd.errors import DiffkdError
from diffkd.eval_options import EvalConfig
from diffkd.evaluation.plan import check_weights, plan_metrics
from diffkd.evaluation.reference import check_reference
from diffkd.evaluation.report import verdict
from diffkd.evaluation.sweep import evaluate, read_card
from diffkd.io import LoadedPipeline, add_card_section, is_local_reference, load_pipeline, save_pipeline
from diffkd.lora import check_lora_run, fused_folder, save_lora_student
from diffkd.methods import Method, method_class
from diffkd.precision import DTYPES
from diffkd.preflight import check_run_options
from diffkd.run_validation import TextValidation, Validator, default_feature, plot_record, references_teacher
from diffkd.students import build_student
from diffkd.trainer import VALIDATION_FIX, Trainer, make_accelerator
from diffkd.weights import file_sha256

log = logging.getLogger(__name__)


def export_folder_name(method: type[Method]) -> str:
    return "student" if method.needs_teacher else "pipeline"


def prepare(config: Config, device: str = "cpu") -> tuple[LoadedPipeline, Method, dict]:
    """Teacher, student and method, with the method's preconditions checked (nothing written)."""
    method_type = method_class(config.method.name)
    if method_type.needs_teacher:
        teacher = load_pipeline(config.teacher.source, device=device,
                                trust_remote_code=config.teacher.trust_remote_code,
                                image_size=config.teacher.image_size)
        teacher.layout.check_guidance(teacher.unet, getattr(config.method, "guidance_scale", 1.0),
                                      getattr(config.method, "guidance", None))
    else:
        teacher = method_type.template(config)
    teacher.unet.requires_grad_(False).eval()
    if config.student.lora is not None:
        check_lora_run(config, teacher)
    student, report = build_student(teacher.unet, config.student, teacher.layout.lora_targets)
    source_prediction = start_from(student, config.student.init_from, device) if config.student.init_from else None
    method = method_type(config, teacher, student.to(device))
    if source_prediction is not None:
        report["init_from"] = config.student.init_from
        if source_prediction != method.prediction_type:
            raise DiffkdError(f"student.init_from={config.student.init_from!r} predicts {source_prediction} but this "
                              f"{method.name} student predicts {method.prediction_type}: start from a student of the "
                              "same parameterisation, or set the method's student_prediction_type to match")
    method.check()
    return teacher, method, report


@contextlib.contextmanager
def frozen_precision(teacher: LoadedPipeline, dtype: str, trained: tuple[torch.nn.Module, ...] = ()):
    """The frozen teacher UNet (the real score), and the frozen base weights of the ``trained`` networks (a LoRA
    student's or LoRA fake score's), stored at ``dtype`` while training, which runs them under autocast; their
    adapters and every trained weight keep fp32. fp32 again before and after, where the teacher runs outside
    autocast (a teacher-sample cache, a fused LoRA export, the evaluation)."""
    if dtype == "no":
        yield
        return
    frozen = [p for module in trained for p in module.parameters() if not p.requires_grad]
    low = DTYPES[dtype]
    teacher.unet.to(low)
    for parameter in frozen:
        parameter.data = parameter.data.to(low)
    try:
        yield
    finally:
        teacher.unet.to(torch.float32)
        for parameter in frozen:
            parameter.data = parameter.data.float()


def start_from(student: torch.nn.Module, source: str, device: str) -> str:
    """The copy student takes the UNet weights of pipeline ``source`` (``student.init_from``) in place of the
    teacher's; returns what that UNet predicts, which must be what the method trains the student to predict."""
    pipeline = load_pipeline(source, device=device)
    try:
        student.load_state_dict(pipeline.unet.state_dict())
    except RuntimeError as error:
        raise DiffkdError(f"student.init_from={source!r}: its UNet does not fit the teacher's "
                          f"({str(error).splitlines()[-1].strip()}); it takes a student of this teacher, such as a "
                          "distilled run's student/ folder") from None
    return pipeline.denoiser.prediction_type


def evaluation_options(config: Config, **fields) -> EvalConfig:
    """The config's ``eval`` section as the evaluation after training runs it: a text teacher is evaluated on the
    training prompts unless the section names its own."""
    return replace(config.eval, prompts=config.eval.prompts or config.data.prompts,
                   prompts_file=config.eval.prompts_file or config.data.prompts_file, **fields)


def check_evaluation(config: Config, teacher: LoadedPipeline) -> None:
    """The evaluation that follows training needs weights that cannot be downloaded offline (Inception, LPIPS's
    backbone, CLIP): find them now, so a missing file costs seconds, not the night of training before it."""
    options = evaluation_options(config)
    plan = plan_metrics(options, has_teacher=True, text_conditioned=teacher.text_conditioned,
                        has_prompts=bool(options.prompts or options.prompts_file))
    check_reference(options.reference, plan.feature, teacher.image_size, teacher.image_channels)
    check_weights(options, plan, "in the evaluation after training")


@dataclass
class Start:
    """What the checks before a run produce: everything the run needs, nothing written yet."""

    accelerator: Accelerator
    teacher: LoadedPipeline
    method: Method
    report: dict
    trainer: Trainer
    teacher_facts: dict
    resumed_other: dict | None
    chooser: Validator | None  # scores the export's candidate samplers (diffkd.sampler_choice)


def check_start(config: Config, output: Path, resume: bool | str | Path, overwrite: bool, from_other: bool) -> Start:
    """Every check a run makes before it writes (config, output folder, the checkpoint to resume and whose it is,
    teacher, method, options, evaluation weights); ``distill`` and ``validate`` (``--dry-run``) share it."""
    run_folder.check_output(output, bool(resume), overwrite)
    resume_from = run_folder.resume_point(output, resume)
    if resume:
        run_folder.check_resumable_config(config, output)
    accelerator = make_accelerator(config.train, output)
    torch.manual_seed(config.train.seed)
    teacher, method, report = prepare(config, accelerator.device)
    facts = teacher_record(config.teacher.source) if method.needs_teacher else {"teacher": "trained from scratch"}
    identity = run_folder.run_identity(config, output, facts)
    resumed_other = (run_folder.check_checkpoint_owner(resume_from, output, identity, from_other)
                     if resume_from is not None else None)
    check_run_options(config, teacher, method)
    if config.run_eval and method.needs_teacher:
        if not teacher.layout.evaluated:
            raise DiffkdError(f"the evaluation after training does not sample {type(teacher.pipeline).__name__} yet: "
                              "set run_eval=false, and sample the exported student with that pipeline class")
        check_evaluation(config, teacher)
    trainer = Trainer(method, config.train, output, accelerator, identity)
    trainer.validator = make_validator(config, teacher, method, output)
    chooser = make_chooser(config, teacher, method, output, trainer.validator)
    if resume_from is not None:
        trainer.restore(resume_from)
    return Start(accelerator, teacher, method, report, trainer, facts, resumed_other, chooser)


def validate(config: Config, output: str | Path, resume: bool | str | Path = False, overwrite: bool = False,
             from_other: bool = False) -> None:
    """``--dry-run``: every check a real run makes before its work (the teacher loads, the data set's images are
    readable and fit it, the options fit the teacher and method), writing nothing. The data set is checked image
    by image rather than built, since building it may sample the teacher for hours (a teacher-sample cache)."""
    start = check_start(config, Path(output), resume, overwrite, from_other)
    data, teacher = config.data, start.teacher
    check_fit(data.source, teacher.image_size, teacher.image_channels, data.resize, data.convert, "data.source",
              "use images of the teacher's size and colour, or set data.resize=true and/or data.convert=true")


def distill(config: Config, output: str | Path, resume: bool | str | Path = False, overwrite: bool = False,
            from_other: bool = False) -> Path:
    """Run ``config`` into ``output``; return the exported pipeline folder.

    Everything that can fail on bad input (config, output folder, teacher, data, the checkpoint to resume)
    is checked before the first byte is written. ``resume=True`` continues from the newest complete checkpoint,
    or starts from step 0 if the folder holds none yet (a job killed early, or a first run under a scheduler
    that always passes --resume); ``resume=PATH`` continues from that checkpoint, which must be this run's unless
    ``from_other`` (``--resume-from-other``): then the model card names the run it came from.
    """
    output = Path(output)
    start = check_start(config, output, resume, overwrite, from_other)
    accelerator, teacher, method, report, trainer = (start.accelerator, start.teacher, start.method, start.report,
                                                     start.trainer)
    trainer.load_data()
    accelerator.wait_for_everyone()  # every rank has checked everything before rank 0 writes

    main = accelerator.is_main_process
    if main:
        output.mkdir(parents=True, exist_ok=True)
    with run_folder.run_lock(output, main):
        if main:
            if overwrite:
                run_folder.clear(output)
            (output / run_folder.CONFIG_FILE).write_text(dump_config(config))
            trainer.trim_logs()
        accelerator.wait_for_everyone()
        started = time.perf_counter()
        with frozen_precision(teacher, config.train.frozen_dtype, trainer.trained_networks()):
            progress = trainer.fit()
        folder = output / export_folder_name(type(method))
        student = trainer.exported_network()
        if main:
            spec = method.export_spec()
            if trainer.best_weights:  # the best validated weights, not the last ones
                checkpoint.load_network_state(student, trainer.best_weights)
            choice, chooser = None, start.chooser
            if chooser is not None:
                with trainer.fits(f"the sampler choice at the run's end ({config.train.validate_batch_size} noises "
                                  "at once)", VALIDATION_FIX):
                    spec, choice = sampler_choice.choose(spec, lambda scheduler: chooser(student, scheduler),
                                                         validated_scores(progress.validation, chooser, trainer))
            trainer.write_summary({"sampler_choice": choice} if choice else {})
            card = model_card(config, method, spec, report, student, teacher,
                              sum(progress.round_seconds.values()) or time.perf_counter() - started,
                              start.teacher_facts, start.resumed_other)
            if trainer.validator is not None and progress.validation:
                card["validation"] = validation_card(trainer.validator, progress.validation)
            if choice:
                card["sampler_choice"] = {"exported": choice["exported"], "steps": list(chooser.steps),
                                          "fd": {name: round(fd, 4) for name, fd in choice["fd"].items()}}
            skipped = getattr(trainer.data, "skipped", 0)
            if skipped:
                card["data_rows_skipped"] = skipped  # data.skip_bad_rows: unreadable rows left out
            lora = config.student.lora
            shutil.rmtree(folder, ignore_errors=True)  # a half-written export of a killed job
            if lora is None:
                save_pipeline(folder, teacher, student, spec.scheduler, card, spec.component or teacher.component)
            else:
                shutil.rmtree(fused_folder(folder), ignore_errors=True)
                save_lora_student(folder, teacher, student, spec.scheduler, card, lora.fuse)
            log.info("saved %s", folder)
            if "validation" in card:
                add_validation_section(folder, trainer.validator, progress.validation, output / "validation")
            if choice:
                add_sampler_section(folder, chooser, choice)
            if config.run_eval and method.needs_teacher:
                evaluated = folder if lora is None else fused_folder(folder)
                run_evaluation(config, evaluated, output / "eval", str(accelerator.device))
            checkpoint.prune(output / "checkpoints", config.train.keep_checkpoints)  # a resume may have lowered it
            (output / run_folder.FINISHED_MARKER).write_text(json.dumps({"pipeline": str(folder)}))
        accelerator.wait_for_everyone()
    accelerator.end_training()  # last: it also tears down the process group of a multi-process run
    return folder


def make_validator(config: Config, teacher: LoadedPipeline, method: Method, output: Path) -> Validator | None:
    """The in-run validation ``train.validate_every`` asks for, scoring k-step samples of the exported scheduler."""
    train = config.train
    if train.validate_every == 0:
        return None
    if not method.needs_teacher:
        raise DiffkdError(f"train.validate_every scores a student against its teacher; this {config.method.name} "
                          "run has no teacher: set it to 0")
    return scoring(config, teacher, method, method.export_spec(), output)


def validated_scores(record: dict, validator: Validator, trainer: Trainer) -> dict[int, float] | None:
    """The exported weights' FD at each k under their own scheduler, where in-run validation measured it: the best
    validated weights are the exported ones, scored by the same validator (None when the run validated nothing)."""
    if validator is not trainer.validator or record.get("best_step") is None:
        return None
    best = next(entry for entry in record["history"] if entry["step"] == record["best_step"])
    return {int(k): fd for k, fd in best["fd_per_k"].items()}


def make_chooser(config: Config, teacher: LoadedPipeline, method: Method, output: Path,
                 validator: Validator | None = None) -> Validator | None:
    """The validator of the sampler choice at the run's end (``diffkd.sampler_choice``), where the method offers
    several schedulers and the teacher is unconditional (a text teacher's student keeps its method's scheduler):
    the in-run ``validator`` when there is one (the same settings, its reference already made), else its like."""
    if not method.needs_teacher or teacher.text_conditioned:
        return None
    spec = method.export_spec()
    if not spec.alternatives:
        return None
    return validator or scoring(config, teacher, method, spec, output)


def scoring(config: Config, teacher: LoadedPipeline, method: Method, spec, output: Path) -> Validator:
    """A Validator of ``spec``'s student with the ``train.validate_*`` settings (k, noise, reference, feature); a
    text teacher's samples are drawn for the run's own prompts, conditioned as ``method`` conditions them."""
    train = config.train
    if train.validate_reference == "data" and captioned.kind_of(config.data.source) is not None:
        raise DiffkdError(f"train.validate_reference=data reads the training images into memory, and "
                          f"{config.data.source!r} is a streamed set: set train.validate_reference=teacher")
    data = None if references_teacher(config) else config.data
    feature = train.validate_feature
    if feature == "auto":
        feature = default_feature(teacher.image_channels, config.data.source, teacher.latent)
    return Validator(teacher, spec.scheduler, spec.prediction_type,
                     tuple(train.validate_steps) or (spec.num_inference_steps,), train.validate_samples, feature,
                     output / "validation", train.seed, data, train.validate_batch_size,
                     text=text_validation(config, teacher, method) if teacher.text_conditioned else None,
                     precision=train.mixed_precision)


def text_validation(config: Config, teacher: LoadedPipeline, method: Method) -> TextValidation:
    """A text teacher's validation prompts (the run's own, ``validation_prompts``), encoded once."""
    prompts, source = validation_prompts(config.data, config.train.validate_samples)
    options = config.method
    guidance = getattr(options, "guidance", None)
    key = hashlib.sha256("\n".join(prompts).encode()).hexdigest()[:16]
    key += f"|w={getattr(options, 'guidance_scale', 1.0)}|{guidance}"
    return TextValidation(encode_captions(teacher, prompts), method.conditioning, source, key)


def validation_card(validator: Validator, record: dict) -> dict:
    """Which step was exported and why: its validation FDs, against the last one's and the record's size."""
    history = record["history"]
    exported = next(h for h in history if h["step"] == record["best_step"])
    return {**validator.describe(), "exported_step": record["best_step"],
            "exported_fd": {k: round(fd, 4) for k, fd in exported["fd_per_k"].items()},
            "last_step": history[-1]["step"], "last_fd": {k: round(fd, 4) for k, fd in history[-1]["fd_per_k"].items()},
            "validations": len(history), "stopped_early": record["stopped_early"]}


def add_validation_section(folder: Path, validator: Validator, record: dict, plots: Path) -> None:
    """The model card's validation curve and what it chose."""
    curve = plot_record(record, validator.feature.label, plots / "curve.png")
    link = os.path.relpath(curve, folder)
    card = validation_card(validator, record)

    def fds(per_k: dict) -> str:
        return ", ".join(f"{fd:.4g} at {k} steps" for k, fd in per_k.items())

    summary = (f"Exported: step {record['best_step']} of {card['last_step']}, the least geometric mean over k of the "
               f"{validator.feature.label} of {validator.samples} samples to {validator.reference_name}: "
               f"{fds(card['exported_fd'])} (the last of {card['validations']} validations: {fds(card['last_fd'])}).")
    add_card_section(folder / "README.md", "Validation during training", [summary, "", f"![validation]({link})"])


def add_sampler_section(folder: Path, validator: Validator, choice: dict) -> None:
    """The model card's record of the schedulers the run scored and the one it exports."""
    scores = ", ".join(f"{name} {fd:.4g}" for name, fd in sorted(choice["fd"].items(), key=lambda item: item[1]))
    steps = ", ".join(map(str, validator.steps))
    kept = ("" if choice["exported"] == choice["own"] else
            f", in place of the method's {choice['own']} (replaced only by one more than "
            f"{1 - sampler_choice.MARGIN:.0%} better)")
    add_card_section(folder / "README.md", "Sampler", [(
        f"Exported with {choice['exported']}{kept}. Scored on the exported weights by the geometric mean over "
        f"k = {steps} sampling steps of the {validator.feature.label} of {validator.samples} samples to "
        f"{validator.reference_name}: {scores}.")])


def model_card(config: Config, method: Method, spec, report: dict, student: torch.nn.Module,
               teacher: LoadedPipeline, seconds: float, teacher_facts: dict, resumed_other: dict | None = None
               ) -> dict:
    """Front-matter facts a user (or the Hub) needs to know what this student is, and, for a run continued from
    another run's checkpoint (``--resume-from-other``), that run."""
    return {
        **teacher_facts,
        **({"resumed_from_other_run": resumed_other} if resumed_other else {}),
        "method": method.name,
        "num_inference_steps": spec.num_inference_steps,
        "prediction_type": spec.prediction_type,
        "noise_path": teacher.denoiser.path.card(),
        "timesteps": sampled_timesteps(spec.scheduler, spec.num_inference_steps),
        "training_time_seconds": round(seconds, 1),
        "parameters": sum(p.numel() for p in student.parameters()),
        "teacher_parameters": sum(p.numel() for p in teacher.unet.parameters()),
        "student_architecture": report,
        **spec.card,
        "schedulers": scheduler_record(spec),
        "diffkd_config": json.loads(json.dumps(config.to_dict(), default=str)),
        "library_versions": {"diffusers": str(diffusers.__version__), "torch": str(torch.__version__)},
    }


def sampled_timesteps(scheduler, k: int) -> list[float]:
    """The timesteps the exported scheduler runs at the card's k (the network's time input, sigma * T for flow)."""
    fresh = type(scheduler).from_config(scheduler.config)
    fresh.set_timesteps(k)
    return [round(float(t), 3) for t in fresh.timesteps]


def scheduler_record(spec) -> dict:
    """Which schedulers the student may be sampled with: its own, those measured to work as swaps, no other."""
    return {"exported": type(spec.scheduler).__name__, "also_works": list(spec.also_samples_with),
            "others": "not supported: a swap may give noise (eval/RESULTS.md, 'Scheduler swaps')"}


def teacher_record(source: str) -> dict:
    """The teacher as its hub id, or as a local path with a content hash (a folder can change under its name),
    and the license of its own model card when it states one."""
    if not is_local_reference(source):
        return {"teacher": source}
    folder = Path(source).expanduser().resolve()
    digest = hashlib.sha256()
    for file in sorted(p for p in folder.rglob("*") if p.is_file() and p.name != "README.md"):
        digest.update(f"{file.relative_to(folder)}:{file_sha256(str(file))}\n".encode())
    record = {"teacher": str(folder), "teacher_sha256": digest.hexdigest()}
    license_ = read_card(str(folder)).get("license")
    return {**record, "license": license_} if license_ else record


def run_evaluation(config: Config, student: Path, output: Path, device: str) -> None:
    """Evaluate the exported student against its teacher with the config's ``eval`` section; a text teacher is
    evaluated on the training prompts unless the section names its own."""
    results = evaluate(evaluation_options(config, pipelines=[str(student)], teacher=config.teacher.source,
                                          output=str(output), device=device))
    report = os.path.relpath(output / "report.html", student)
    add_card_section(student / "README.md", "Evaluation",
                     [*verdict(results.to_dict()), "", f"Full report: [{report}]({report})"])


def load_student(folder: str | Path, device: str = "cpu") -> diffusers.DiffusionPipeline:
    """A student folder as a ready diffusers pipeline (plain ``DiffusionPipeline.from_pretrained`` works too)."""
    return load_pipeline(str(folder), device=device).pipeline
