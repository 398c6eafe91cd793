"""The public entry points: distil (or train) per a Config into an output folder, and load the result.

Everything that can be checked is checked before anything is written: the config, the output folder
(``diffkd.run_folder``), the teacher, the method's own preconditions and the weights the evaluation will need. Then the run writes ``config.yaml``, trains with checkpoints,
exports the pipeline and (for distillation) evaluates it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from dataclasses import replace
from pathlib import Path

import diffusers
import torch

from diffkd import checkpoint, run_folder
from diffkd.config import Config, dump_config
from diffkd.errors import DiffkdError
from diffkd.eval_options import EvalConfig
from diffkd.evaluation.plan import check_weights, plan_metrics
from diffkd.evaluation.reference import check_reference
from diffkd.evaluation.report import verdict
from diffkd.evaluation.sweep import evaluate, read_card
from diffkd.io import LoadedPipeline, add_card_section, is_local_reference, load_pipeline, save_pipeline
from diffkd.lora import check_lora_run, fused_folder, save_lora_student
from diffkd.methods import Method, method_class
from diffkd.students import build_student
from diffkd.trainer import Trainer, make_accelerator
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


def distill(config: Config, output: str | Path, resume: bool | str | Path = False, overwrite: bool = False
            ) -> Path:
    """Run ``config`` into ``output``; return the exported pipeline folder.

    Everything that can fail on bad input (config, output folder, teacher, data, the checkpoint to resume)
    is checked before the first byte is written. ``resume=True`` continues from the newest complete checkpoint,
    or starts from step 0 if the folder holds none yet (a job killed early, or a first run under a scheduler
    that always passes --resume); ``resume=PATH`` continues from that checkpoint.
    """
    output = Path(output)
    run_folder.check_output(output, bool(resume), overwrite)
    resume_from = run_folder.resume_point(output, resume)
    if resume:
        run_folder.check_resumable_config(config, output)
    accelerator = make_accelerator(config.train, output)
    torch.manual_seed(config.train.seed)
    teacher, method, report = prepare(config, accelerator.device)
    if config.run_eval and method.needs_teacher:
        if not teacher.layout.evaluated:
            raise DiffkdError(f"the evaluation after training does not sample {type(teacher.pipeline).__name__} yet: "
                              "set run_eval=false, and sample the exported student with that pipeline class")
        check_evaluation(config, teacher)
    trainer = Trainer(method, config.train, output, accelerator)
    if resume_from is not None:
        trainer.restore(resume_from)
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
        progress = trainer.fit()
        trainer.write_summary()
        folder = output / export_folder_name(type(method))
        if main:
            spec = method.export_spec()
            student = accelerator.unwrap_model(trainer.student)
            card = model_card(config, method, spec, report, student, teacher,
                              sum(progress.round_seconds.values()) or time.perf_counter() - started)
            lora = config.student.lora
            shutil.rmtree(folder, ignore_errors=True)  # a half-written export of a killed job
            if lora is None:
                save_pipeline(folder, teacher, student, spec.scheduler, card, spec.component or teacher.component)
            else:
                shutil.rmtree(fused_folder(folder), ignore_errors=True)
                save_lora_student(folder, teacher, student, spec.scheduler, card, lora.fuse)
            log.info("saved %s", folder)
            if config.run_eval and method.needs_teacher:
                evaluated = folder if lora is None else fused_folder(folder)
                run_evaluation(config, evaluated, output / "eval", str(accelerator.device))
            checkpoint.prune(output / "checkpoints", config.train.keep_checkpoints)  # a resume may have lowered it
            (output / run_folder.FINISHED_MARKER).write_text(json.dumps({"pipeline": str(folder)}))
        accelerator.wait_for_everyone()
    accelerator.end_training()  # last: it also tears down the process group of a multi-process run
    return folder


def model_card(config: Config, method: Method, spec, report: dict, student: torch.nn.Module,
               teacher: LoadedPipeline, seconds: float) -> dict:
    """Front-matter facts a user (or the Hub) needs to know what this student is."""
    return {
        **(teacher_record(config.teacher.source) if method.needs_teacher else {"teacher": "trained from scratch"}),
        "method": method.name,
        "num_inference_steps": spec.num_inference_steps,
        "prediction_type": spec.prediction_type,
        "noise_path": teacher.denoiser.path.card(),
        "scheduler": type(spec.scheduler).__name__,
        "timesteps": sampled_timesteps(spec.scheduler, spec.num_inference_steps),
        "training_time_seconds": round(seconds, 1),
        "parameters": sum(p.numel() for p in student.parameters()),
        "teacher_parameters": sum(p.numel() for p in teacher.unet.parameters()),
        "student_architecture": report,
        **spec.card,
        "diffkd_config": json.loads(json.dumps(config.to_dict(), default=str)),
        "library_versions": {"diffusers": str(diffusers.__version__), "torch": str(torch.__version__)},
    }


def sampled_timesteps(scheduler, k: int) -> list[float]:
    """The timesteps the exported scheduler runs at the card's k (the network's time input, sigma * T for flow)."""
    fresh = type(scheduler).from_config(scheduler.config)
    fresh.set_timesteps(k)
    return [round(float(t), 3) for t in fresh.timesteps]


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
