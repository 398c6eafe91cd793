"""Did a training round learn anything? A check a user sees before looking at FD.

A progressive-distillation round whose loss does not fall has failed silently: its student still exports and
samples, only worse (issue 14: the first halving on an epsilon teacher stayed at 0.4-0.9 while later rounds fell
50x). So at the end of every round the mean loss of its last 10% of steps is compared with that of its first 10%;
a round whose loss did not fall is logged as a WARNING, kept in ``training_summary.json`` and repeated in the
evaluation report that sits beside it.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

log = logging.getLogger(__name__)

FRACTION = 0.1


def first_last_means(losses: list[float], fraction: float = FRACTION) -> tuple[float, float]:
    """Mean of the first and of the last ``fraction`` of ``losses`` (at least one value each)."""
    if not losses:
        return math.nan, math.nan
    count = max(1, int(len(losses) * fraction))
    return sum(losses[:count]) / count, sum(losses[-count:]) / count


def judge(round_name: str, losses: list[float], loss_falls: bool = True) -> dict:
    """The round's verdict: ``fell`` is False when its last 10% did not go below its first 10% (logged as a
    WARNING naming the round and both means). A round too short to split (< 2 steps), or whose loss is not
    expected to fall (``loss_falls`` False: DMD's generator loss measures a moving fake score), is not judged:
    ``fell`` is None."""
    first, last = first_last_means(losses)
    judged = loss_falls and len(losses) >= 2
    verdict = {"round": round_name, "steps": len(losses), "first_loss": first, "last_loss": last,
               "fell": bool(last < first) if judged else None}
    if verdict["fell"] is False:
        log.warning("round %s: the loss did not fall (mean of the first 10%% of steps %.4g, of the last 10%% %.4g); "
                    "its student is likely no better than where it started: train longer, lower the learning rate "
                    "or look at the per-timestep losses in logs/metrics.csv", round_name, first, last)
    return verdict


def failed_rounds(summary_file: Path) -> list[dict]:
    """The rounds recorded as not falling in a run's ``training_summary.json`` (none if there is no such file)."""
    if not summary_file.is_file():
        return []
    verdicts = json.loads(summary_file.read_text()).get("round_health", [])
    return [v for v in verdicts if v.get("fell") is False]


def report_lines(summary_file: Path) -> list[str]:
    """Markdown lines for the evaluation report: one warning per failed round of the run beside it."""
    return [f"**Warning: training round {v['round']} did not converge** (loss: mean of its first 10% of steps "
            f"{v['first_loss']:.4g}, of its last 10% {v['last_loss']:.4g}); the student may be worse than its "
            f"recipe can make it." for v in failed_rounds(summary_file)]
