"""diffkd: distil diffusers pipelines into few-step and compact students, and measure what it bought.

Public API: ``distill(config, output)``, ``evaluate(eval_config)``, ``load_student(folder)``, ``load_config(path)``.
They are resolved lazily (PEP 562) so that ``import diffkd.schedule`` stays light and free of import cycles.
"""

__version__ = "0.1.0"

_API = {"distill": "diffkd.api", "load_student": "diffkd.api", "load_config": "diffkd.config",
        "evaluate": "diffkd.evaluation"}


def __getattr__(name: str):
    if name in _API:
        import importlib

        return getattr(importlib.import_module(_API[name]), name)
    raise AttributeError(f"module 'diffkd' has no attribute {name!r}")


__all__ = ["distill", "evaluate", "load_config", "load_student"]
