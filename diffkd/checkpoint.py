"""Atomic, pickle-free training checkpoints: safetensors for tensors, JSON for everything else.

A checkpoint is a folder written under a temporary name, fsync'ed and renamed into place, so a kill at any
moment leaves either the previous checkpoint or the new one, never half of one; ``latest`` only ever returns
renamed folders. The optimiser's state dict is split into its tensors and its JSON skeleton.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from diffkd.errors import DiffkdError

PREFIX = "ckpt-"
STATE_FILE = "state.json"


def name_for(round_index: int, step: int) -> str:
    return f"{PREFIX}r{round_index:02d}-s{step:08d}"


def save(root: Path, round_index: int, step: int, tensors: dict[str, dict[str, torch.Tensor]], state: dict,
         keep: int) -> Path:
    """Write groups of tensors (one safetensors file per group) plus ``state`` atomically; keep the last ``keep``."""
    root.mkdir(parents=True, exist_ok=True)
    final = root / name_for(round_index, step)
    temporary = root / f".tmp-{final.name}-{os.getpid()}"
    shutil.rmtree(temporary, ignore_errors=True)
    temporary.mkdir()
    for group, values in tensors.items():
        save_file({k: v.detach().contiguous().cpu() for k, v in values.items()}, temporary / f"{group}.safetensors")
    (temporary / STATE_FILE).write_text(json.dumps({**state, "round": round_index, "step": step}, indent=1))
    for file in temporary.iterdir():
        _fsync(file)
    if final.exists():
        shutil.rmtree(final)
    os.replace(temporary, final)
    _fsync(root)
    for old in complete(root)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def complete(root: Path) -> list[Path]:
    """Finished checkpoints, oldest first (temporary folders of interrupted writes are never listed)."""
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith(PREFIX) and (p / STATE_FILE).is_file())


def latest(root: Path) -> Path | None:
    found = complete(root)
    return found[-1] if found else None


def load(folder: Path) -> tuple[dict[str, dict[str, torch.Tensor]], dict]:
    """Read a checkpoint back; a corrupt or foreign file is a DiffkdError naming it."""
    state_file = folder / STATE_FILE
    if not state_file.is_file():
        raise DiffkdError(f"{str(folder)!r} is not a diffkd checkpoint (no {STATE_FILE}): pass a folder from "
                          "OUTPUT/checkpoints or use --resume without a path")
    try:
        state = json.loads(state_file.read_text())
    except json.JSONDecodeError as error:
        raise DiffkdError(f"checkpoint state {str(state_file)!r} is corrupt ({error}); resume from an older "
                          "checkpoint with --resume PATH") from None
    tensors = {}
    for file in sorted(folder.iterdir()):
        if file.suffix in (".bin", ".pt", ".pth", ".pkl", ".ckpt"):
            raise DiffkdError(f"refusing {str(file)!r}: diffkd checkpoints hold only safetensors and JSON, and a "
                              "pickle can run code when loaded; delete it or resume from another checkpoint")
        if file.suffix == ".safetensors":
            tensors[file.stem] = read_safetensors(file)
    return tensors, state


def read_safetensors(file: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(file)
    except (SafetensorError, OSError, ValueError) as error:
        raise DiffkdError(f"{str(file)!r} is not a readable safetensors file ({error}); it is corrupt or "
                          "truncated: resume from an older checkpoint with --resume PATH") from None


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
