"""LPIPSLoss: a frozen per-sample distance that loads its backbone from a file and never downloads."""

import pytest
import torch
import torchvision

from diffkd.errors import DiffkdError
from diffkd.losses.perceptual import LPIPSLoss


def test_distance_is_per_sample_zero_on_equal_and_symmetric():
    loss = LPIPSLoss(pnet_rand=True)
    a, b = torch.rand(2, 4, 3, 16, 16) * 2 - 1
    d = loss(a, b)
    assert d.shape == (4,) and (d > 0).all()
    torch.testing.assert_close(loss(a, a), torch.zeros(4), atol=1e-6, rtol=0)
    torch.testing.assert_close(loss(b, a), d)


def test_gray_images_are_repeated_to_three_channels():
    loss = LPIPSLoss(pnet_rand=True)
    a, b = torch.rand(2, 3, 1, 8, 8) * 2 - 1
    torch.testing.assert_close(loss(a, b), loss(a.repeat(1, 3, 1, 1), b.repeat(1, 3, 1, 1)))


def test_frozen_in_eval_mode_but_passes_gradients_to_images():
    loss = LPIPSLoss(pnet_rand=True).train()
    assert not loss.training and not any(p.requires_grad for p in loss.parameters())
    a = (torch.rand(2, 1, 16, 16) * 2 - 1).requires_grad_()
    loss(a, torch.zeros(2, 1, 16, 16)).sum().backward()
    assert a.grad is not None and a.grad.abs().sum() > 0


def test_backbone_is_loaded_from_an_explicit_torchvision_file(tmp_path):
    torch.manual_seed(0)
    alexnet = torchvision.models.alexnet()
    torch.save(alexnet.state_dict(), tmp_path / "alexnet.pth")
    loss = LPIPSLoss(backbone_weights=str(tmp_path / "alexnet.pth"))
    torch.testing.assert_close(loss.lpips.net.slice1[0].weight, alexnet.features[0].weight)
    torch.testing.assert_close(getattr(loss.lpips.net.slice5, "10").weight, alexnet.features[10].weight)
    assert loss.weights_path == str(tmp_path / "alexnet.pth")


def test_missing_backbone_is_one_line_naming_file_and_place_without_network(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))

    def no_network(*args, **kwargs):
        raise AssertionError("tried to download")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", no_network)
    with pytest.raises(DiffkdError) as error:
        LPIPSLoss(net="alex")
    message = str(error.value)
    assert "\n" not in message
    assert "alexnet-owt-7be5be79.pth" in message and str(tmp_path / "hub" / "checkpoints") in message
    with pytest.raises(DiffkdError, match="vgg16-397923af.pth"):
        LPIPSLoss(net="vgg", backbone_weights=str(tmp_path / "nothing.pth"))


class RecordingBackbone(torch.nn.Module):
    """Wraps lpips' backbone and keeps what it is handed."""

    def __init__(self, inner: torch.nn.Module):
        super().__init__()
        self.inner, self.seen = inner, []

    def forward(self, x):
        self.seen.append(x.detach().clone())
        return self.inner(x)


def test_images_in_minus_one_one_reach_the_backbone_through_lpips_own_scaling_only():
    """LPIPS was calibrated on images in [-1, 1] (lpips' ``normalize=False``): the backbone must get exactly
    (image - shift) / scale with lpips v0.1's ImageNet constants, nothing else (no [0, 1] -> [-1, 1] remap)."""
    loss = LPIPSLoss(pnet_rand=True)
    loss.lpips.net = RecordingBackbone(loss.lpips.net)
    a = torch.linspace(-1, 1, 3 * 64 * 64).reshape(1, 3, 64, 64)
    b = -a
    loss(a, b)
    shift = torch.tensor([-0.030, -0.088, -0.188]).reshape(1, 3, 1, 1)
    scale = torch.tensor([0.458, 0.448, 0.450]).reshape(1, 3, 1, 1)
    first, second = loss.lpips.net.seen
    torch.testing.assert_close(first, (a - shift) / scale)
    torch.testing.assert_close(second, (b - shift) / scale)


def test_distance_equals_lpips_on_zero_one_images_with_normalize_and_not_the_misread_range():
    """The same number as lpips' own [0, 1] entry point on (x + 1) / 2; handing [-1, 1] images to that entry
    point (reading them as [0, 1]) gives another number."""
    torch.manual_seed(0)
    loss = LPIPSLoss(pnet_rand=True)
    a, b = torch.rand(2, 2, 3, 64, 64) * 2 - 1
    ours = loss(a, b)
    torch.testing.assert_close(ours, loss.lpips((a + 1) / 2, (b + 1) / 2, normalize=True).reshape(2))
    misread = loss.lpips(a, b, normalize=True).reshape(2)
    assert ((ours - misread).abs() > 1e-3 * ours).all(), (ours, misread)
