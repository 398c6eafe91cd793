"""The loss split by timestep bucket: which part of the noise schedule a round's loss comes from.

Logged, never optimised (``LossTerms.metrics``). It is how issue 14 was diagnosed: on an epsilon teacher the
x-space targets at the top of the schedule, where alpha_t ~ 0.006, carry the teacher's epsilon error times
sigma_t / alpha_t ~ 160 and dominate a round's loss.
"""

from __future__ import annotations

import torch

NUM_BUCKETS = 4


def bucket_names(num_train_timesteps: int, num_buckets: int = NUM_BUCKETS) -> list[str]:
    """'t000-249', 't250-499', ... for T = 1000 and 4 buckets of equal width."""
    width = num_train_timesteps // num_buckets
    digits = len(str(num_train_timesteps - 1))
    return [f"t{b * width:0{digits}d}-{(num_train_timesteps if b == num_buckets - 1 else (b + 1) * width) - 1}"
            for b in range(num_buckets)]


def bucket_shares(per_sample: torch.Tensor, t: torch.Tensor, num_train_timesteps: int,
                  num_buckets: int = NUM_BUCKETS) -> dict[str, torch.Tensor]:
    """Each bucket's share of the batch-mean loss: sum of ``per_sample`` over the samples whose timestep lies in
    the bucket, divided by the batch size. The shares add up to ``per_sample.mean()`` (an empty bucket gives 0),
    so they average correctly over accumulation shards and logging steps. The clean end t = -1 counts as t = 0."""
    width = num_train_timesteps // num_buckets
    index = (t.clamp(min=0) // width).clamp(max=num_buckets - 1)
    per_sample = per_sample.detach()
    return {name: per_sample[index == b].sum() / len(per_sample)
            for b, name in enumerate(bucket_names(num_train_timesteps, num_buckets))}
