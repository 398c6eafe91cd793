"""The public entry points: distil (or train) per a Config into an output folder, and load the result.

Everything that can be checked is checked before anything is written: the config, the output folder, the
teacher and the method's own preconditions. Then the run writes ``config.yaml``, trains with checkpoints,
exports the pipeline and (for distillation) evaluates it.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from dataclasses import replace
from pathlib import Path

import diffusers
import torch

from diffkd import checkpoint
from diffkd.config import Config, dump_config
from diffkd.errors import DiffkdError
from diffkd.io import LoadedPipeline, load_pipeline, save_pipeline
from diffkd.methods import METHODS, Method
from diffkd.students import build_student
from diffkd.trainer import Trainer, make_accelerator

log = logging.getLogger(__name__)

FINISHED_MARKER = "finished.json"


def export_folder_name(method: type[Method]) -> str:
    return "student" if method.needs_teacher else "pipeline"


def check_output(output: Path, resume: bool, overwrite: bool) -> None:
    """Never silently overwrite a run; never start a run that cannot write."""
    if output.exists() and not output.is_dir():
        raise DiffkdError(f"--output {str(output)!r} is a file: pass a folder path")
    parent = output if output.exists() else next(p for p in output.absolute().parents if p.exists())
    if not os.access(parent, os.W_OK):
        raise DiffkdError(f"--output {str(output)!r} is not writable: choose a folder you can write to")
    has_run = (output / "checkpoints").exists() or (output / FINISHED_MARKER).exists()
    if has_run and not (resume or overwrite):
        state = "a finished" if (output / FINISHED_MARKER).exists() else "an unfinished"
        raise DiffkdError(f"{str(output)!r} holds {state} run: pass --resume to continue it or --overwrite to "
                          "start again")
    if resume and not has_run:
        raise DiffkdError(f"--resume: {str(output)!r} holds no run to resume; drop --resume to start one")


def prepare(config: Config, device: str = "cpu") -> tuple[LoadedPipeline, Method, dict]:
    """Teacher, student and method, with the method's preconditions checked (nothing written)."""
    method_class = METHODS[config.method.name]
    if method_class.needs_teacher:
        teacher = load_pipeline(config.teacher.source, device=device,
                                trust_remote_code=config.teacher.trust_remote_code)
    else:
        teacher = method_class.template(config)
    teacher.unet.requires_grad_(False).eval()
    student, report = build_student(teacher.unet, config.student)
    method = method_class(config, teacher, student.to(device))
    method.check()
    return teacher, method, report


def distill(config: Config, output: str | Path, resume: bool | str | Path = False, overwrite: bool = False
            ) -> Path:
    """Run ``config`` into ``output``; return the exported pipeline folder."""
    output = Path(output)
    check_output(output, bool(resume), overwrite)
    resume_from = _resume_point(output, resume)
    accelerator = make_accelerator(config.train, output)
    torch.manual_seed(config.train.seed)
    teacher, method, report = prepare(config, accelerator.device)

    if accelerator.is_main_process:
        if overwrite and not resume:
            shutil.rmtree(output, ignore_errors=True)
        output.mkdir(parents=True, exist_ok=True)
        (output / FINISHED_MARKER).unlink(missing_ok=True)
        (output / "config.yaml").write_text(dump_config(config))
    accelerator.wait_for_everyone()

    started = time.perf_counter()
    trainer = Trainer(method, config.train, output, accelerator)
    progress = trainer.fit(resume_from)
    trainer.write_summary()
    folder = output / export_folder_name(type(method))
    if accelerator.is_main_process:
        spec = method.export_spec()
        student = accelerator.unwrap_model(trainer.student)
        card = model_card(config, method, spec, report, student, teacher,
                          sum(progress.round_seconds.values()) or time.perf_counter() - started)
        save_pipeline(folder, teacher, student, spec.scheduler, card)
        (output / FINISHED_MARKER).write_text(json.dumps({"pipeline": str(folder)}))
        log.info("saved %s", folder)
        if config.run_eval and method.needs_teacher:
            run_evaluation(config, folder, output / "eval", str(accelerator.device))
    accelerator.wait_for_everyone()
    return folder


def _resume_point(output: Path, resume: bool | str | Path) -> Path | None:
    if resume is True:
        found = checkpoint.latest(output / "checkpoints")
        if found is None:
            raise DiffkdError(f"--resume: no complete checkpoint in {str(output / 'checkpoints')!r}; "
                              "start again with --overwrite")
        return found
    if resume:
        return Path(resume)
    return None


def model_card(config: Config, method: Method, spec, report: dict, student: torch.nn.Module,
               teacher: LoadedPipeline, seconds: float) -> dict:
    """Front-matter facts a user (or the Hub) needs to know what this student is."""
    return {
        "teacher": config.teacher.source if method.needs_teacher else "trained from scratch",
        "method": method.name,
        "num_inference_steps": spec.num_inference_steps,
        "prediction_type": spec.prediction_type,
        "training_time_seconds": round(seconds, 1),
        "parameters": sum(p.numel() for p in student.parameters()),
        "teacher_parameters": sum(p.numel() for p in teacher.unet.parameters()),
        "student_architecture": report,
        **spec.card,
        "diffkd_config": json.loads(json.dumps(config.to_dict(), default=str)),
        "library_versions": {"diffusers": str(diffusers.__version__), "torch": str(torch.__version__)},
    }


def run_evaluation(config: Config, student: Path, output: Path, device: str) -> None:
    """Evaluate the exported student against its teacher with the config's ``eval`` section."""
    from diffkd.evaluation import evaluate

    evaluate(replace(config.eval, pipelines=[str(student)], teacher=config.teacher.source, output=str(output),
                     device=device))


def load_student(folder: str | Path, device: str = "cpu") -> diffusers.DiffusionPipeline:
    """A student folder as a ready diffusers pipeline (plain ``DiffusionPipeline.from_pretrained`` works too)."""
    return load_pipeline(str(folder), device=device).pipeline
