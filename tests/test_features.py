"""Feature taps: forward hooks keyed by module path that capture the right tensors and never outlive their block."""

import pytest
import torch
from torch import nn

from diffkd.config import StudentConfig
from diffkd.errors import DiffkdError
from diffkd.losses.features import block_taps, capture, first_tensor, parse_taps, probe_widths, unwrap
from diffkd.students import build_student


class Wrapper(nn.Module):
    """Stands in for DDP / accelerate: the network lives under ``.module``."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)


def hook_count(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) for m in model.modules())


def inputs(batch: int = 2):
    torch.manual_seed(1)
    return torch.randn(batch, 1, 8, 8), torch.tensor([10, 800][:batch])


def test_captures_the_modules_outputs_and_unwraps_tuples(tiny_unet):
    z, t = inputs()
    with capture(tiny_unet, ["conv_in", "down_blocks.0", "mid_block", "up_blocks.1"]) as features:
        out = tiny_unet(z, t).sample
    torch.testing.assert_close(features["conv_in"], tiny_unet.conv_in(z))
    # a down block returns (hidden_states, skip tensors): the tap keeps the hidden states
    assert features["down_blocks.0"].shape == (2, 8, 4, 4)
    assert features["mid_block"].shape == (2, 16, 4, 4)
    assert features["up_blocks.1"].shape == (2, 8, 8, 8)
    torch.testing.assert_close(tiny_unet.conv_out(tiny_unet.conv_act(tiny_unet.conv_norm_out(features["up_blocks.1"]))),
                               out)
    assert hook_count(tiny_unet) == 0


def test_hooks_are_removed_after_an_exception(tiny_unet):
    with pytest.raises(RuntimeError, match="boom"), capture(tiny_unet, ["down_blocks.0", "mid_block"]):
        assert hook_count(tiny_unet) == 2
        raise RuntimeError("boom")
    assert hook_count(tiny_unet) == 0


def test_wrapped_model_is_hooked_inside_and_ddp_prefix_is_ignored(tiny_unet):
    wrapped = Wrapper(Wrapper(tiny_unet))
    assert unwrap(wrapped) is tiny_unet
    z, t = inputs()
    with capture(wrapped, ["module.down_blocks.0", "mid_block"]) as features:
        wrapped(z, t)
    assert set(features) == {"module.down_blocks.0", "mid_block"}
    assert hook_count(wrapped) == 0


def test_unknown_tap_names_close_matches(tiny_unet):
    with pytest.raises(DiffkdError, match="'down_block.0' is not a module.*down_blocks.0"), \
            capture(tiny_unet, ["down_block.0"]):
        pass
    assert hook_count(tiny_unet) == 0


def test_first_tensor_unwraps_outputs_and_refuses_non_tensors():
    x = torch.ones(1)
    assert first_tensor(((x, (x,)), x)) is x
    with pytest.raises(DiffkdError, match="not a tensor"):
        first_tensor({"a": x})


def test_block_taps_pair_by_position_and_skip_a_dropped_mid_block(tiny_unet):
    assert block_taps(tiny_unet, tiny_unet) == [("down_blocks.0", "down_blocks.0"), ("down_blocks.1", "down_blocks.1"),
                                                ("mid_block", "mid_block"), ("up_blocks.0", "up_blocks.0"),
                                                ("up_blocks.1", "up_blocks.1")]
    student, _ = build_student(tiny_unet, StudentConfig(architecture="compact", drop_mid_block=True,
                                                        latency_batch_size=0))
    assert ("mid_block", "mid_block") not in block_taps(tiny_unet, Wrapper(student))


def test_explicit_taps_and_probed_widths(tiny_unet):
    assert parse_taps(["mid_block", "module.up_blocks.0:up_blocks.1"]) == [("mid_block", "mid_block"),
                                                                         ("up_blocks.0", "up_blocks.1")]
    with pytest.raises(DiffkdError, match="names no module"):
        parse_taps([":up_blocks.0"])
    student, _ = build_student(tiny_unet, StudentConfig(architecture="compact", width_multiplier=0.5,
                                                        latency_batch_size=0))
    widths = probe_widths(tiny_unet, student, block_taps(tiny_unet, student))
    assert widths == {"down_blocks.0": (8, 4), "down_blocks.1": (16, 8), "mid_block": (16, 8), "up_blocks.0": (16, 8),
                      "up_blocks.1": (8, 4)}
    assert hook_count(tiny_unet) == 0 and hook_count(student) == 0 and student.training
