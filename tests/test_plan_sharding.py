"""The memory plan of a sharded run (train.shard, diffkd plan --processes N), by hand: each process keeps 1/N of
the trained networks' weights, gradients, Adam moments and EMA and the frozen teacher whole, and holds whole the
weights FSDP gathers while they run: the root unit and the two largest blocks (the running one, the prefetched);
gradients are traced as reduce-scattered."""

from torch import nn

from diffkd.method_options import METHODS
from diffkd.plan import Levers, _gathered_bytes, trace_step
from diffkd.plan_layouts import Layout
from diffkd.plan_step import step_spec

TINY = Layout("tiny", "unet2d", {"sample_size": 8, "in_channels": 1, "out_channels": 1, "block_out_channels": [16, 32],
                                 "layers_per_block": 1, "norm_num_groups": 8,
                                 "down_block_types": ["DownBlock2D", "AttnDownBlock2D"],
                                 "up_block_types": ["AttnUpBlock2D", "UpBlock2D"]}, 0)


def test_gathered_weights_are_the_root_unit_and_the_two_largest_blocks():
    class Toy(nn.Module):
        def __init__(self):
            super().__init__()
            self.down_blocks = nn.ModuleList([nn.Linear(4, 4), nn.Linear(8, 8), nn.Linear(2, 2)])
            self.mid_block = nn.Linear(6, 6)
            self.conv_out = nn.Linear(3, 3)  # the root unit's own

    assert _gathered_bytes(Toy()) == 4 * ((3 * 3 + 3) + (8 * 8 + 8) + (6 * 6 + 6))


def test_sharded_plan_divides_the_trained_state_and_keeps_the_teacher_whole():
    """Weights, moments and EMA live through the step: (N - 1)/N of them comes off the peak exactly; gradients,
    reduce-scattered as each is complete in the trace, take off at most their (N - 1)/N, and some of it when they
    are alive at the peak."""
    spec = step_spec("dmd", METHODS["dmd"].options())
    # batch 1: the optimiser step, with every gradient alive, sets the peak (at batch 4 the activations do)
    one = trace_step(spec, TINY, 1, Levers(mixed_precision="no", export_ema=True))
    four = trace_step(spec, TINY, 1, Levers(mixed_precision="no", export_ema=True, shard_processes=4))
    persistent = ["student weights", "student Adam moments", "fake_score weights", "fake_score Adam moments",
                  "student export EMA"]
    grads = ["student grads", "fake_score grads"]
    assert all(four.roles[role] == one.roles[role] // 4 for role in persistent + grads)
    assert four.roles["teacher weights"] == one.roles["teacher weights"]
    gathered = four.roles["weights gathered whole (sharding)"]
    assert 0 < gathered < one.roles["student weights"]
    saved = sum(one.roles[role] - four.roles[role] for role in persistent)
    most_grads = sum(one.roles[role] - four.roles[role] for role in grads)
    assert one.peak_bytes - saved - most_grads + gathered <= four.peak_bytes < one.peak_bytes - saved + gathered
