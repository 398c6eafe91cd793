"""Sample quality vs steps: sweep pipelines and training-free samplers, measure, and write a report.

``evaluate(EvalConfig(...)) -> EvalResults``. ``evaluate`` is resolved lazily so that ``diffkd.config`` can embed
``EvalConfig`` without importing the sampling and metric stack (and without an import cycle).
"""

from diffkd.evaluation.config import EvalConfig


def __getattr__(name: str):
    if name in ("evaluate", "EvalResults"):
        from diffkd.evaluation import sweep

        return getattr(sweep, name)
    raise AttributeError(f"module 'diffkd.evaluation' has no attribute {name!r}")


__all__ = ["EvalConfig", "EvalResults", "evaluate"]
