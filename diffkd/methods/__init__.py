"""The registry of methods: ``method.name`` in a config picks one of these."""

from diffkd.methods.base import ExportSpec, LossTerms, Method, Round
from diffkd.methods.denoise import DenoisingTraining
from diffkd.methods.generator import GeneratorDistillation
from diffkd.methods.progressive import ProgressiveDistillation

METHODS: dict[str, type[Method]] = {m.name: m for m in (ProgressiveDistillation, GeneratorDistillation, DenoisingTraining)}

__all__ = ["METHODS", "ExportSpec", "LossTerms", "Method", "Round"]
