"""Which scheduler a student is exported with, when its method offers several: measured by the run, not assumed.

Which sampler suits a consistency student depends on the teacher, by factors: at 4 steps, in multiples of the
teacher's DDIM-64 FD over four seeds, LCMScheduler gives 1.18x on digits-16 and 1.97x on the panel's photo-v, and
DDIMScheduler 6.20x and 1.02x (eval/RESULTS.md, "Teacher panel"). So at its end a run scores each candidate
scheduler on the exported weights with in-run validation's settings (its k, noise, reference and feature network)
and exports the least geometric mean of its FDs over k. The method's own scheduler is kept unless another beats it
by more than ``MARGIN``: the choice is made on one draw of noise (on digits-16 one draw of 1,024 put DDIM 12% ahead
of LCM at 2 steps where three others put it 40-100% behind), and a near-tie is not worth a different sampler
from the one the method was tuned with.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import replace
from typing import TYPE_CHECKING

from diffkd.selection import geometric_mean

if TYPE_CHECKING:
    from diffkd.methods.base import ExportSpec

MARGIN = 0.9  # another scheduler replaces the method's own only below 0.9x its FD
ALSO_WORKS = 1.25  # the model card lists the candidates within 1.25x of the chosen one as swaps that work


def pick(fds: dict[str, float], own: str) -> str:
    """The candidate with the least FD if it is below ``MARGIN`` x ``own``'s, else ``own`` (ties: ``own``)."""
    best = min(fds, key=fds.__getitem__)
    return best if fds[best] < MARGIN * fds[own] else own


def choose(spec: ExportSpec, score: Callable[[object], dict[int, float]],
           own_scores: dict[int, float] | None = None) -> tuple[ExportSpec, dict]:
    """``spec`` or one of its alternatives, by ``score`` (a scheduler -> its FD at each k), and the record of every
    candidate's figures; the chosen spec's swaps are the candidates that scored within ``ALSO_WORKS``.
    ``own_scores``: ``spec``'s scheduler's figures where the run already has them (in-run validation scored the
    exported weights with it), so they are not paid for twice."""
    started = time.perf_counter()
    own = type(spec.scheduler).__name__
    candidates = {own: spec, **spec.alternatives}
    per_k = {name: own_scores if name == own and own_scores is not None else score(candidate.scheduler)
             for name, candidate in candidates.items()}
    fds = {name: geometric_mean(values.values()) for name, values in per_k.items()}
    chosen = pick(fds, own)
    swaps = tuple(name for name in candidates if name != chosen and fds[name] <= ALSO_WORKS * fds[chosen])
    record = {"exported": chosen, "own": own, "fd": fds,
              "fd_per_k": {name: {str(k): fd for k, fd in values.items()} for name, values in per_k.items()},
              "seconds": time.perf_counter() - started}
    return replace(candidates[chosen], alternatives={}, also_samples_with=swaps), record
