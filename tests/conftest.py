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
