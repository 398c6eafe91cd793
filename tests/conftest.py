"""Tiny models built in the tests: nothing is downloaded."""

import pytest
import torch
from diffusers import DDIMScheduler, UNet2DModel

torch.set_num_threads(2)


def make_tiny_unet(sample_size: int = 8, channels: int = 1, seed: int = 0) -> UNet2DModel:
    torch.manual_seed(seed)
    return UNet2DModel(sample_size=sample_size, in_channels=channels, out_channels=channels,
                       block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4,
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"))


def make_scheduler(prediction_type: str = "v_prediction", clip_sample: bool = False) -> DDIMScheduler:
    return DDIMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", prediction_type=prediction_type,
                         clip_sample=clip_sample, timestep_spacing="trailing", set_alpha_to_one=True)


@pytest.fixture
def tiny_unet() -> UNet2DModel:
    return make_tiny_unet()


TINY_TEACHER_OVERRIDES = {
    "method": {"name": "denoise", "num_steps": 300, "sample_size": 8, "channels": 1, "block_out_channels": [16, 32],
               "layers_per_block": 1, "attention_at_lowest": False, "sample_steps": 16},
    "data": {"source": "digits"},
    "train": {"batch_size": 64, "learning_rate": 2e-3, "lr_schedule": "cosine", "warmup_steps": 20,
              "ema_decay": 0.99, "checkpoint_every": 1000, "log_every": 50, "device": "cpu"},
}


@pytest.fixture(scope="session")
def tiny_teacher(tmp_path_factory) -> str:
    """A 8x8 digits teacher trained for a few seconds by the project's own denoise method."""
    from diffkd.api import distill
    from diffkd.config import parse_config

    output = tmp_path_factory.mktemp("tiny-teacher")
    return str(distill(parse_config(TINY_TEACHER_OVERRIDES), output))
