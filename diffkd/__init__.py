"""diffkd: distil diffusers pipelines into few-step and compact students, and measure what it bought.

Public API: ``distill(config, output)``, ``evaluate(eval_config)``, ``load_student(folder)``, ``load_config(path)``.
They are resolved on first use (PEP 562) for start-up time: every ``diffkd`` command imports this package first,
and ``diffkd --help`` or a config error must not pay for torch.
"""

__version__ = "0.1.0"


def __getattr__(name: str):
    if name in ("distill", "load_student"):
        from diffkd import api  # deferred for start-up time (see above)

        return getattr(api, name)
    if name == "load_config":
        from diffkd.config import load_config

        return load_config
    if name == "evaluate":
        from diffkd.evaluation.sweep import evaluate  # deferred for start-up time (see above)

        return evaluate
    raise AttributeError(f"module 'diffkd' has no attribute {name!r}")


__all__ = ["distill", "evaluate", "load_config", "load_student"]
