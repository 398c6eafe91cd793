"""Student networks derived from the teacher's UNet: a copy, or a compact UNet (BK-SDM, Kim et al. 2023).

A compact student is the teacher's own diffusers class built from the teacher's config with fewer resnet layers
per block, optionally no mid-block, and narrower channels. It starts from the teacher wherever it can: every
tensor whose role (its name after layer renumbering) and shape match the teacher's is copied, so dropping layers
keeps the kept layers' weights (BK-SDM's initialisation, their sec. 3.2). A narrower tensor of the same role
takes every r-th entry along each dimension that shrank r-fold (weight selection, Xu et al. 2024): the same
stride on a layer's outputs and on the next layer's inputs, skip concatenations included, keeps the kept channels
wired as they were in the teacher. The sinusoidal time features are the teacher's even ones only when its
freq_shift is 0 (Stable Diffusion, the digits teacher); with freq_shift 1 (DDPM-style configs) their frequencies
differ, so the time embedding's first layer starts from a mismatched slice there. What fits neither way is left
as diffusers initialised it. The report says which is which, and how the two networks compare in size and speed.
"""

from __future__ import annotations

import copy
import re
import time

import torch
from diffusers import UNet2DConditionModel, UNet2DModel
from torch import nn

from diffkd.config import StudentConfig
from diffkd.errors import DiffkdError
from diffkd.lora import lora_report, lora_student
from diffkd.models import dummy_inputs

SUPPORTED = (UNet2DModel, UNet2DConditionModel)
_BLOCK_LAYER = re.compile(r"^(down_blocks|up_blocks)\.(\d+)\.(resnets|attentions)\.(\d+)\.(.*)$")


def build_student(teacher_unet: nn.Module, config: StudentConfig, lora_targets: tuple[str, ...] | None = None
                  ) -> tuple[nn.Module, dict]:
    """The student network and a report of how it was initialised from the teacher (a LoRA student: the teacher's
    frozen network with adapters, on ``lora_targets``, its layout's, unless the config names them)."""
    if config.lora is not None:
        student = lora_student(teacher_unet, config.lora, *([lora_targets] if lora_targets else []))
        return student, lora_report(student, config.lora)
    if config.architecture == "copy":
        student = copy.deepcopy(teacher_unet).requires_grad_(True).train()
        return student, {"architecture": "copy", "copied": len(student.state_dict()), "sliced": 0, "initialised": 0}
    student_config = compact_config(teacher_unet, config)
    student = _instantiate(type(teacher_unet), student_config).to(_device_of(teacher_unet))
    sources = weight_sources(teacher_unet, student)
    copied, sliced, initialised = transfer_weights(teacher_unet, student, sources, config.narrow_init == "slice")
    student.requires_grad_(True).train()
    report = {
        "architecture": "compact",
        "block_out_channels": [list(teacher_unet.config.block_out_channels), list(student_config["block_out_channels"])],
        "layers_per_block": [teacher_unet.config.layers_per_block, student_config["layers_per_block"]],
        "mid_block": [teacher_unet.config.mid_block_type is not None, student_config["mid_block_type"] is not None],
        "norm_num_groups": [teacher_unet.config.norm_num_groups, student_config["norm_num_groups"]],
        "parameters": [count_parameters(teacher_unet), count_parameters(student)],
        "copied": len(copied),
        "sliced": len(sliced),
        "initialised": len(initialised),
        "initialised_blocks": sorted({_block_of(name) for name in initialised}),
    }
    if config.latency_batch_size:
        report["latency_ms_per_step"] = per_step_latency(teacher_unet, student, config.latency_batch_size)
    return student, report


