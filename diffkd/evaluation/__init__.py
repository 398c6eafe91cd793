"""Sample quality vs steps: sweep pipelines and training-free samplers, measure, and write a report.

``evaluate(EvalConfig(...)) -> EvalResults``. ``evaluate`` and ``EvalResults`` load the sweep on first use
(PEP 562) for start-up time: ``diffkd --help`` registers the eval command from ``diffkd.evaluation.cli``, and that
must not import torch and the metric stack.
"""

from diffkd.eval_options import EvalConfig


def __getattr__(name: str):
    if name in ("evaluate", "EvalResults"):
        from diffkd.evaluation import sweep  # deferred for start-up time (see above)

        return getattr(sweep, name)
    raise AttributeError(f"module 'diffkd.evaluation' has no attribute {name!r}")


__all__ = ["EvalConfig", "EvalResults", "evaluate"]
