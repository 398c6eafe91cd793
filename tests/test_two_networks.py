"""The trainer with several networks (tests/two_networks.py: a critic updated 3 times per student step, a target
network that follows the student): phases run in order with their own optimiser settings, followers survive a
checkpoint, a non-finite loss in any phase follows train.nan_policy, and a run killed between phases or while a
checkpoint holding both optimisers is written resumes bit-identically."""

import csv

import pytest
from torch import nn

import tests.two_networks  # noqa: F401  (registers method.name: two-networks)
from diffkd import checkpoint
from diffkd.api import distill, prepare
from diffkd.config import parse_config
from diffkd.errors import DiffkdError, TrainingDiverged
from diffkd.methods import Network, Phase, method_class, register
from diffkd.methods.progressive import ProgressiveDistillation
from diffkd.trainer import Trainer, check_layout, make_accelerator, step_seed
from tests import faults
from tests.two_networks import TwoNetworkToy


def config(teacher: str, **train):
    data = faults.two_networks_config(teacher)
    data["method"]["num_steps"] = 3
    data["train"].update({"checkpoint_every": 1, "keep_checkpoints": 10, **train})
    return parse_config(data)


def test_phases_run_in_order_with_their_own_learning_rates(tiny_teacher, tmp_path, monkeypatch):
    calls = []
    original = TwoNetworkToy.loss

    def loss(self, phase, batch, generator):
        calls.append(phase)
        return original(self, phase, batch, generator)

    monkeypatch.setattr(TwoNetworkToy, "loss", loss)
    distill(config(tiny_teacher), tmp_path / "run")
    assert calls == (["critic"] * 3 + ["student"]) * 3
    with (tmp_path / "run" / "logs" / "metrics.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    # linear schedule over 3 steps: factor 1, 2/3, 1/3 of each network's own LR (critic 3e-3, student 1e-3)
    assert [float(r["critic/lr"]) for r in rows] == pytest.approx([3e-3, 2e-3, 1e-3])
    assert [float(r["student/lr"]) for r in rows] == pytest.approx([1e-3, 2e-3 / 3, 1e-3 / 3])
    assert {"critic/loss/critic", "student/loss/denoise", "student/loss/critic", "student/grad_norm"} <= set(rows[0])


def test_checkpoint_holds_every_network_optimiser_and_follower(tiny_teacher, tmp_path):
    distill(config(tiny_teacher), tmp_path / "run")
    tensors, state = checkpoint.load(tmp_path / "run" / "checkpoints" / checkpoint.name_for(0, 2))
    assert {"student", "critic", "optimizer.critic", "optimizer.student", "ema.student", "follower.target"} == set(
        tensors)
    assert set(state["optimizers"]) == {"critic", "student"} and state["ema_steps"] == {"student": 2}
    # the critic's Adam has taken 3 updates a step, the student's 1
    assert tensors["optimizer.critic"]["0.step"].item() == 6 and tensors["optimizer.student"]["0.step"].item() == 2
    assert state["optimizers"]["critic"]["param_groups"][0]["betas"] == [0.0, 0.99]


def test_restore_puts_the_follower_back(tiny_teacher, tmp_path):
    run = tmp_path / "run"
    distill(config(tiny_teacher), run)
    settings = config(tiny_teacher)
    _, method, _ = prepare(settings)
    trainer = Trainer(method, settings.train, run, make_accelerator(settings.train, run))
    trainer.restore(run / "checkpoints" / checkpoint.name_for(0, 2))
    saved, _ = checkpoint.load(run / "checkpoints" / checkpoint.name_for(0, 2))
    restored = method.target.state_dict()
    assert all(restored[k].equal(v) for k, v in saved["follower.target"].items())
    assert not restored["conv_in.weight"].equal(method.student.state_dict()["conv_in.weight"])  # it lags behind


@pytest.mark.parametrize("policy", ["stop", "skip"])
def test_nonfinite_loss_in_the_critic_phase_follows_nan_policy(tiny_teacher, tmp_path, monkeypatch, policy):
    original = TwoNetworkToy.loss
    calls = {"critic": 0}

    def loss(self, phase, batch, generator):
        terms = original(self, phase, batch, generator)
        if phase == "critic":
            calls["critic"] += 1
            if calls["critic"] == 5:  # step 2, its second critic update
                terms.terms["critic"] = terms.terms["critic"] * float("nan")
        return terms

    monkeypatch.setattr(TwoNetworkToy, "loss", loss)
    if policy == "stop":
        with pytest.raises(TrainingDiverged, match="non-finite loss term\\(s\\) critic in phase critic at round 1, "
                                                   "step 2"):
            distill(config(tiny_teacher), tmp_path / "run")
        return
    distill(config(tiny_teacher, nan_policy="skip"), tmp_path / "run")
    with (tmp_path / "run" / "logs" / "metrics.csv").open() as handle:
        assert [r["step"] for r in csv.DictReader(handle)] == ["1", "3"]  # the skipped step logs nothing
    assert calls["critic"] == 8  # step 2 stopped at its bad update: 3 + 2 + 3


def test_first_update_keeps_the_one_update_seed_and_later_updates_get_their_own():
    assert step_seed(1, 2, 3, 4) == step_seed(1, 2, 3, 4, update=0) == ((1 * 1_000 + 2) * 10_000_000 + 3) * 64 + 4
    seeds = {step_seed(0, 0, step, shard, update) for step in range(4) for shard in range(3) for update in range(4)}
    assert len(seeds) == 4 * 3 * 4


def test_a_wrong_layout_is_named():
    student, critic = nn.Linear(1, 1), nn.Linear(1, 1)
    good = {"student": Network(student, exported=True), "critic": Network(critic)}
    check_layout("Toy", good, [Phase("critic", ("critic",), 3), Phase("student", ("student",))], {})
    with pytest.raises(DiffkdError, match="do not update each of \\['student', 'critic'\\] exactly once"):
        check_layout("Toy", good, [Phase("student", ("student",))], {})
    with pytest.raises(DiffkdError, match="0 networks are exported"):
        check_layout("Toy", {"student": Network(student)}, [Phase("student", ("student",))], {})
    with pytest.raises(DiffkdError, match="not identifiers"):
        check_layout("Toy", good, [Phase("all", ("student", "critic"))], {"target.ema": student})


def test_register_refuses_a_name_its_config_does_not_carry():
    class Misnamed(ProgressiveDistillation):
        name = "misnamed"

    with pytest.raises(ValueError, match="config_class's default name"):
        register(Misnamed)
    assert method_class("two-networks") is TwoNetworkToy


@pytest.fixture(scope="module")
def two_networks_reference(tiny_teacher, tmp_path_factory):
    work = tmp_path_factory.mktemp("kill-two-networks")
    config = faults.write_yaml(faults.two_networks_config(tiny_teacher), work / "two-networks.yaml")
    return config, faults.reference_run("two-networks", config, work), work


@pytest.mark.slow
@pytest.mark.parametrize("at", ["between phases", "both optimisers"])
def test_killed_two_network_run_resumes_bit_identical(at, two_networks_reference):
    config, reference, work = two_networks_reference
    point = next(p for p in faults.KILL_POINTS if p.method == "two-networks" and at in p.name)
    result = faults.kill_and_resume(point, config, reference, work / f"kill-{at.replace(' ', '-')}")
    assert result.killed and result.identical, result.detail
