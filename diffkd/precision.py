"""The torch dtype of a config precision name (``train.mixed_precision``, ``train.frozen_dtype``), in one map: the
run's frozen weights, its validation's autocast and the memory plan read the same names, so they cannot disagree."""

from __future__ import annotations

import torch

DTYPES = {"no": torch.float32, "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def autocast(device_type: str, precision: str):
    """torch.autocast at ``precision``; off (a no-op context) for full precision."""
    dtype = DTYPES[precision]
    return torch.autocast(device_type, dtype=dtype, enabled=dtype is not torch.float32)
