"""The public entry points: distil (or train) per a Config into an output folder, and load the result.

Everything that can be checked is checked before anything is written: the config, the output folder, the
teacher and the method's own preconditions. Then the run writes ``config.yaml``, trains with checkpoints,
exports the pipeline and (for distillation) evaluates it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import socket
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import diffusers
import torch
import yaml

from diffkd import checkpoint
from diffkd.config import Config, dump_config
from diffkd.errors import DiffkdError
from diffkd.io import LoadedPipeline, load_pipeline, save_pipeline
from diffkd.methods import METHODS, Method
from diffkd.students import build_student
from diffkd.trainer import Trainer, make_accelerator

log = logging.getLogger(__name__)

FINISHED_MARKER = "finished.json"
LOCK_FILE = "run.lock"
CONFIG_FILE = "config.yaml"
# What a run writes into its folder: --overwrite deletes these and nothing else.
RUN_ENTRIES = ("checkpoints", "logs", "student", "pipeline", "eval", CONFIG_FILE, FINISHED_MARKER,
               "training_summary.json", LOCK_FILE)
# Config keys a resumed run may change: they do not touch the trained weights.
RESUMABLE_CHANGES = ("run_eval", "eval.", "train.device", "train.log_every", "train.checkpoint_every",
                     "train.keep_checkpoints", "train.nan_policy", "train.max_skipped_steps")


def export_folder_name(method: type[Method]) -> str:
    return "student" if method.needs_teacher else "pipeline"


def check_output(output: Path, resume: bool, overwrite: bool) -> None:
    """Never silently overwrite a run, never run two jobs in one folder, never start a run that cannot write."""
    if resume and overwrite:
        raise DiffkdError("--resume and --overwrite contradict each other: pass --resume to continue the run in "
                          f"{str(output)!r}, or --overwrite to discard it")
    if output.exists() and not output.is_dir():
        raise DiffkdError(f"--output {str(output)!r} is a file: pass a folder path")
    _check_writable(output)
    holder = lock_holder(output)
    if holder is not None:
        raise DiffkdError(f"{str(output)!r} is in use by a running job ({holder}): wait for it or stop it, then "
                          "--resume; or choose another --output")
    finished = (output / FINISHED_MARKER).exists()
    if finished and not overwrite:
        raise DiffkdError(f"{str(output)!r} holds a finished run: pass --overwrite to start again, or choose "
                          "another --output")
    if has_run(output) and not (resume or overwrite):
        raise DiffkdError(f"{str(output)!r} holds an unfinished run: pass --resume to continue it or --overwrite "
                          "to start again")


def has_run(output: Path) -> bool:
    return any((output / name).exists() for name in ("checkpoints", CONFIG_FILE, FINISHED_MARKER, LOCK_FILE))


def _check_writable(output: Path) -> None:
    """Probe with a real file (os.access says yes to root even on a read-only or immutable folder)."""
    folder = output if output.exists() else next(p for p in output.absolute().parents if p.exists())
    try:
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as error:
        raise DiffkdError(f"--output {str(output)!r} is not writable ({error.strerror}): choose a folder you can "
                          "write to") from None


def _process_start(pid: int) -> str | None:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _boot_id() -> str | None:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return None


def lock_holder(output: Path) -> str | None:
    """Who holds OUTPUT/run.lock, if that job is still alive; None for no lock or a stale one (a killed job)."""
    try:
        lock = json.loads((output / LOCK_FILE).read_text())
    except (OSError, ValueError):
        return None
    pid, host = lock.get("pid"), lock.get("host")
    who = f"pid {pid} on {host}, started {lock.get('started', '?')}"
    if host != socket.gethostname():
        return (f"{who}; it may be alive on that machine: if it is not, delete {str(output / LOCK_FILE)!r}")
    if lock.get("boot_id") and lock.get("boot_id") != _boot_id():
        return None
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return None
    except (PermissionError, TypeError, ValueError):
        return who
    started = lock.get("process_start")
    return None if started and started != _process_start(int(pid)) else who


@contextlib.contextmanager
def run_lock(output: Path, main: bool):
    """OUTPUT/run.lock while the job runs (main process only); a SIGKILL leaves it, and check_output treats a
    lock whose process is gone as stale, so --resume recovers."""
    path = output / LOCK_FILE
    if main:
        holder = lock_holder(output)
        if holder is None:
            path.unlink(missing_ok=True)  # stale: its process is gone
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL)
        except FileExistsError:
            raise DiffkdError(f"{str(output)!r} was just taken by another job ({holder or 'starting'}): "
                              "choose another --output") from None
        with os.fdopen(fd, "w") as handle:
            json.dump({"pid": os.getpid(), "host": socket.gethostname(), "process_start": _process_start(os.getpid()),
                       "boot_id": _boot_id(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}, handle)
    try:
        yield
    finally:
        if main:
            path.unlink(missing_ok=True)


def check_resumable_config(config: Config, output: Path) -> None:
    """A resumed run must train what it started training; only keys in RESUMABLE_CHANGES may differ."""
    saved_file = output / CONFIG_FILE
    if not saved_file.is_file():
        return
    try:
        saved = yaml.safe_load(saved_file.read_text())
    except yaml.YAMLError:
        raise DiffkdError(f"{str(saved_file)!r} is not valid YAML: restore it or start again with --overwrite") from None
    current = yaml.safe_load(dump_config(config))
    changed = [key for key in _diff(saved, current, "") if not key.startswith(RESUMABLE_CHANGES)]
    if changed:
        key = changed[0]
        raise DiffkdError(f"--resume: {key} differs from the run's {str(saved_file)!r} "
                          f"({_lookup(saved, key)!r} there, {_lookup(current, key)!r} now); resume with that config, "
                          "or --overwrite to start again")


def _diff(a, b, prefix: str) -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        return [k for key in sorted(set(a) | set(b), key=str)
                for k in _diff(a.get(key), b.get(key), f"{prefix}{key}.")]
    return [] if a == b else [prefix.rstrip(".")]


def _lookup(data, key: str):
    for part in key.split("."):
        data = data.get(part) if isinstance(data, dict) else None
    return data


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


def check_evaluation(config: Config, teacher: LoadedPipeline) -> None:
    """The evaluation that follows training needs weights that cannot be downloaded offline (Inception, LPIPS's
    backbone, CLIP): find them now, so a missing file costs seconds, not the night of training before it."""
    from diffkd.evaluation.reference import auto_feature, check_reference
    from diffkd.weights import INCEPTION, TORCHVISION, locate_checkpoint, locate_hf_model

    options = config.eval
    feature = auto_feature(options.reference) if options.feature == "auto" else options.feature
    check_reference(options.reference, feature, teacher.image_size, teacher.image_channels)
    if feature == "inception":
        locate_checkpoint(*INCEPTION, options.feature_weights, "FID (Inception) in the evaluation after training",
                          "eval.feature_weights")
    elif feature != "digits-classifier" and not Path(feature).expanduser().is_file():
        raise DiffkdError(f"eval.feature {feature!r} is neither digits-classifier, inception nor a TorchScript file")
    if options.fidelity and options.lpips:
        locate_checkpoint(*TORCHVISION[options.lpips_net], options.lpips_backbone_weights,
                          f"LPIPS ({options.lpips_net}) in the evaluation after training",
                          "eval.lpips_backbone_weights")
    wants_clip = options.clip_score or (options.clip_score is None and teacher.text_conditioned
                                        and (options.prompts or options.prompts_file))
    if wants_clip:
        locate_hf_model(options.clip_model, "CLIPScore in the evaluation after training", "eval.clip_model")


def distill(config: Config, output: str | Path, resume: bool | str | Path = False, overwrite: bool = False
            ) -> Path:
    """Run ``config`` into ``output``; return the exported pipeline folder.

    Everything that can fail on bad input (config, output folder, teacher, data, the checkpoint to resume)
    is checked before the first byte is written. ``resume=True`` continues from the newest complete checkpoint,
    or starts from step 0 if the folder holds none yet (a job killed early, or a first run under a scheduler
    that always passes --resume); ``resume=PATH`` continues from that checkpoint.
    """
    output = Path(output)
    check_output(output, bool(resume), overwrite)
    resume_from = _resume_point(output, resume)
    if resume:
        check_resumable_config(config, output)
    accelerator = make_accelerator(config.train, output)
    torch.manual_seed(config.train.seed)
    teacher, method, report = prepare(config, accelerator.device)
    if config.run_eval and method.needs_teacher:
        check_evaluation(config, teacher)
    trainer = Trainer(method, config.train, output, accelerator)
    if resume_from is not None:
        trainer.restore(resume_from)
    trainer.load_data()
    accelerator.wait_for_everyone()  # every rank has checked everything before rank 0 writes

    main = accelerator.is_main_process
    if main:
        output.mkdir(parents=True, exist_ok=True)
    with run_lock(output, main):
        if main:
            if overwrite:
                for entry in (output / name for name in RUN_ENTRIES if name != LOCK_FILE):
                    if entry.is_dir():
                        shutil.rmtree(entry)
                    else:
                        entry.unlink(missing_ok=True)
            (output / CONFIG_FILE).write_text(dump_config(config))
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
            shutil.rmtree(folder, ignore_errors=True)  # a half-written export of a killed job
            save_pipeline(folder, teacher, student, spec.scheduler, card)
            log.info("saved %s", folder)
            if config.run_eval and method.needs_teacher:
                run_evaluation(config, folder, output / "eval", str(accelerator.device))
            checkpoint.prune(output / "checkpoints", config.train.keep_checkpoints)  # a resume may have lowered it
            (output / FINISHED_MARKER).write_text(json.dumps({"pipeline": str(folder)}))
        accelerator.wait_for_everyone()
    accelerator.end_training()  # last: it also tears down the process group of a multi-process run
    return folder


def _resume_point(output: Path, resume: bool | str | Path) -> Path | None:
    if resume is True:
        found = checkpoint.latest(output / "checkpoints")
        if found is None:
            log.warning("--resume: no complete checkpoint in %s yet; starting from step 0", output / "checkpoints")
        return found
    if resume:
        path = Path(resume)
        if path.is_file():
            raise DiffkdError(f"--resume {str(resume)!r} is a file, not a checkpoint folder: pass one of "
                              f"{output / 'checkpoints'!s}/ckpt-* or --resume alone for the newest")
        if not path.is_dir():
            raise DiffkdError(f"--resume {str(resume)!r}: no such checkpoint folder; pass one of "
                              f"{output / 'checkpoints'!s}/ckpt-* or --resume alone for the newest")
        return path
    return None


def model_card(config: Config, method: Method, spec, report: dict, student: torch.nn.Module,
               teacher: LoadedPipeline, seconds: float) -> dict:
    """Front-matter facts a user (or the Hub) needs to know what this student is."""
    return {
        **(teacher_record(config.teacher.source) if method.needs_teacher else {"teacher": "trained from scratch"}),
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


def teacher_record(source: str) -> dict:
    """The teacher as its hub id, or as a local path with a content hash (a folder can change under its name),
    and the license of its own model card when it states one."""
    from diffkd.evaluation.sweep import read_card
    from diffkd.io import is_local_reference
    from diffkd.weights import file_sha256

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
    from diffkd.evaluation import evaluate

    prompts = config.eval.prompts or config.data.prompts
    prompts_file = config.eval.prompts_file or config.data.prompts_file
    from diffkd.evaluation.report import verdict
    from diffkd.io import add_card_section

    results = evaluate(replace(config.eval, pipelines=[str(student)], teacher=config.teacher.source,
                               output=str(output), device=device, prompts=prompts, prompts_file=prompts_file))
    report = os.path.relpath(output / "report.html", student)
    add_card_section(student / "README.md", "Evaluation",
                     [*verdict(results.to_dict()), "", f"Full report: [{report}]({report})"])


def load_student(folder: str | Path, device: str = "cpu") -> diffusers.DiffusionPipeline:
    """A student folder as a ready diffusers pipeline (plain ``DiffusionPipeline.from_pretrained`` works too)."""
    return load_pipeline(str(folder), device=device).pipeline
