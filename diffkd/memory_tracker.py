"""The peak bytes of live tensor storages while code runs, the same for real and fake tensors.

Every tensor an op returns is seen by a dispatch mode; its storage is counted once, while it lives (a weak
reference's callback takes it off). Tensors made before the block (weights, Adam moments) are counted with
``track``. This is what torch's MemTracker does at its core; it is written out here because MemTracker refuses a
module called twice in one iteration (a teacher's two DDIM steps) and hooks the gradient of frozen parameters.
On a real CPU run its peak is the allocator's high-water mark of tensor storage, which is what a GPU's
``max_memory_allocated`` reports too, up to the caching allocator's rounding of each block to 512 bytes.
"""

from __future__ import annotations

import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


class PeakTracker(TorchDispatchMode):
    """``counts``: which tensors to count (default all); the validation's measure leaves out float64 ones, the
    features and Fréchet matrices a GPU run keeps on the host."""

    def __init__(self, counts=None):
        super().__init__()
        self.counts = counts
        self._live: dict[int, tuple[weakref.ref, int]] = {}
        self.current = 0
        self.peak = 0

    def track(self, *tensors: torch.Tensor) -> None:
        for tensor in tensors:
            self._add(tensor)

    def _add(self, tensor: torch.Tensor) -> None:
        if self.counts is not None and not self.counts(tensor):
            return
        storage = tensor.untyped_storage()
        key = id(storage)
        if key in self._live and self._live[key][0]() is storage:
            return
        size = storage.nbytes()
        self._live[key] = (weakref.ref(storage, lambda _ref, key=key: self._drop(key)), size)
        self.current += size
        self.peak = max(self.peak, self.current)

    def _drop(self, key: int) -> None:
        entry = self._live.pop(key, None)
        if entry is not None:
            self.current -= entry[1]

    def reset_peak(self) -> None:
        self.peak = self.current

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        output = func(*args, **(kwargs or {}))
        for leaf in tree_leaves(output):
            if isinstance(leaf, torch.Tensor) and not leaf.is_meta:
                self._add(leaf)
        return output
