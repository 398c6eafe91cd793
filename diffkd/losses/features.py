"""Feature-space alignment: named taps on teacher and student modules, 1x1 projections, per-tap normalised MSE.

Taps are forward hooks keyed by module path (torchdistill's ``forward_hook`` style) that store each module's output
in a dict and are removed when the ``capture`` block ends, also after an exception. They are always registered on
the *unwrapped* model and paths never carry DDP's ``module.`` prefix: BK-SDM's hooks silently stopped matching
under DDP for exactly that reason. diffusers blocks return tuples (hidden states, skip connections) or output
dataclasses; a tap keeps the first tensor.

Each tap's MSE is divided by the teacher feature's mean square, so every tap contributes a scale-free relative
error near 1 at the start, whatever the block's activation scale (BK-SDM's raw feature MSE dwarfed its other terms).
"""

from __future__ import annotations

import contextlib
import difflib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from diffusers.utils import BaseOutput
from torch import nn

from diffkd.errors import DiffkdError
from diffkd.models import dummy_inputs

DDP_PREFIX = "module."


def unwrap(model: nn.Module) -> nn.Module:
    """The network inside DDP/accelerate (``.module``) and ``torch.compile`` (``._orig_mod``) wrappers."""
    while True:
        inner = next((getattr(model, name) for name in ("module", "_orig_mod")
                      if isinstance(getattr(model, name, None), nn.Module)), None)
        if inner is None:
            return model
        model = inner


def canonical_path(path: str) -> str:
    """A module path without wrapper prefixes, so a tap named on a wrapped model still finds its module."""
    while path.startswith(DDP_PREFIX):
        path = path[len(DDP_PREFIX):]
    return path.removeprefix("_orig_mod.")


def first_tensor(output) -> torch.Tensor:
    """The main tensor of a module output: tuples and diffusers output dataclasses are unwrapped."""
    while not isinstance(output, torch.Tensor):
        if isinstance(output, BaseOutput):
            output = output.to_tuple()[0]
        elif isinstance(output, (tuple, list)) and output:
            output = output[0]
        else:
            raise DiffkdError(f"a feature tap got a {type(output).__name__}, not a tensor: tap a module that "
                              "returns a tensor or a tuple starting with one")
    return output


def resolve(model: nn.Module, paths: Sequence[str]) -> dict[str, nn.Module]:
    """Modules of the unwrapped ``model`` by path; an unknown path is a DiffkdError with the closest names."""
    modules = dict(unwrap(model).named_modules())
    found = {}
    for path in paths:
        name = canonical_path(path)
        if name not in modules:
            close = difflib.get_close_matches(name, list(modules), n=3)
            raise DiffkdError(f"feature tap {path!r} is not a module of {type(unwrap(model)).__name__}: use a path "
                              f"from named_modules(), e.g. {', '.join(close) or 'down_blocks.0'}")
        found[path] = modules[name]
    return found


@contextlib.contextmanager
def capture(model: nn.Module, paths: Sequence[str]) -> Iterator[dict[str, torch.Tensor]]:
    """Within the block, each forward of a module in ``paths`` stores its output under its path in the yielded
    dict (the latest call wins). Hooks are removed on exit, also when the block raises."""
    features: dict[str, torch.Tensor] = {}
    handles = []
    try:
        for path, module in resolve(model, paths).items():
            handles.append(module.register_forward_hook(_store(features, path)))
        yield features
    finally:
        for handle in handles:
            handle.remove()


def _store(features: dict[str, torch.Tensor], path: str):
    def hook(module: nn.Module, inputs, output) -> None:
        features[path] = first_tensor(output)
    return hook


def block_taps(teacher: nn.Module, student: nn.Module) -> list[tuple[str, str]]:
    """Pairs of (teacher path, student path) by block position: each down block, the mid-block when both have
    one, each up block. A derived student keeps the teacher's block count, so position pairs them exactly."""
    teacher, student = unwrap(teacher), unwrap(student)
    pairs = []
    for kind in ("down_blocks", "up_blocks"):
        count = min(len(getattr(teacher, kind, ())), len(getattr(student, kind, ())))
        pairs += [(f"{kind}.{i}", f"{kind}.{i}") for i in range(count)]
        if kind == "down_blocks" and getattr(teacher, "mid_block", None) is not None and \
                getattr(student, "mid_block", None) is not None:
            pairs.append(("mid_block", "mid_block"))
    if not pairs:
        raise DiffkdError(f"cannot pair feature taps of {type(teacher).__name__} and {type(student).__name__} by "
                          "block: list them in losses.feature_taps as 'teacher_path:student_path'")
    return pairs


