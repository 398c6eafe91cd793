"""Noise-schedule math as plain functions over tensors (k-diffusion style).

Notation follows Salimans & Ho 2022 ("Progressive Distillation", arXiv:2202.00512):
z_t = alpha_t * x + sigma_t * eps with alpha_t = sqrt(alphas_cumprod[t]) and sigma_t = sqrt(1 - alphas_cumprod[t]).
The index t = -1 stands for the clean sample (alpha = 1, sigma = 0), which is where diffusers' DDIMScheduler
with ``set_alpha_to_one=True`` lands on its last step.
"""

from __future__ import annotations

import torch

from diffkd.validation import LOSS_WEIGHTINGS, PREDICTION_TYPES

CLEAN = -1


def trailing_grid(num_train_timesteps: int, num_steps: int) -> list[int]:
    """The k-step "trailing" grid plus the clean end point: for T=1000, k=4 -> [999, 749, 499, 249, -1].

    Trailing spacing (Lin et al. 2023, Table 2) starts at the last training timestep, so one step really starts
    from pure noise. Grids nest: ``trailing_grid(T, 2k)[::2] == trailing_grid(T, k)``, which is what lets a
    k-step student learn two 2k-step teacher steps per step.
    """
    if num_steps < 1 or num_steps > num_train_timesteps:
        raise ValueError(f"num_steps must be in [1, {num_train_timesteps}], got {num_steps}")
    return [round(num_train_timesteps - i * num_train_timesteps / num_steps) - 1 for i in range(num_steps + 1)]


def alpha_sigma(alphas_cumprod: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """alpha_t and sigma_t for integer timesteps ``t`` (any shape); t = -1 gives (1, 0)."""
    t = torch.as_tensor(t, device=alphas_cumprod.device)
    abar = torch.where(t >= 0, alphas_cumprod[t.clamp(min=0)], torch.ones((), dtype=alphas_cumprod.dtype,
                                                                          device=alphas_cumprod.device))
    return abar.sqrt(), (1 - abar).sqrt()


def broadcast(coef: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Per-sample coefficients of shape (B,) or () shaped to multiply an image batch."""
    coef = coef.to(like.dtype)
    return coef.reshape(coef.shape + (1,) * (like.ndim - coef.ndim))


def to_x0_eps(output: torch.Tensor, z: torch.Tensor, alpha: torch.Tensor, sigma: torch.Tensor,
              prediction_type: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Convert a network output to (x0, eps) for z = alpha*x0 + sigma*eps; v = alpha*eps - sigma*x0 (eq. 31).

    'flow' is rectified flow's velocity u = eps - x0 (Liu et al. 2022): z = alpha x0 + sigma (x0 + u) gives
    x0 = (z - sigma u) / (alpha + sigma) and eps = (z + alpha u) / (alpha + sigma), on any path (alpha + sigma = 1
    on the flow path)."""
    a, s = broadcast(alpha, z), broadcast(sigma, z)
    if prediction_type == "epsilon":
        return (z - s * output) / a, output
    if prediction_type == "v_prediction":
        return a * z - s * output, a * output + s * z
    if prediction_type == "sample":
        return output, (z - a * output) / s
    if prediction_type == "flow":
        return (z - s * output) / (a + s), (z + a * output) / (a + s)
    raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}")


def from_x0_eps(x0: torch.Tensor, eps: torch.Tensor, alpha: torch.Tensor, sigma: torch.Tensor,
                prediction_type: str) -> torch.Tensor:
    """The network output that ``to_x0_eps`` maps back to (x0, eps)."""
    a, s = broadcast(alpha, x0), broadcast(sigma, x0)
    if prediction_type == "epsilon":
        return eps
    if prediction_type == "v_prediction":
        return a * eps - s * x0
    if prediction_type == "sample":
        return x0
    if prediction_type == "flow":
        return eps - x0
    raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}")


def ddim_step(x0: torch.Tensor, eps: torch.Tensor, alpha_next: torch.Tensor, sigma_next: torch.Tensor,
              clip_sample: float | None = None) -> torch.Tensor:
    """Deterministic DDIM update (Song et al. 2021, eq. 12 with eta = 0): z_s = alpha_s * x0 + sigma_s * eps.

    Like ``DDIMScheduler.step`` the clip applies to x0 only; eps keeps the network's value.
    """
    if clip_sample is not None:
        x0 = x0.clamp(-clip_sample, clip_sample)
    return broadcast(alpha_next, x0) * x0 + broadcast(sigma_next, x0) * eps


def progressive_target(z_t: torch.Tensor, z_target: torch.Tensor, alpha_t: torch.Tensor, sigma_t: torch.Tensor,
                       alpha_s: torch.Tensor, sigma_s: torch.Tensor) -> torch.Tensor:
    """The x that takes z_t to the teacher's two-step result z_target at s in one DDIM step (Alg. 2).

    x_tilde = (z_s - (sigma_s / sigma_t) z_t) / (alpha_s - (sigma_s / sigma_t) alpha_t). At the clean end
    (sigma_s = 0) this is z_s itself.
    """
    ratio = broadcast(sigma_s / sigma_t, z_t)
    return (z_target - ratio * z_t) / (broadcast(alpha_s, z_t) - ratio * broadcast(alpha_t, z_t))


def loss_weight(snr_t: torch.Tensor, kind: str) -> torch.Tensor:
    """Weight on the x-space MSE (Salimans & Ho, sec. 4): 'snr_trunc' = max(SNR, 1), their default;
    'snr' = SNR (the epsilon loss); 'constant' = 1; 'min_snr' = min(SNR, 5) (Hang et al. 2023)."""
    if kind == "snr_trunc":
        return snr_t.clamp(min=1.0)
    if kind == "snr":
        return snr_t
    if kind == "constant":
        return torch.ones_like(snr_t)
    if kind == "min_snr":
        return snr_t.clamp(max=5.0)
    raise ValueError(f"loss weighting must be one of {LOSS_WEIGHTINGS}, got {kind!r}")

