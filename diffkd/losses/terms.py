"""Named, weighted loss terms: what every method's loss returns and every KD term is appended to.

A weighted sum of named terms whose values are all logged (torchdistill's high-level losses), so that each term of
BK-SDM's L_task + w_out * L_outKD + w_feat * L_featKD shows up on its own in the logs.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class LossTerms:
    """Named loss terms (each a scalar) and their weights; ``total`` is the weighted sum that is optimised.
    ``metrics`` are logged beside them (as ``metric/NAME``) but never optimised: diagnostics such as the loss per
    timestep bucket."""

    terms: dict[str, torch.Tensor]
    weights: dict[str, float] = field(default_factory=dict)
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def total(self) -> torch.Tensor:
        return sum(self.weights.get(name, 1.0) * value for name, value in self.terms.items())

    def add(self, name: str, value: torch.Tensor, weight: float = 1.0) -> None:
        self.terms[name] = value
        self.weights[name] = weight

    def logs(self) -> dict[str, float]:
        values = {f"loss/{name}": float(value.detach()) for name, value in self.terms.items()}
        values["loss/total"] = float(self.total.detach())
        values.update({f"metric/{name}": float(value.detach()) for name, value in self.metrics.items()})
        return values
