"""Atomic, pickle-free training checkpoints: safetensors for tensors, JSON for everything else.

A checkpoint is a folder written under a temporary name, fsync'ed and renamed into place, so a kill at any
moment leaves either the previous checkpoint or the new one, never half of one; ``latest`` only ever returns
renamed folders. The optimiser's state dict is split into its tensors and its JSON skeleton.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from diffkd.errors import DiffkdError

log = logging.getLogger(__name__)

PREFIX = "ckpt-"
STATE_FILE = "state.json"
TMP_PREFIX = ".tmp-"
TRASH_PREFIX = ".trash-"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")


def name_for(round_index: int, step: int) -> str:
    return f"{PREFIX}r{round_index:02d}-s{step:08d}"


def save(root: Path, round_index: int, step: int, tensors: dict[str, dict[str, torch.Tensor]], state: dict,
         keep: int) -> Path:
    """Write groups of tensors (one safetensors file per group) plus ``state`` atomically; keep the last ``keep``.

    ``state.json`` is written last and lists every file with its size, so ``complete`` can tell a whole
    checkpoint from a damaged one; an existing folder of the same name is moved aside (one rename) before the
    new one is renamed in, so there is no moment at which a partly deleted checkpoint carries the name.
    """
    root.mkdir(parents=True, exist_ok=True)
    clean_stale(root)
    final = root / name_for(round_index, step)
    temporary = root / f"{TMP_PREFIX}{final.name}-{os.getpid()}"
    shutil.rmtree(temporary, ignore_errors=True)
    temporary.mkdir()
    files = {}
    for group, values in tensors.items():
        path = temporary / f"{group}.safetensors"
        save_file({k: v.detach().contiguous().cpu() for k, v in values.items()}, path)
        _fsync(path)
        files[path.name] = path.stat().st_size
    state_file = temporary / STATE_FILE
    state_file.write_text(json.dumps({**state, "round": round_index, "step": step, "files": files}, indent=1))
    _fsync(state_file)
    _fsync(temporary)
    if final.exists():
        _discard(final)
    os.replace(temporary, final)
    _fsync(root)
    prune(root, keep)
    return final


def prune(root: Path, keep: int) -> None:
    """Keep the newest ``keep`` complete checkpoints and nothing else (no half-written or discarded folders)."""
    for old in complete(root)[:-keep]:
        _discard(old)
    clean_stale(root)


def _discard(folder: Path) -> None:
    """Rename out of the checkpoint namespace first (atomic), then delete at leisure."""
    trash = folder.with_name(f"{TRASH_PREFIX}{folder.name}-{os.getpid()}")
    os.replace(folder, trash)
    shutil.rmtree(trash, ignore_errors=True)


def clean_stale(root: Path) -> None:
    """Remove what interrupted writes and deletions left behind (never a complete checkpoint)."""
    if root.is_dir():
        for leftover in root.iterdir():
            if leftover.name.startswith((TMP_PREFIX, TRASH_PREFIX)):
                shutil.rmtree(leftover, ignore_errors=True)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def is_complete(folder: Path) -> bool:
    """A renamed checkpoint whose state.json parses and whose listed files are all there at their full size."""
    try:
        state = json.loads((folder / STATE_FILE).read_text())
        return all((folder / name).stat().st_size == size for name, size in state.get("files", {}).items())
    except (OSError, ValueError, AttributeError):
        return False


def complete(root: Path) -> list[Path]:
    """Finished checkpoints, oldest first (temporary folders of interrupted writes are never listed)."""
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith(PREFIX) and is_complete(p))


def latest(root: Path) -> Path | None:
    found = complete(root)
    damaged = [p for p in root.glob(f"{PREFIX}*") if p.is_dir() and p not in found] if root.is_dir() else []
    newest = found[-1] if found else None
    for folder in damaged:
        if newest is None or folder.name > newest.name:
            log.warning("skipping damaged checkpoint %s (files missing or of the wrong size)", folder)
    return newest


def load(folder: Path) -> tuple[dict[str, dict[str, torch.Tensor]], dict]:
    """Read a checkpoint back; a damaged, corrupt or foreign file is a DiffkdError naming it; pickles are refused."""
    state = read_state(folder)
    for file in sorted(folder.iterdir()):
        if file.suffix in PICKLE_SUFFIXES or (file.is_file() and _looks_pickled(file)):
            raise DiffkdError(f"refusing {str(file)!r}: diffkd checkpoints hold only safetensors and JSON, and a "
                              "pickle can run code when loaded; delete it or resume from another checkpoint")
    if not is_complete(folder):
        raise DiffkdError(f"checkpoint {str(folder)!r} is incomplete (a file listed in {STATE_FILE} is missing or "
                          "truncated): resume from an older checkpoint with --resume PATH")
    tensors = {file.stem: read_safetensors(file) for file in sorted(folder.glob("*.safetensors"))}
    return tensors, state


def read_state(folder: Path) -> dict:
    """A checkpoint's ``state.json`` (progress, optimiser skeletons, the run it belongs to)."""
    state_file = folder / STATE_FILE
    if not state_file.is_file():
        raise DiffkdError(f"{str(folder)!r} is not a diffkd checkpoint (no {STATE_FILE}): pass a folder from "
                          "OUTPUT/checkpoints or use --resume without a path")
    try:
        state = json.loads(state_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise DiffkdError(f"checkpoint state {str(state_file)!r} is corrupt ({error}); resume from an older "
                          "checkpoint with --resume PATH") from None
    if not isinstance(state, dict):
        raise DiffkdError(f"checkpoint state {str(state_file)!r} is not a JSON object; resume from an older "
                          "checkpoint with --resume PATH")
    return state


def _looks_pickled(file: Path) -> bool:
    """torch.save writes a zip archive (PK) or a raw pickle (protocol byte 0x80); a safetensors file starts with an
    8-byte header length followed by '{'."""
    with file.open("rb") as handle:
        head = handle.read(9)
    pickled = head[:2] == b"PK" or (len(head) >= 2 and head[0] == 0x80 and head[1] <= 5)
    return pickled and head[8:9] != b"{"


def read_safetensors(file: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(file)
    except (SafetensorError, OSError, ValueError) as error:
        raise DiffkdError(f"{str(file)!r} is not a readable safetensors file ({error}); it is corrupt or "
                          "truncated: resume from an older checkpoint with --resume PATH") from None


def network_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """What a checkpoint keeps of a trained network: its state without its frozen parameters (a LoRA student's base
    weights are the teacher's, restored with it: a checkpoint holds megabytes of adapters, not a UNet copy)."""
    frozen = {name for name, parameter in module.named_parameters() if not parameter.requires_grad}
    return {name: tensor for name, tensor in module.state_dict().items() if name not in frozen}


def load_network_state(module: torch.nn.Module, tensors: dict[str, torch.Tensor], kept: set[str] | None = None
                       ) -> None:
    """Load what ``network_state`` kept; every tensor it would keep (or the names ``kept``) must be there, nothing
    else may be (RuntimeError otherwise)."""
    expected = set(network_state(module)) if kept is None else kept
    if set(tensors) != expected:
        missing, unexpected = sorted(expected - set(tensors))[:3], sorted(set(tensors) - expected)[:3]
        raise RuntimeError(f"tensors missing {missing}, unexpected {unexpected}")
    module.load_state_dict(tensors, strict=False)


def split_optimizer_state(state_dict: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """An optimiser state dict as (tensors, JSON skeleton) so it can be stored without pickle."""
    tensors, skeleton = {}, {"param_groups": state_dict["param_groups"], "state": {}}
    for index, slots in state_dict["state"].items():
        skeleton["state"][str(index)] = {}
        for slot, value in slots.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{index}.{slot}"] = value
                skeleton["state"][str(index)][slot] = None
            else:
                skeleton["state"][str(index)][slot] = value
    return tensors, skeleton


def join_optimizer_state(tensors: dict[str, torch.Tensor], skeleton: dict) -> dict:
    state = {}
    for index, slots in skeleton["state"].items():
        state[int(index)] = {slot: tensors[f"{index}.{slot}"] if value is None else value
                             for slot, value in slots.items()}
    return {"state": state, "param_groups": skeleton["param_groups"]}
