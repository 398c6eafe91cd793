"""Fréchet distance against its closed form, on rank-deficient covariances, and against torchmetrics; KID."""

import math

import numpy
import torch
from torch import nn
from torchmetrics.image.fid import FrechetInceptionDistance

from diffkd.evaluation.frechet import (
    frechet_distance,
    frechet_distance_of_features,
    gaussian_stats,
    kernel_distance,
)


def random_spd(dim: int, generator: torch.Generator) -> torch.Tensor:
    a = torch.randn(dim, dim, generator=generator, dtype=torch.float64)
    return a @ a.T / dim + 0.1 * torch.eye(dim, dtype=torch.float64)


def test_equals_closed_form_for_commuting_covariances():
    # Diagonal covariances commute, so tr sqrt(S1 S2) = sum sqrt(s1_i s2_i) exactly.
    g = torch.Generator().manual_seed(0)
    mu1, mu2 = torch.randn(16, generator=g, dtype=torch.float64), torch.randn(16, generator=g, dtype=torch.float64)
    s1, s2 = torch.rand(16, generator=g, dtype=torch.float64) + 0.1, torch.rand(16, generator=g, dtype=torch.float64)
    expected = float((mu1 - mu2).square().sum() + (s1.sqrt() - s2.sqrt()).square().sum())
    got = frechet_distance(mu1, torch.diag(s1), mu2, torch.diag(s2))
    assert math.isclose(got, expected, rel_tol=1e-6)


def test_equals_closed_form_for_general_covariances():
    # Non-commuting covariances with a known answer: S1 = R^2 and S2 = R^-1 M^2 R^-1 give
    # S1^1/2 S2 S1^1/2 = M^2, whose square root is M, so d = |dmu|^2 + tr S1 + tr S2 - 2 tr M.
    g = torch.Generator().manual_seed(1)
    values, vectors = torch.linalg.eigh(random_spd(8, g))
    root = vectors @ torch.diag(values.sqrt()) @ vectors.T
    m = random_spd(8, g)
    s1, s2 = root @ root, torch.linalg.inv(root) @ m @ m @ torch.linalg.inv(root)
    mu1, mu2 = torch.zeros(8, dtype=torch.float64), torch.full((8,), 0.5, dtype=torch.float64)
    expected = float(2.0 + s1.trace() + s2.trace() - 2 * m.trace())
    assert math.isclose(frechet_distance(mu1, s1, mu2, s2), expected, rel_tol=1e-6)


def test_zero_for_identical_and_real_finite_for_rank_deficient():
    g = torch.Generator().manual_seed(2)
    a, b = torch.randn(20, 64, generator=g), torch.randn(20, 64, generator=g) + 0.3  # rank 19 < 64
    assert abs(frechet_distance_of_features(a, a)) < 1e-9
    d = frechet_distance_of_features(a, b)
    assert isinstance(d, float) and math.isfinite(d) and d > 0
    # Shifting a set by c along every axis keeps its covariance and adds exactly 64 c^2.
    assert math.isclose(frechet_distance_of_features(a, a + 0.5), 64 * 0.25, rel_tol=1e-6)


class Identity(nn.Module):
    """A 'feature network' that returns the given features, so both implementations see the same numbers."""

    num_features = 32

    def forward(self, x):
        return x


def test_agrees_with_torchmetrics_fid_on_the_same_features():
    g = torch.Generator().manual_seed(3)
    mix = torch.randn(32, 32, generator=g)
    real = torch.randn(500, 32, generator=g) @ mix
    fake = torch.randn(400, 32, generator=g) @ (mix + 0.2 * torch.randn(32, 32, generator=g)) + 0.4
    fid = FrechetInceptionDistance(feature=Identity())
    fid.update(real, real=True)
    fid.update(fake, real=False)
    assert math.isclose(frechet_distance_of_features(real, fake), float(fid.compute()), rel_tol=1e-4)


def test_stats_are_float64_unbiased():
    x = torch.tensor([[0.0, 1.0], [2.0, 3.0], [4.0, 8.0]])
    mu, sigma = gaussian_stats(x)
    assert mu.dtype == sigma.dtype == torch.float64
    torch.testing.assert_close(sigma, torch.from_numpy(numpy.cov(x.numpy().T)))


def test_kid_is_zero_on_itself_and_grows_with_shift():
    g = torch.Generator().manual_seed(4)
    real = torch.randn(300, 16, generator=g)
    same, _ = kernel_distance(real, real, subsets=20, subset_size=100)
    kids = [kernel_distance(real, torch.randn(300, 16, generator=g) + shift, subsets=20, subset_size=100)[0]
            for shift in (0.0, 0.5, 1.0)]
    # The unbiased MMD^2 of a set with itself is O(1/m) around zero, tiny against a real shift.
    assert abs(same) < 0.1 * kids[1] and abs(kids[0]) < 0.1 * kids[1]
    assert kids[1] < kids[2]
