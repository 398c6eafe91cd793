"""Which checkpoint a run exports: the record of its validations, the best so far, and when to stop early.

Torch-free plain values, kept in every checkpoint's state.json (JSON keeps floats exactly), so a run resumed from a
checkpoint chooses the same weights and stops at the same step as an uninterrupted one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field


@dataclass
class Selection:
    """The validation record of a run: every (step, FD), the best so far and how many validations since.
    Plain values, saved in each checkpoint's state.json (JSON keeps floats exactly), so a resumed run chooses the
    same checkpoint as an uninterrupted one."""

    history: list[dict] = field(default_factory=list)
    best_step: int | None = None
    best_fd: float | None = None
    since_best: int = 0
    seconds: float = 0.0
    stopped_early: bool = False
    scored_by: str | None = None  # the feature network of every FD here (None: a record from before it was kept)

    def record(self, step: int, fd_per_k: dict[int, float], scored_by: str) -> bool:
        """Add one validation (an FD per validated k, by the feature network ``scored_by``); True when it is the
        best so far (ties keep the earlier, shorter-trained one)."""
        if self.scored_by not in (None, scored_by):
            raise ValueError(f"a validation by {scored_by} cannot extend a record scored by {self.scored_by}")
        self.scored_by = scored_by
        fd = geometric_mean(fd_per_k.values())
        self.history.append({"step": step, "fd": fd, "fd_per_k": {str(k): v for k, v in fd_per_k.items()}})
        if self.best_fd is None or fd < self.best_fd:
            self.best_step, self.best_fd, self.since_best = step, fd, 0
            return True
        self.since_best += 1
        return False

    def extends(self, scored_by: str, reads_images: bool) -> bool:
        """Whether validations by ``scored_by`` may extend this record: FDs of two feature networks are on two scales,
        and a record mixing them would export a checkpoint for its network rather than its samples. A record from
        before the network was kept was scored on decoded images (every validation feature read images until
        latent-random-conv), so it extends only a validation that reads images."""
        if not self.history:
            return True
        return self.scored_by == scored_by if self.scored_by is not None else reads_images

    def should_stop(self, patience: int) -> bool:
        """Early stopping: ``patience`` validations in a row without a new best (0 = never stop)."""
        return patience > 0 and self.since_best >= patience


def geometric_mean(fds) -> float:
    """How a checkpoint's FDs at several k combine: each k counts by its ratio, so the 2-step FD (several times the
    4-step one early in a run) does not outweigh the 4-step one. A NaN FD (a student that diverged) counts as
    infinite, so any finite validation beats it."""
    fds = [math.inf if math.isnan(fd) else max(fd, 1e-12) for fd in fds]
    return math.prod(fds) ** (1 / len(fds))