def compact_config(teacher_unet: nn.Module, config: StudentConfig) -> dict:
    """The teacher's UNet config with the student's widths, depth and mid-block, checked to be buildable."""
    if not isinstance(teacher_unet, SUPPORTED):
        raise DiffkdError(f"student.architecture=compact needs a diffusers UNet2DModel or UNet2DConditionModel "
                          f"teacher, got {type(teacher_unet).__name__}: use student.architecture=copy")
    teacher = dict(teacher_unet.config)
    widths = [max(1, round(c * config.width_multiplier)) for c in teacher["block_out_channels"]]
    groups = config.norm_num_groups or _groups_for(teacher["norm_num_groups"], config.width_multiplier, widths)
    bad = [w for w in widths if w % groups]
    if bad:
        raise DiffkdError(f"student widths {widths} (teacher {list(teacher['block_out_channels'])} x "
                          f"{config.width_multiplier}) are not divisible by norm_num_groups={groups} (GroupNorm): "
                          f"use a width_multiplier that keeps whole groups, e.g. one of {_workable_widths(teacher)}, "
                          "or set student.norm_num_groups to a divisor of every width")
    head_dim = teacher.get("attention_head_dim")
    attended = [w for w, kind in zip(widths, teacher["down_block_types"]) if "Attn" in kind]
    if not config.drop_mid_block and teacher.get("add_attention", True):
        attended.append(widths[-1])
    if isinstance(teacher_unet, UNet2DModel) and isinstance(head_dim, int) and min(attended, default=head_dim) < head_dim:
        raise DiffkdError(f"student width {min(attended)} at an attention block is below the attention head size "
                          f"{head_dim}: raise student.width_multiplier")
    teacher_layers = teacher["layers_per_block"]
    layers = config.layers_per_block or teacher_layers
    if not isinstance(layers, int):
        raise DiffkdError("the teacher has a different number of layers in each block; set student.layers_per_block "
                          "to one number")
    derived = {**_init_args(teacher), "block_out_channels": tuple(widths), "layers_per_block": layers,
               "norm_num_groups": groups}
    if config.drop_mid_block:
        derived["mid_block_type"] = None
    else:
        derived["mid_block_type"] = teacher.get("mid_block_type", "UNetMidBlock2D")
    return derived


def _block_of(name: str) -> str:
    """'up_blocks.1.resnets.0.conv1.weight' -> 'up_blocks.1'; 'conv_in.weight' -> 'conv_in'."""
    parts = name.split(".")
    return ".".join(parts[:2]) if parts[0] in ("down_blocks", "up_blocks") else parts[0]


def _groups_for(teacher_groups: int, width: float, widths: list[int]) -> int:
    """Keep the teacher's channels per group (groups scale with the width) when that divides every width;
    else keep the teacher's group count (an error follows if that does not divide either)."""
    scaled = round(teacher_groups * width)
    if scaled >= 1 and scaled == teacher_groups * width and all(w % scaled == 0 for w in widths):
        return scaled
    return teacher_groups


def _workable_widths(teacher: dict) -> list[float]:
    workable = []
    for width in (0.25, 0.375, 0.5, 0.625, 0.75, 0.875, 1.0):
        widths = [round(c * width) for c in teacher["block_out_channels"]]
        if all(w == c * width and w % _groups_for(teacher["norm_num_groups"], width, widths) == 0
               for w, c in zip(widths, teacher["block_out_channels"])):
            workable.append(width)
    return workable


def _init_args(config: dict) -> dict:
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in config.items() if not k.startswith("_")}


def _instantiate(cls: type, config: dict) -> nn.Module:
    try:
        return cls.from_config(config)
    except (ValueError, TypeError, RuntimeError, AssertionError) as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise DiffkdError(f"cannot build the compact student ({reason}): try student.width_multiplier=0.5 with "
                          "layers_per_block=1") from error


def _device_of(module: nn.Module) -> torch.device:
    return next(module.parameters()).device


def _resnet_counts(unet: nn.Module) -> tuple[list[int], list[int]]:
    down = [len(block.resnets) for block in unet.down_blocks]
    up = [len(block.resnets) for block in unet.up_blocks]
    return down, up


