"""Guidance-embedded students: one UNet pass per step for any guidance scale w (Meng et al. 2023, stage 1, eq. 6;
LCM's w-conditioning, Luo et al. 2023, sec. 4.2).

A student gets diffusers' guidance input: ``time_cond_proj_dim`` adds ``cond_proj``, a linear map of an embedding of
w added to the timestep features. It starts at zero, so the student starts as the teacher's function; it then learns
the teacher's classifier-free guided output  eps_uncond + w (eps_cond - eps_uncond)  for w drawn per sample. w is
embedded exactly as ``StableDiffusionPipeline`` embeds its ``guidance_scale`` for such a UNet (of w - 1, and the
pipeline then skips CFG), so ``pipe(prompt, guidance_scale=w)`` runs the exported student once per step.
Any method can use it: embed the student (``add_guidance_embedding``), draw w per sample (``draw_guidance_scales``),
give the CFG teacher ``teacher_conditioning`` and the student (or a w-conditioned teacher) ``student_conditioning``.
"""

from __future__ import annotations

import math
from dataclasses import replace

import torch
from diffusers import UNet2DConditionModel
from torch import nn

from diffkd.conditioning import batch_conditioning
from diffkd.config import Config
from diffkd.errors import DiffkdError
from diffkd.io import LoadedPipeline
from diffkd.method_options import GuidanceRange
from diffkd.models import Conditioning


def check_guidance_run(config: Config, guidance: GuidanceRange, teacher: LoadedPipeline) -> None:
    """Refuse, before any work, a teacher without classifier-free guidance and a student that cannot carry w."""
    if not teacher.text_conditioned:
        raise DiffkdError("method.guidance embeds the classifier-free guidance scale of a text-conditioned teacher; "
                          f"{teacher.source!r} is unconditional: drop method.guidance")
    if config.student.lora is not None:
        raise DiffkdError("method.guidance needs a full student: LoRA adapters load onto the teacher's UNet, which "
                          "has no guidance input; drop student.lora, or method.guidance for a fixed guidance_scale")
    if not isinstance(teacher.unet, UNet2DConditionModel):
        raise DiffkdError(f"method.guidance needs a UNet2DConditionModel; the teacher has "
                          f"{type(teacher.unet).__name__}: drop method.guidance")
    dim = teacher.unet.config.time_cond_proj_dim
    if dim is not None and dim != guidance.embedding_dim:
        raise DiffkdError(f"the teacher's UNet already embeds w in {dim} features: set "
                          f"method.guidance.embedding_dim={dim}")


def add_guidance_embedding(unet: UNet2DConditionModel, embedding_dim: int) -> UNet2DConditionModel:
    """``unet`` with a zero-initialised guidance input of ``embedding_dim`` features (a new module; ``unet`` is left
    as it was). A UNet that already has one is returned as it is."""
    if unet.config.time_cond_proj_dim is not None:
        return unet
    parameter = next(unet.parameters())
    student = UNet2DConditionModel.from_config(unet.config, time_cond_proj_dim=embedding_dim)
    student = student.to(parameter.device)
    if parameter.dtype != torch.float32:
        student = student.to(parameter.dtype)
    weights = unet.state_dict()
    new = set(student.state_dict()) - set(weights)
    if new != {"time_embedding.cond_proj.weight"}:
        raise RuntimeError(f"guidance embedding: expected one new weight, got {sorted(new)}")
    nn.init.zeros_(student.time_embedding.cond_proj.weight)
    student.load_state_dict({**weights, "time_embedding.cond_proj.weight": student.time_embedding.cond_proj.weight})
    return student.requires_grad_(parameter.requires_grad).train(unet.training)


def guidance_scale_embedding(w: torch.Tensor, embedding_dim: int) -> torch.Tensor:
    """The sinusoidal embedding of 1000 (w - 1) that StableDiffusionPipeline gives a UNet with ``time_cond_proj_dim``
    (``get_guidance_scale_embedding``, from VDM): sin then cos of 1000 (w - 1) 10000^(-k / (d/2 - 1)), k < d/2."""
    half = embedding_dim // 2
    frequencies = torch.exp(torch.arange(half, dtype=torch.float32, device=w.device)
                            * -(math.log(10000.0) / (half - 1)))
    angles = 1000.0 * (w.float() - 1.0)[:, None] * frequencies[None, :]
    embedding = torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)
    return nn.functional.pad(embedding, (0, embedding_dim % 2))


def draw_guidance_scales(batch_size: int, guidance: GuidanceRange, generator: torch.Generator,
                         device: torch.device | str = "cpu") -> torch.Tensor:
    """w ~ U[w_min, w_max], one per sample (Meng et al. and LCM draw w uniformly)."""
    u = torch.rand(batch_size, generator=generator)
    return (guidance.w_min + (guidance.w_max - guidance.w_min) * u).to(device)


def teacher_conditioning(cond: Conditioning, w: torch.Tensor) -> Conditioning:
    """A plain teacher's classifier-free guidance at each sample's own w (two passes, conditional and not)."""
    return replace(cond, guidance_scale=w, timestep_cond=None)  # the layout's added inputs (SDXL's) stay


def student_conditioning(cond: Conditioning, w: torch.Tensor, embedding_dim: int) -> Conditioning:
    """A guidance-embedded network's one conditional pass, told each sample's w."""
    return replace(cond.unguided(), timestep_cond=guidance_scale_embedding(w, embedding_dim))


def embedded_student(config: Config, teacher: LoadedPipeline, student: nn.Module) -> nn.Module:
    """The student a method trains: ``student`` given a guidance input when ``method.guidance`` asks for one."""
    guidance = config.method.guidance
    if guidance is None:
        return student
    check_guidance_run(config, guidance, teacher)
    return add_guidance_embedding(student, guidance.embedding_dim)


def conditioning_pair(batch: dict[str, torch.Tensor], guidance_scale: float, guidance: GuidanceRange | None,
                      generator: torch.Generator) -> tuple[Conditioning, Conditioning]:
    """(the teacher's conditioning, the student's) for a batch: a fixed ``guidance_scale`` guides the teacher and is
    baked into the student; a w range draws one w per sample for the teacher's CFG and tells the student that w."""
    if guidance is None:
        cond = batch_conditioning(batch, guidance_scale)
        return cond, cond.unguided()
    plain = batch_conditioning(batch, 1.0)
    w = draw_guidance_scales(len(batch["x0"]), guidance, generator, batch["x0"].device)
    return teacher_conditioning(plain, w), student_conditioning(plain, w, guidance.embedding_dim)
