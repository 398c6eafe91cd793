"""LoRA students (LCM-LoRA, Luo et al. 2023): peft adapters on a frozen copy of the teacher's network (its UNet or
transformer, the layout's component).

Only the adapters train, and what a user shares is a diffusers LoRA folder of a few megabytes: the adapters in
diffusers' key format (``pytorch_lora_weights.safetensors``, what ``pipe.load_lora_weights(folder)`` reads onto the
TEACHER's pipeline) and the scheduler they were trained for. B starts at zero (peft's default), so the student
starts as the teacher, as a copy student does.
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path

import torch
from peft import LoraConfig, inject_adapter_in_model
from peft.tuners.lora import LoraLayer
from peft.utils import get_peft_model_state_dict
from torch import nn

from diffkd.config import LORA_TARGETS, Config, LoraOptions
from diffkd.errors import DiffkdError
from diffkd.io import LoadedPipeline, save_pipeline, write_model_card

log = logging.getLogger(__name__)

LORA_FILE = "pytorch_lora_weights.safetensors"
FUSED_FOLDER_SUFFIX = "-fused"


def check_lora_run(config: Config, teacher: LoadedPipeline) -> None:
    """Refuse, before any work, adapters the teacher's pipeline could not load, and an evaluation after training
    with no full student to sample (the adapter folder alone is not a pipeline)."""
    pipeline_class = type(teacher.pipeline)
    if not hasattr(pipeline_class, "load_lora_weights") or not hasattr(teacher.unet, "add_adapter"):
        raise DiffkdError(f"student.lora needs a pipeline that loads LoRA weights (load_lora_weights, e.g. "
                          f"StableDiffusionPipeline); {pipeline_class.__name__} has none: drop student.lora")
    if config.run_eval and not config.student.lora.fuse:
        raise DiffkdError("the evaluation after training samples the full student: set student.lora.fuse=true, "
                          "or run_eval=false")


def lora_student(teacher_unet: nn.Module, options: LoraOptions, default_targets: tuple[str, ...] = LORA_TARGETS
                 ) -> nn.Module:
    """A copy of the teacher's network, frozen, with trainable adapters on every layer ``target_modules`` names
    (by default those of ``default_targets``, its layout's, that it has: SD3's last block has no ``to_add_out``)."""
    targets = adapter_targets(teacher_unet, options.target_modules, default_targets)
    student = copy.deepcopy(teacher_unet).requires_grad_(False)
    try:
        student.add_adapter(LoraConfig(r=options.rank, lora_alpha=options.alpha, target_modules=targets))
    except ValueError as error:
        raise DiffkdError(f"cannot put LoRA adapters on student.lora.target_modules ({_first_line(error)}): target "
                          "Linear or Conv2d layers only") from None
    return student.train()


def lora_copy(network: nn.Module, rank: int, default_targets: tuple[str, ...]) -> nn.Module:
    """A frozen fp32 copy of ``network`` with trainable rank-``rank`` adapters (scale 1) on the layers of
    ``default_targets`` it has: a LoRA network that trains but is never exported (DMD2's fake score), so peft's
    ``inject_adapter_in_model`` serves any network, a pixel UNet2DModel without diffusers' ``add_adapter`` too."""
    targets = adapter_targets(network, None, default_targets)
    if not targets:
        raise DiffkdError(f"the teacher's {type(network).__name__} has none of the layers LoRA adapters go on "
                          f"({', '.join(default_targets[:6])}, ...): set method.fake_score_lora_rank=0")
    return add_adapters(copy.deepcopy(network).float().requires_grad_(False), rank, targets).train()


def add_adapters(network: nn.Module, rank: int, targets: list[str]) -> nn.Module:
    """Rank-``rank`` adapters at scale 1 (alpha = rank) on ``targets`` of ``network``, in place: a LoRA network
    that is never exported (a LoRA fake score, and every LoRA network the memory plan builds)."""
    inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=rank, target_modules=targets), network)
    return network


def adapter_targets(network: nn.Module, named: list[str] | None, default_targets: tuple[str, ...]) -> list[str]:
    """The layers adapters go on: those ``named`` (each must match a layer), else the ``default_targets`` that
    ``network`` has (a small model may lack some)."""
    names = [name for name, _ in network.named_modules()]
    targets = list(named or [target for target in default_targets if any(matches(name, target) for name in names)])
    unmatched = [target for target in targets if not any(matches(name, target) for name in names)]
    if unmatched:
        examples = sorted({_short_name(name) for name, module in network.named_modules()
                           if isinstance(module, (nn.Linear, nn.Conv2d))})
        kind = "UNet" if "UNet" in type(network).__name__ else "transformer"
        raise DiffkdError(f"student.lora.target_modules {unmatched} match no layer of the teacher's {kind}: use layer "
                          f"names such as {', '.join(examples[:12])}")
    return targets