def weight_sources(teacher: nn.Module, student: nn.Module) -> dict[str, str | None]:
    """For each student tensor, the teacher tensor with the same role, or None.

    Down blocks keep their first layers (student layer j <- teacher layer j). An up block's last resnet is the one
    that takes the skip from the level above, so student last <- teacher last and the others j <- j; the same index
    holds for the attention that follows each resnet.
    """
    down_t, up_t = _resnet_counts(teacher)
    _, up_s = _resnet_counts(student)
    teacher_names = set(teacher.state_dict())
    sources: dict[str, str | None] = {}
    for name in student.state_dict():
        source = _teacher_name(name, down_t, up_t, up_s)
        sources[name] = source if source in teacher_names else None
    return sources


def _teacher_name(name: str, down_t: list[int], up_t: list[int], up_s: list[int]) -> str | None:
    match = _BLOCK_LAYER.match(name)
    if not match:
        return name
    kind, block, part, layer, rest = match.groups()
    b, j = int(block), int(layer)
    if kind == "down_blocks":
        index = j if b < len(down_t) and j < down_t[b] else None
    elif b >= len(up_t):
        index = None
    elif j == up_s[b] - 1:
        index = up_t[b] - 1
    else:
        index = j if j < up_t[b] - 1 else None
    return None if index is None else f"{kind}.{b}.{part}.{index}.{rest}"


@torch.no_grad()
def transfer_weights(teacher: nn.Module, student: nn.Module, sources: dict[str, str | None], slice_narrow: bool
                     ) -> tuple[dict[str, str], dict[str, str], list[str]]:
    """Copy each student tensor from its teacher source when the shapes match, or (``slice_narrow``) take its
    strided slice when the student's shape divides the teacher's; return (copied, sliced, initialised)."""
    teacher_state, student_state = teacher.state_dict(), student.state_dict()
    copied, sliced, initialised = {}, {}, []
    for name, tensor in student_state.items():
        source = sources.get(name)
        strides = None if source is None else narrowing_strides(teacher_state[source].shape, tensor.shape)
        if strides is not None and all(r == 1 for r in strides):
            tensor.copy_(teacher_state[source])
            copied[name] = source
        elif strides is not None and slice_narrow:
            tensor.copy_(teacher_state[source][tuple(slice(None, None, r) for r in strides)])
            sliced[name] = source
        else:
            initialised.append(name)
    return copied, sliced, initialised


def narrowing_strides(teacher_shape: torch.Size, student_shape: torch.Size) -> tuple[int, ...] | None:
    """How many-fold each dimension shrank from teacher to student, or None where one is not a whole shrink."""
    if len(teacher_shape) != len(student_shape) or any(t % s for t, s in zip(teacher_shape, student_shape)):
        return None
    return tuple(t // s for t, s in zip(teacher_shape, student_shape))


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@torch.no_grad()
def per_step_latency(teacher: nn.Module, student: nn.Module, batch_size: int, repeats: int = 7) -> dict:
    """Milliseconds of one forward pass (one sampling step) of each at ``batch_size``: passes interleaved and the
    fastest of ``repeats`` kept, because shared machines add noise only upwards."""
    models = {"teacher": teacher, "student": student}
    inputs = {name: dummy_inputs(unet, batch_size) for name, unet in models.items()}
    modes = {name: unet.training for name, unet in models.items()}
    times: dict[str, list[float]] = {name: [] for name in models}
    for _ in range(repeats + 1):
        for name, unet in models.items():
            unet.eval()
            device = inputs[name]["sample"].device
            _synchronize(device)
            start = time.perf_counter()
            unet(**inputs[name])
            _synchronize(device)
            times[name].append(time.perf_counter() - start)
    for name, unet in models.items():
        unet.train(modes[name])
    result = {"batch_size": batch_size, **{name: round(1000 * min(t[1:]), 3) for name, t in times.items()}}
    result["speedup"] = round(result["teacher"] / result["student"], 2)
    return result


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
