"""Student networks derived from the teacher's UNet: a copy, or a compact UNet (BK-SDM style)."""

from __future__ import annotations

import copy

from torch import nn

from diffkd.config import StudentConfig


def build_student(teacher_unet: nn.Module, config: StudentConfig) -> tuple[nn.Module, dict]:
    """The student UNet and a report of how it was initialised from the teacher."""
    if config.architecture == "copy":
        student = copy.deepcopy(teacher_unet).requires_grad_(True).train()
        return student, {"architecture": "copy", "copied": len(student.state_dict()), "initialised": 0}
    raise NotImplementedError("compact students are being added")
