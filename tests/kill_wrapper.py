"""The diffkd CLI with a kill placed in it: ``python -m tests.kill_wrapper distill ...`` with ``DIFFKD_KILL`` set to a
JSON spec patches one function (the start of an optimiser step or of one update of a phase, the gradient
all-reduce after backward, the EMA step, a safetensors write, an fsync, a rename, the export) to SIGKILL its own
process the N-th time it is reached, or starts a timer that SIGKILLs it after a delay. Nothing in diffkd knows
about it. Without ``DIFFKD_KILL`` it is the plain CLI, plus the tests' two-network method (registered on import):
tests/test_two_ranks.py starts it under torchrun.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
from collections.abc import Callable

import tests.two_networks  # noqa: F401  (registers method.name: two-networks)


def die() -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def install(spec: dict) -> None:
    """Patch the function that ``spec["kind"]`` names so that its ``spec["at"]``-th call kills the process."""
    from diffusers import training_utils

    from diffkd import api, checkpoint, trainer

    calls = {"n": 0}

    def reached() -> bool:
        calls["n"] += 1
        return calls["n"] == spec["at"]

    def wrap(owner, name: str, before: Callable | None = None, after: Callable | None = None) -> None:
        original = getattr(owner, name)

        def patched(*args, **kwargs):
            if before and reached():
                before(*args, **kwargs)
            result = original(*args, **kwargs)
            if after and reached():
                after(*args, **kwargs)
            return result
        setattr(owner, name, patched)

    def half_written(tensors, path, *args, **kwargs) -> None:
        size = os.path.getsize(path)
        with open(path, "r+b") as handle:
            handle.truncate(size // 2)
        die()

    def partial_export(folder, *args, **kwargs) -> None:
        os.makedirs(os.path.join(folder, "unet"), exist_ok=True)
        with open(os.path.join(folder, "unet", "diffusion_pytorch_model.safetensors"), "wb") as handle:
            handle.write(b"partial")
        die()

    def kill(*args, **kwargs) -> None:
        die()

    kind = spec["kind"]
    if kind == "step-start":
        wrap(trainer.Trainer, "_optimizer_step", before=kill)
    elif kind == "update-start":  # one update of one phase: at = k kills after k - 1 updates, between phases
        wrap(trainer.Trainer, "_update", before=kill)
    elif kind == "after-backward":
        wrap(trainer.Trainer, "_reduce_gradients", before=kill)
    elif kind == "before-ema":
        wrap(training_utils.EMAModel, "step", before=kill)
    elif kind == "checkpoint-file":
        wrap(checkpoint, "save_file", after=half_written)
    elif kind == "cache-file":
        from diffkd import sample_cache
        wrap(sample_cache, "save_file", after=half_written)
    elif kind == "checkpoint-fsync":
        wrap(checkpoint, "_fsync", after=kill)
    elif kind == "after-rename":
        wrap(checkpoint, "complete", before=kill)
    elif kind == "mid-prune":
        original = checkpoint.shutil.rmtree

        def rmtree(path, *args, **kwargs):
            if ".trash-" in str(path) and reached():
                die()
            return original(path, *args, **kwargs)
        checkpoint.shutil.rmtree = rmtree
    elif kind == "export-partial":
        wrap(api, "save_pipeline", before=partial_export)
    elif kind == "export-done":
        wrap(api, "save_pipeline", after=kill)
    elif kind == "timer":
        original_fit = trainer.Trainer.fit

        def fit(self, *args, **kwargs):
            threading.Timer(spec["seconds"], die).start()
            return original_fit(self, *args, **kwargs)
        trainer.Trainer.fit = fit
    else:
        raise SystemExit(f"unknown kill kind {kind}")


if __name__ == "__main__":
    spec = json.loads(os.environ.get("DIFFKD_KILL") or "null")
    if spec:
        install(spec)
    from diffkd.cli import main

    sys.exit(main(sys.argv[1:]))
