"""Distances between feature sets: the Fréchet distance (FID's formula) and the kernel distance (KID).

The Fréchet distance between N(mu1, S1) and N(mu2, S2) is |mu1 - mu2|^2 + tr(S1 + S2 - 2 (S1^1/2 S2 S1^1/2)^1/2)
(Dowson & Landau 1982; Heusel et al. 2017). Statistics are float64, and the trace of the square root is taken from
the eigenvalues of the symmetric PSD matrix S1^1/2 S2 S1^1/2, so it stays real and finite when the covariances are
rank-deficient (fewer samples than feature dimensions), where sqrtm of the non-symmetric S1 S2 goes complex.
KID is torchmetrics' polynomial-kernel MMD (Binkowski et al. 2018) over seeded random subsets.
"""

from __future__ import annotations

import torch
from torchmetrics.image.kid import poly_mmd


def gaussian_stats(features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and unbiased covariance (N - 1, as torchmetrics) of N x D features, in float64."""
    features = features.double()
    if features.shape[0] < 2:
        raise ValueError(f"a covariance needs at least 2 samples, got {features.shape[0]}")
    mu = features.mean(0)
    centred = features - mu
    return mu, centred.T @ centred / (features.shape[0] - 1)


def _psd_sqrt(matrix: torch.Tensor) -> torch.Tensor:
    """Square root of a symmetric PSD matrix; round-off negative eigenvalues count as zero."""
    values, vectors = torch.linalg.eigh((matrix + matrix.T) / 2)
    return (vectors * values.clamp(min=0).sqrt()) @ vectors.T


def frechet_distance(mu1: torch.Tensor, sigma1: torch.Tensor, mu2: torch.Tensor, sigma2: torch.Tensor) -> float:
    """Fréchet distance between two Gaussians given by their means and covariances (float64 throughout)."""
    mu1, sigma1, mu2, sigma2 = (x.double() for x in (mu1, sigma1, mu2, sigma2))
    root1 = _psd_sqrt(sigma1)
    middle = root1 @ sigma2 @ root1
    trace_sqrt = torch.linalg.eigvalsh((middle + middle.T) / 2).clamp(min=0).sqrt().sum()
    distance = (mu1 - mu2).square().sum() + sigma1.trace() + sigma2.trace() - 2 * trace_sqrt
    return float(distance.clamp(min=0))


def frechet_distance_of_features(a: torch.Tensor, b: torch.Tensor) -> float:
    """Fréchet distance between the Gaussians fitted to two feature sets."""
    return frechet_distance(*gaussian_stats(a), *gaussian_stats(b))


def kernel_distance(real: torch.Tensor, fake: torch.Tensor, subsets: int = 50, subset_size: int = 1000,
                    seed: int = 0) -> tuple[float, float]:
    """KID: mean and standard deviation of the unbiased polynomial-kernel MMD^2 over random subsets.

    The subset size is capped at the smaller set, so small evaluations still give a number.
    """
    size = min(subset_size, real.shape[0], fake.shape[0])
    generator = torch.Generator().manual_seed(seed)
    real, fake = real.double(), fake.double()
    values = torch.stack([
        poly_mmd(real[torch.randperm(real.shape[0], generator=generator)[:size]],
                 fake[torch.randperm(fake.shape[0], generator=generator)[:size]])
        for _ in range(subsets)])
    return float(values.mean()), float(values.std(unbiased=False)) if subsets > 1 else 0.0
