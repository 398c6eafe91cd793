"""A two-network toy method for the trainer's tests: a student plus a critic updated ``critic_updates`` times per
student step, and a frozen target network that follows the student by its own EMA after every step.

It is no published method; it exercises everything a two-time-scale method (DMD2's fake score, a consistency
model's target) asks of the trainer: two optimisers with their own settings, phases, a follower that changes
training (the critic regresses the target network's error), and a loss that reaches the critic from the student
phase. Importing this module registers it as ``method.name: two-networks``.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

from diffkd import schedule
from diffkd.config import MethodConfig
from diffkd.data import load_images
from diffkd.losses.terms import LossTerms
from diffkd.methods import ExportSpec, Method, Network, Phase, Round, register
from diffkd.validation import check


@dataclass
class TwoNetworkConfig(MethodConfig):
    name: str = "two-networks"
    num_steps: int = 6
    critic_updates: int = 3
    critic_learning_rate: float = 3e-3
    critic_weight: float = 0.1
    target_decay: float = 0.5

    def __post_init__(self):
        check(self.num_steps >= 1 and self.critic_updates >= 1, "method.num_steps and critic_updates must be >= 1")


@register
class TwoNetworkToy(Method):
    name = "two-networks"
    config_class = TwoNetworkConfig

    def __init__(self, config, teacher, student):
        super().__init__(config, teacher, student)
        channels = teacher.image_channels
        self.critic = nn.Sequential(nn.Conv2d(channels, 8, 3, padding=1), nn.SiLU(),
                                    nn.Conv2d(8, channels, 3, padding=1)).to(next(student.parameters()).device)
        self.target = copy.deepcopy(student).requires_grad_(False)

    def networks(self) -> dict[str, Network]:
        return {**super().networks(),
                "critic": Network(self.critic, learning_rate=self.options.critic_learning_rate, adam_betas=(0.0, 0.99))}

    def phases(self) -> list[Phase]:
        return [Phase("critic", ("critic",), repeats=self.options.critic_updates), Phase("student", ("student",))]

    def followers(self) -> dict[str, nn.Module]:
        return {"target": self.target}

    def rounds(self) -> list[Round]:
        return [Round("toy", self.options.num_steps)]

    def dataset(self) -> dict[str, torch.Tensor]:
        return {"x0": load_images(self.config.data.source, self.teacher.image_size, self.teacher.image_channels)}

    def loss(self, phase: str, batch: dict[str, torch.Tensor], generator: torch.Generator) -> LossTerms:
        x = batch["x0"]
        model = self.teacher.denoiser
        t = torch.randint(0, model.num_train_timesteps, (x.shape[0],), generator=generator).to(x.device)
        eps = torch.randn(x.shape, generator=generator).to(x.device)
        alpha, sigma = model.alpha_sigma(t)
        z = schedule.broadcast(alpha, x) * x + schedule.broadcast(sigma, x) * eps
        target = schedule.from_x0_eps(x, eps, alpha, sigma, model.prediction_type)
        if phase == "critic":
            with torch.no_grad():
                error = self.target(z, t).sample - target
            return LossTerms({"critic": (self.critic(z) - error).pow(2).mean()})
        prediction = self.student(z, t).sample
        return LossTerms({"denoise": (prediction - target).pow(2).mean(),
                          "critic": self.critic(z).mul(prediction).mean()}, {"critic": self.options.critic_weight})

    @torch.no_grad()
    def after_step(self) -> None:
        for follower, trained in zip(self.target.parameters(), self.student.parameters()):
            follower.lerp_(trained, 1 - self.options.target_decay)

    def export_spec(self) -> ExportSpec:
        return ExportSpec(self.teacher.scheduler, 4, self.prediction_type)