def parse_taps(entries: Sequence[str]) -> list[tuple[str, str]]:
    """Config entries 'path' (same path in both) or 'teacher_path:student_path'."""
    pairs = []
    for entry in entries:
        teacher_path, _, student_path = entry.partition(":")
        if not teacher_path.strip():
            raise DiffkdError(f"losses.feature_taps entry {entry!r} names no module: write 'path' or "
                              "'teacher_path:student_path'")
        pairs.append((canonical_path(teacher_path.strip()), canonical_path(student_path.strip() or
                                                                           teacher_path.strip())))
    return pairs


@dataclass
class Tap:
    """One aligned pair; ``key`` names its loss term and its projection."""

    teacher: str
    student: str

    @property
    def key(self) -> str:
        return self.teacher if self.teacher == self.student else f"{self.teacher}:{self.student}"


class FeatureAlignment(nn.Module):
    """Per-tap normalised MSE between projected student features and teacher features (Romero et al. 2015's
    hints with a learned 1x1 regressor where widths differ; BK-SDM's feature-level KD).

    ``projections`` (an nn.ModuleDict) is trained with the student and never exported.
    """

    def __init__(self, taps: Sequence[tuple[str, str]], widths: dict[str, tuple[int, int]], eps: float = 1e-8):
        super().__init__()
        self.taps = [Tap(t, s) for t, s in taps]
        self.eps = eps
        self.projections = nn.ModuleDict()
        for tap in self.taps:
            teacher_width, student_width = widths[tap.key]
            if teacher_width != student_width:
                self.projections[_module_key(tap.key)] = nn.Conv2d(student_width, teacher_width, kernel_size=1)

    def project(self, tap: Tap, feature: torch.Tensor) -> torch.Tensor:
        key = _module_key(tap.key)
        if key not in self.projections:
            return feature
        projection = self.projections[key]
        return projection(feature.to(projection.weight.dtype))

    def forward(self, student: dict[str, torch.Tensor], teacher: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """One loss per tap: ||P(f_s) - f_t||^2 / ||f_t||^2, averaged over the batch."""
        losses = {}
        for tap in self.taps:
            if tap.student not in student or tap.teacher not in teacher:
                raise DiffkdError(f"feature tap {tap.key!r} did not fire during the forward pass: tap a module "
                                  "that the UNet runs (check losses.feature_taps)")
            target = teacher[tap.teacher].detach().float()
            pred = self.project(tap, student[tap.student]).float()
            if pred.shape != target.shape:
                raise DiffkdError(f"feature tap {tap.key!r}: student {tuple(pred.shape)} vs teacher "
                                  f"{tuple(target.shape)}: pair modules at the same resolution")
            error = (pred - target).pow(2).flatten(1).mean(1)
            scale = target.pow(2).flatten(1).mean(1)
            losses[tap.key] = (error / (scale + self.eps)).mean()
        return losses


def _module_key(key: str) -> str:
    """nn.ModuleDict keys may not contain '.'."""
    return key.replace(".", "_").replace(":", "__")


@torch.no_grad()
def probe_widths(teacher: nn.Module, student: nn.Module, taps: Sequence[tuple[str, str]]) -> dict[str, tuple[int, int]]:
    """Channel widths at each tap, found by one dummy forward of each network at batch size 1."""
    widths: dict[str, list[int]] = {Tap(t, s).key: [0, 0] for t, s in taps}
    for side, model in enumerate((unwrap(teacher), unwrap(student))):
        paths = sorted({pair[side] for pair in taps})
        was_training = model.training
        model.eval()
        try:
            with capture(model, paths) as features:
                model(**dummy_inputs(model, 1))
        finally:
            model.train(was_training)
        for t, s in taps:
            path = (t, s)[side]
            if path not in features:
                raise DiffkdError(f"feature tap {path!r} did not fire during a forward pass: tap a module the UNet "
                                  "runs")
            widths[Tap(t, s).key][side] = features[path].shape[1]
    return {k: (v[0], v[1]) for k, v in widths.items()}
