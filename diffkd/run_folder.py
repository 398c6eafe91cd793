"""A run's folder: who may use it (``run.lock``), whether it may be started, resumed or overwritten, which
checkpoint a resume continues from, and whether that checkpoint is this run's.

Every checkpoint records the run that made it (``run_identity``: the resolved config and the teacher's content
hash). A resume from a checkpoint of another run (another config, teacher or folder) would export that run's
student under this run's card, so it is refused unless ``--resume-from-other`` asks for it, and then the card
names the source run.

Everything here is checked before a run writes its first byte, so a wrong start costs one line, not a
half-overwritten run.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import socket
import tempfile
import time
from pathlib import Path

import yaml

from diffkd import checkpoint
from diffkd.config import Config, dump_config
from diffkd.errors import DiffkdError

log = logging.getLogger(__name__)

FINISHED_MARKER = "finished.json"
LOCK_FILE = "run.lock"
CONFIG_FILE = "config.yaml"
# What a run writes into its folder: --overwrite deletes these and nothing else.
RUN_ENTRIES = ("checkpoints", "logs", "student", "pipeline", "eval", CONFIG_FILE, FINISHED_MARKER,
               "training_summary.json", LOCK_FILE)
# Config keys a resumed run may change: they do not touch the trained weights (gradient checkpointing recomputes the
# same activations: equal gradients up to rounding), so a run that ran out of memory can go on with less.
RESUMABLE_CHANGES = ("run_eval", "eval.", "train.device", "train.log_every", "train.checkpoint_every",
                     "train.keep_checkpoints", "train.nan_policy", "train.max_skipped_steps",
                     "train.gradient_checkpointing", "train.validate_batch_size")


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


def clear(output: Path) -> None:
    """--overwrite: delete what a run wrote (``RUN_ENTRIES``) and nothing else; the lock stays with its holder."""
    for entry in (output / name for name in RUN_ENTRIES if name != LOCK_FILE):
        if entry.is_dir():
            shutil.rmtree(entry)
        else:
            entry.unlink(missing_ok=True)


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


def resume_point(output: Path, resume: bool | str | Path) -> Path | None:
    """The checkpoint a run continues from: the newest complete one (``resume=True``), the one named, or None."""
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


def run_identity(config: Config, output: Path, teacher: dict) -> dict:
    """What makes a run this run, as its checkpoints record it: its folder, resolved config and teacher record
    (hub id, or local path with a content hash)."""
    return {"folder": str(output.resolve()), "config": yaml.safe_load(dump_config(config)), "teacher": teacher}


def identity_differences(recorded: dict, current: dict) -> list[tuple[str, object, object]]:
    """(key, recorded value, current value) for every difference that changes what is trained: the teacher and
    the config keys outside RESUMABLE_CHANGES."""
    teachers = _teacher_key(recorded.get("teacher")), _teacher_key(current["teacher"])
    found = [("teacher", *teachers)] if teachers[0] != teachers[1] else []
    there, now = recorded.get("config") or {}, current["config"]
    found += [(key, _lookup(there, key), _lookup(now, key)) for key in _diff(there, now, "")
              if not key.startswith(RESUMABLE_CHANGES) and key != "teacher.source"]
    return found


def _teacher_key(record) -> str | None:
    """A teacher by content (a local folder's hash: it may move or be retrained under its name), else by hub id."""
    if not isinstance(record, dict):
        return None
    return f"sha256:{record['teacher_sha256'][:12]}" if record.get("teacher_sha256") else str(record.get("teacher"))


def check_checkpoint_owner(folder: Path, output: Path, identity: dict, from_other: bool) -> dict | None:
    """Refuse a checkpoint of another run (recorded config or teacher differ, or it lies outside this run's
    checkpoints without a record) unless ``from_other``; return the source run's record for the model card when
    another run's checkpoint is taken, None when it is this run's own."""
    recorded = checkpoint.read_state(folder).get("run")
    inside = folder.resolve().is_relative_to((output / "checkpoints").resolve())
    differences = identity_differences(recorded, identity) if isinstance(recorded, dict) else []
    if inside and not differences:
        return None
    source = recorded.get("folder", "?") if isinstance(recorded, dict) else str(folder.resolve().parent.parent)
    if from_other:
        return {"checkpoint": str(folder.resolve()), "run": source,
                "teacher": recorded.get("teacher") if isinstance(recorded, dict) else None,
                "differences": {key: {"there": there, "here": here} for key, there, here in differences}}
    if differences:
        key, there, here = differences[0]
        more = f" and {len(differences) - 1} more" if len(differences) > 1 else ""
        raise DiffkdError(f"--resume: checkpoint {str(folder)!r} belongs to another run: {source!r} made it with "
                          f"{key}={there!r}, this run {str(output)!r} has {key}={here!r}{more}; resume "
                          "with that run's config and teacher, or pass --resume-from-other to continue from it "
                          "anyway (the model card names it)")
    raise DiffkdError(f"--resume {str(folder)!r} is outside this run's {str(output / 'checkpoints')!r} (it is "
                      f"{source!r}'s): pass --resume-from-other to continue from another run's checkpoint (the model "
                      "card names it), or --resume alone for this run's newest")
