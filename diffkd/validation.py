"""The helpers every config section checks its values with, and the names a config may choose from.

Torch-free, like everything a config needs: ``diffkd --help`` and a one-line config error must not pay for
importing torch. The modules that implement these names (``schedule``, ``sampling``) import them from here, so a
name accepted by the config is a name the code knows.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from diffkd.errors import DiffkdError

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample", "flow")
LOSS_WEIGHTINGS = ("snr_trunc", "snr", "constant", "min_snr")
SAMPLERS = ("ddim", "heun", "dpmsolver++", "unipc")
VALIDATION_REFERENCES = ("auto", "data", "teacher")


def check(condition: bool, message: str) -> None:
    """Raise ``DiffkdError(message)`` (one line for the user) unless ``condition`` holds."""
    if not condition:
        raise DiffkdError(message)


def check_choice(key: str, value: Any, choices: Iterable) -> None:
    choices = tuple(choices)
    check(value in choices, f"{key} must be one of {', '.join(map(str, choices))}; got {value!r}")