def _short_name(module_name: str) -> str:
    """'...attn1.to_q' -> 'to_q'; '...attn1.to_out.0' -> 'to_out.0' (a bare index names nothing)."""
    parts = module_name.split(".")
    return ".".join(parts[-2:]) if parts[-1].isdigit() and len(parts) > 1 else parts[-1]


def matches(module_name: str, target: str) -> bool:
    """peft's rule for a target given by name: the whole name, or its tail after a dot."""
    return module_name == target or module_name.endswith(f".{target}")


def lora_report(student: nn.Module, options: LoraOptions) -> dict:
    """The adapters' shape and size; what LCM-LoRA users compare (trainable parameters, and the file's bytes)."""
    trainable = sum(p.numel() for p in student.parameters() if p.requires_grad)
    return {"architecture": "copy", "lora": {"rank": options.rank, "alpha": options.alpha,
                                             "layers": sum(isinstance(m, LoraLayer) for m in student.modules()),
                                             "trainable_parameters": trainable}}


def adapter_state_dict(student: nn.Module) -> dict[str, torch.Tensor]:
    """The adapters in peft's key format (``...to_q.lora_A.weight``), which ``load_lora_weights`` reads as they are.
    Not diffusers' older ``lora.down`` format: ``convert_state_dict_to_diffusers`` renames only attention layers,
    and the mixed file it makes for LCM-LoRA's conv and feed-forward targets loads as another network (measured:
    0.056 off on the tiny test UNet, exactly equal in peft's format)."""
    return {k: v.detach().contiguous().cpu() for k, v in get_peft_model_state_dict(student).items()}


def save_lora_student(folder: Path, teacher: LoadedPipeline, student: nn.Module, scheduler, card: dict,
                      fuse: bool) -> Path:
    """The adapter folder (weights, scheduler, model card); with ``fuse`` also the full student beside it."""
    folder.mkdir(parents=True, exist_ok=True)
    component = teacher.component  # save_lora_weights takes unet_lora_layers or transformer_lora_layers
    type(teacher.pipeline).save_lora_weights(folder, safe_serialization=True, **{
        f"{component}_lora_layers": adapter_state_dict(student),
        f"{component}_lora_adapter_metadata": student.peft_config["default"].to_dict()})
    scheduler.save_pretrained(folder / "scheduler")
    size = (folder / LORA_FILE).stat().st_size  # what a user downloads: LCM-LoRA's point
    log.info("LoRA adapters: %s, %.2f MB", folder / LORA_FILE, size / 1e6)
    card = {**card, "lora_file_bytes": size}
    write_model_card(folder / "README.md", card, usage=usage_lines(card, folder, type(scheduler).__name__))
    if fuse:
        save_pipeline(fused_folder(folder), teacher, fused_unet(teacher, folder), scheduler,
                      {**card, "lora_folder": str(folder)}, teacher.component)
    return folder


def fused_folder(folder: Path) -> Path:
    return folder.with_name(folder.name + FUSED_FOLDER_SUFFIX)


def fused_unet(teacher: LoadedPipeline, folder: Path) -> nn.Module:
    """The teacher's network with the exported adapters folded in, made the way a user would make it (load, fuse,
    unload), so the fused student is exactly what the adapter folder gives."""
    component = teacher.component
    pipeline = type(teacher.pipeline)(**{**teacher.pipeline.components, component: copy.deepcopy(teacher.unet)})
    pipeline.load_lora_weights(folder)
    pipeline.fuse_lora()
    pipeline.unload_lora_weights()
    return getattr(pipeline, component)


def usage_lines(card: dict, folder: Path, scheduler_class: str) -> list[str]:
    """The lines a user runs: the teacher's pipeline, then the two that turn it into the student."""
    steps = card.get("num_inference_steps", "?")
    scale = card.get("guidance_scale", 1.0)
    return [f"from diffusers import {scheduler_class}, DiffusionPipeline",
            f"pipe = DiffusionPipeline.from_pretrained({card.get('teacher', 'TEACHER')!r})",
            f"pipe.load_lora_weights({str(folder)!r})",
            f"pipe.scheduler = {scheduler_class}.from_pretrained({str(folder)!r}, subfolder=\"scheduler\")",
            f"images = pipe(prompt, num_inference_steps={steps}, guidance_scale=1.0).images"
            + (f"  # w={scale} is distilled in" if scale != 1.0 else "")]


def _first_line(error: Exception) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
