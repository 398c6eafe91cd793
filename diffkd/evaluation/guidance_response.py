"""Whether a guidance-embedded student's samples move with w as the teacher's classifier-free guided ones do.

FD and CLIP score over w show it only in the aggregate; these figures compare each sample with the teacher's from
the same noise and prompt, so they show in minutes whether the student read w at all.
"""

from __future__ import annotations

import torch


def response_figures(student: dict[float, torch.Tensor], teacher: dict[float, torch.Tensor]) -> dict[str, float]:
    """Figures from per-w final latents (rows: samples, same noise and prompt across w and models).

    With dT = T(w_hi) - T(w_lo), the teacher's w effect, and dS the student's:
    - response = mean |dS| / mean |dT|: 1 when the student moves with w as much as the teacher, 0 when it ignores w;
    - alignment = mean cosine(dS, dT): whether it moves the teacher's way;
    - error@w = mean |S(w) - T(w)| / mean |dT|: its distance from the teacher at w, in units of the w effect.
    """
    lo, hi = min(teacher), max(teacher)
    d_teacher, d_student = (teacher[hi] - teacher[lo]).flatten(1), (student[hi] - student[lo]).flatten(1)
    scale = d_teacher.norm(dim=1).mean()
    figures = {"response": float(d_student.norm(dim=1).mean() / scale),
               "alignment": float(torch.nn.functional.cosine_similarity(d_student, d_teacher, dim=1).mean())}
    for w in sorted(teacher):
        figures[f"error@{w:g}"] = float((student[w] - teacher[w]).flatten(1).norm(dim=1).mean() / scale)
    return figures
