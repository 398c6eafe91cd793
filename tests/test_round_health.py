"""The round-health check (diffkd/round_health.py) and the per-timestep-bucket loss shares
(diffkd/timestep_buckets.py), against hand computations."""

import json
import logging

import pytest
import torch

from diffkd import round_health, timestep_buckets
from diffkd.methods.base import LossTerms


def test_first_last_means_by_hand():
    losses = [float(v) for v in range(1, 21)]  # 20 steps: 10% = 2 steps each end
    assert round_health.first_last_means(losses) == (1.5, 19.5)
    assert round_health.first_last_means([4.0, 2.0, 9.0]) == (4.0, 9.0)  # at least one step each end


def test_a_falling_round_passes_silently(caplog):
    with caplog.at_level(logging.WARNING):
        verdict = round_health.judge("64->32", [1.0, 0.9, 0.5, 0.3, 0.2, 0.1, 0.1, 0.05, 0.04, 0.03])
    assert verdict == {"round": "64->32", "steps": 10, "first_loss": 1.0, "last_loss": 0.03, "fell": True}
    assert not caplog.records


@pytest.mark.parametrize("losses", [[0.5] * 20, [0.4, 0.6] * 10, [0.74] + [0.8] * 18 + [0.86]])
def test_a_flat_or_rising_round_is_flagged_by_name(caplog, losses):
    with caplog.at_level(logging.WARNING):
        verdict = round_health.judge("32->16", losses)
    assert verdict["fell"] is False
    assert len(caplog.records) == 1 and caplog.records[0].levelno == logging.WARNING
    message = caplog.records[0].getMessage()
    assert "32->16" in message and f"{verdict['first_loss']:.4g}" in message and f"{verdict['last_loss']:.4g}" in message


def test_a_round_whose_loss_need_not_fall_is_not_judged(caplog):
    with caplog.at_level(logging.WARNING):
        verdict = round_health.judge("distribution matching", [0.5, 0.6, 0.7], loss_falls=False)
        short = round_health.judge("64->32", [0.5])
    assert verdict["fell"] is None and short["fell"] is None and not caplog.records


def test_report_lines_name_only_the_failed_rounds(tmp_path):
    summary = tmp_path / "training_summary.json"
    assert round_health.report_lines(summary) == []  # no run beside the evaluation: nothing to say
    summary.write_text(json.dumps({"round_health": [
        {"round": "64->32", "steps": 400, "first_loss": 0.74, "last_loss": 0.86, "fell": False},
        {"round": "32->16", "steps": 400, "first_loss": 0.015, "last_loss": 0.0003, "fell": True},
        {"round": "distribution matching", "steps": 400, "first_loss": 0.1, "last_loss": 0.2, "fell": None}]}))
    lines = round_health.report_lines(summary)
    assert len(lines) == 1 and "64->32" in lines[0] and "0.74" in lines[0] and "0.86" in lines[0]


def test_bucket_names():
    assert timestep_buckets.bucket_names(1000) == ["t000-249", "t250-499", "t500-749", "t750-999"]
    assert timestep_buckets.bucket_names(10, 3) == ["t0-2", "t3-5", "t6-9"]  # the last bucket takes the remainder


def test_bucket_shares_by_hand():
    per_sample = torch.tensor([1.0, 2.0, 4.0, 8.0, 16.0])
    t = torch.tensor([999, 10, 750, -1, 749])  # -1 (the clean end) counts as t = 0
    shares = timestep_buckets.bucket_shares(per_sample, t, 1000)
    expected = {"t000-249": (2 + 8) / 5, "t250-499": 0.0, "t500-749": 16 / 5, "t750-999": (1 + 4) / 5}
    assert {k: v.item() for k, v in shares.items()} == pytest.approx(expected)
    assert sum(shares.values()).item() == pytest.approx(per_sample.mean().item())


def test_metrics_are_logged_but_not_optimised():
    loss = torch.tensor(2.0, requires_grad=True)
    terms = LossTerms({"distill": loss}, metrics={"distill/t000-249": torch.tensor(0.5)})
    assert terms.total.item() == 2.0
    assert terms.logs() == {"loss/distill": 2.0, "loss/total": 2.0, "metric/distill/t000-249": 0.5}
