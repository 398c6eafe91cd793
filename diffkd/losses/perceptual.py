"""LPIPS (Zhang et al. 2018) as a frozen module, for fidelity to the teacher in evaluation and as a training loss.

The lpips package ships its linear heads, but its torchvision backbone would be downloaded on construction. So the
backbone is built random (``pnet_rand``) and, unless asked to stay random, loaded from a file that
``diffkd.weights`` located first: offline, a missing file is one line naming it, never a download attempt.
"""

from __future__ import annotations

import contextlib
import io
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from diffkd.weights import TORCHVISION, locate_checkpoint

# Below this side AlexNet's strided convolutions and pools run out of pixels; smaller images are upsampled.
MIN_SIDE = 64


class LPIPSLoss(nn.Module):
    """Per-sample LPIPS distance between two image batches in [-1, 1] (1 or 3 channels).

    ``backbone_weights``: the torchvision checkpoint of ``net`` (default: found in the torch hub cache).
    ``pnet_rand``: keep the backbone random (code-path tests only: the distance is then meaningless).
    """

    def __init__(self, net: str = "alex", backbone_weights: str | None = None, pnet_rand: bool = False):
        super().__init__()
        import lpips

        if net not in TORCHVISION:
            raise ValueError(f"net must be one of {', '.join(TORCHVISION)}; got {net!r}")
        path = None
        if not pnet_rand:
            filename, url = TORCHVISION[net]
            path = locate_checkpoint(filename, url, backbone_weights, f"LPIPS ({net})",
                                     "losses.lpips_backbone_weights, eval.lpips_backbone_weights or "
                                     "--lpips-backbone-weights")
        with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # torchvision's 'pretrained' deprecation, said by lpips
            self.lpips = lpips.LPIPS(net=net, pnet_rand=True, verbose=False)
        self.weights_path = str(path) if path is not None else None
        if path is not None:
            load_backbone(self.lpips.net, torch.load(path, map_location="cpu", weights_only=True))
        self.requires_grad_(False).eval()

    def train(self, mode: bool = True) -> LPIPSLoss:
        """Always in eval mode: LPIPS's dropout must not act during a student's training."""
        return super().train(False)

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        a, b = _prepare(a), _prepare(b)
        return self.lpips(a, b).reshape(a.shape[0])


def _prepare(images: torch.Tensor) -> torch.Tensor:
    if images.shape[1] == 1:
        images = images.repeat(1, 3, 1, 1)
    side = min(images.shape[-2:])
    if side < MIN_SIDE:
        images = F.interpolate(images, scale_factor=MIN_SIDE / side, mode="bilinear", align_corners=False)
    return images.float()


def load_backbone(backbone: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """torchvision's ``features.<i>.*`` into lpips' ``slice<k>.<i>.*`` (lpips splits ``features`` into slices)."""
    mapped = {key: state["features." + key.split(".", 1)[1]] for key in backbone.state_dict()}
    backbone.load_state_dict(mapped)
