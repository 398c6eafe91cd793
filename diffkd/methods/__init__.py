"""The registry of methods: ``method.name`` in a config picks one of these; ``register`` adds one."""

from diffkd.methods.base import ExportSpec, LossTerms, Method, Network, Phase, Round
from diffkd.methods.denoise import DenoisingTraining
from diffkd.methods.generator import GeneratorDistillation
from diffkd.methods.progressive import ProgressiveDistillation

METHODS: dict[str, type[Method]] = {}


def register(method: type[Method]) -> type[Method]:
    """Make ``method`` selectable as ``method.name: <method.name>`` (usable as a class decorator)."""
    if not method.name or method.config_class.name != method.name:
        raise ValueError(f"{method.__name__} needs a name equal to its config_class's default name")
    METHODS[method.name] = method
    return method


for _method in (ProgressiveDistillation, GeneratorDistillation, DenoisingTraining):
    register(_method)

__all__ = ["METHODS", "ExportSpec", "LossTerms", "Method", "Network", "Phase", "Round", "register"]
