"""The sweep's PSNR against its closed form: 10 log10(1 / MSE) per image, on [0, 1] after uint8 rounding."""

import math

import pytest
import torch

from diffkd.evaluation.features import to_uint8
from diffkd.evaluation.sweep import psnr


def test_psnr_is_per_image_and_matches_the_closed_form():
    target = torch.full((3, 1, 4, 4), 100, dtype=torch.uint8)
    images = target.clone()
    images[0] += 1  # every pixel off by 1/255: 20 log10(255) = 48.13 dB
    images[1, 0, 0, :2] += 51  # two pixels of 16 off by 0.2: MSE = 2/16 * 0.04 = 0.005 -> 23.01 dB
    values = psnr(images, target)
    assert values.shape == (3,)
    assert values[0].item() == pytest.approx(20 * math.log10(255), abs=1e-9)
    assert values[1].item() == pytest.approx(-10 * math.log10(2 / 16 * 0.2 ** 2), abs=1e-9)
    assert values[2].item() == math.inf


def test_black_against_white_is_zero_db_and_order_does_not_matter():
    black, white = torch.zeros(1, 3, 2, 2, dtype=torch.uint8), torch.full((1, 3, 2, 2), 255, dtype=torch.uint8)
    assert psnr(black, white).item() == 0.0
    assert psnr(white, black).item() == 0.0


def test_images_in_minus_one_one_are_rounded_to_uint8_first():
    """The sweep scores to_uint8 images: [-1, 1] -> {0..255} rounded, so 1 - 2/255 is one level below white."""
    assert to_uint8(torch.tensor([-1.0, -1.5, 0.0, 1 - 2 / 255, 1.0, 2.0])).tolist() == [0, 0, 128, 254, 255, 255]
