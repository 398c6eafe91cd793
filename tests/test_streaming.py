"""Captioned sets streamed from disk (diffkd.captioned, diffkd.streaming): every format decodes the rows asked for,
each with its own caption, identically with and without workers; two ranks plan disjoint rows; unreadable rows can
be skipped and are counted; a killed run on each format resumes bit-identically."""

from types import SimpleNamespace

import pytest
import torch

from diffkd.api import distill
from diffkd.captioned import kind_of, open_captioned, shard_list
from diffkd.config import TrainConfig, parse_config
from diffkd.evaluation.sweep import read_card
from diffkd.methods.base import Phase
from diffkd.streaming import StreamedRows, Transform
from diffkd.trainer import Progress, Trainer
from tests import captioned_sets, faults

FORMATS = ["metadata", "webdataset", "saved"]


def keep_batch(pixels: torch.Tensor, captions: list[str]) -> dict:
    return {"x0": pixels, "captions": captions}


@pytest.mark.parametrize("kind", FORMATS)
def test_rows_decode_with_their_own_captions_alike_with_and_without_workers(kind, tmp_path):
    source = captioned_sets.write(kind, tmp_path / kind, 30, captioned_sets.flat_rows(8, "L"))
    assert kind_of(source) == kind
    captioned = open_captioned(source)
    plan = [((0,), [7, 0, 29]), ((1,), [12, 7])]
    runs = [list(StreamedRows(captioned, Transform(8, 1, False, False), keep_batch, workers, False).batches(plan))
            for workers in (0, 2)]
    for key, batch in runs[0]:
        rows = dict(plan)[key]
        assert batch["captions"] == [f"image {row}" for row in rows]  # each image's own caption
        assert ((batch["x0"][:, 0, 0, 0] + 1) * 127.5).round().tolist() == rows  # the row's own pixels
    assert [k for k, _ in runs[0]] == [k for k, _ in runs[1]]
    assert all(a["x0"].equal(b["x0"]) and a["captions"] == b["captions"] for (_, a), (_, b) in zip(*runs))


def test_shard_patterns_expand_and_join():
    assert shard_list("a-{0..2}.tar::b.tar") == ["a-0.tar", "a-1.tar", "a-2.tar", "b.tar"]


def test_resize_scales_and_crops_other_sizes(tmp_path):
    source = captioned_sets.write("metadata", tmp_path / "set", 3, captioned_sets.flat_rows(12, "RGB"))
    rows = StreamedRows(open_captioned(source), Transform(8, 1, True, True), keep_batch, 0, False)
    (_, batch), = rows.batches([((0,), [2])])
    assert batch["x0"].shape == (1, 1, 8, 8)


def test_skipped_rows_are_left_out_and_never_drawn(tmp_path):
    def pick(i):
        image, caption = captioned_sets.flat_rows(8, "L")(i)
        return (b"broken" if i in (1, 4) else image), ("" if i == 6 else caption)

    captioned = open_captioned(captioned_sets.write("metadata", tmp_path / "set", 8, pick))
    rows = StreamedRows(captioned, Transform(8, 1, False, False), keep_batch, 0, True)
    assert rows.skipped == 3 and len(rows) == 5
    (_, batch), = rows.batches([((0,), list(range(5)))])
    assert batch["captions"] == ["image 0", "image 2", "image 3", "image 5", "image 7"]


def plan_of(rank: int, world: int) -> list:
    trainer = Trainer.__new__(Trainer)
    trainer.train = TrainConfig(batch_size=8, gradient_accumulation_steps=2, seed=3)
    trainer.acc = SimpleNamespace(num_processes=world, process_index=rank)
    trainer.shards, trainer.num_rows = world * 2, 100
    trainer.phases, trainer.progress = [Phase("critic", ("a",), repeats=2), Phase("student", ("b",))], Progress()
    return list(trainer._plan(0, 3))


def test_two_ranks_plan_disjoint_rows_that_make_the_single_process_batch():
    ranks = [plan_of(rank, 2) for rank in (0, 1)]
    single = plan_of(0, 1)
    assert [key for key, _ in ranks[0]] == [key for key, _ in ranks[1]] == [
        (step, update, micro) for step in range(3) for update in range(3) for micro in range(2)]
    for (key, a), (_, b) in zip(*ranks):
        assert not set(a) & set(b) and len(a) == len(b) == 2
    def rows(plan: list, step: int, update: int) -> list[int]:
        return sorted(r for key, rows in plan if key[:2] == (step, update) for r in rows)

    for step in range(3):
        for update in range(3):
            both = rows(ranks[0], step, update) + rows(ranks[1], step, update)
            assert len(both) == 8 and sorted(both) == rows(single, step, update)


def tiny_run(teacher: str, source: str, **data) -> dict:
    return {"method": {"name": "progressive", "start_steps": 4, "final_steps": 2, "steps_per_round": 3},
            "teacher": {"source": teacher}, "data": {"source": source, "num_workers": 0, **data},
            "train": {"batch_size": 4, "device": "cpu", "checkpoint_every": 2, "log_every": 1},
            "run_eval": False}


def test_skipped_rows_are_counted_in_the_model_card(tiny_teacher, tmp_path):
    def pick(i):
        image, caption = captioned_sets.flat_rows(8, "L")(i)
        return (b"broken" if i == 2 else image), caption

    source = captioned_sets.write("metadata", tmp_path / "set", 10, pick)
    folder = distill(parse_config(tiny_run(tiny_teacher, source, skip_bad_rows=True)), tmp_path / "run")
    assert read_card(str(folder))["data_rows_skipped"] == 1


@pytest.mark.slow
def test_killed_run_on_a_streamed_set_resumes_bit_identical(tiny_teacher, tmp_path):
    """On WebDataset shards, the format furthest from an indexed table. A resumed run replans the same rows from its
    step (a pure function of seed and step) and every format decodes a row alike (the first test here), so one
    format's kill covers the three."""
    source = captioned_sets.write("webdataset", tmp_path / "shards", 40, captioned_sets.flat_rows(8, "L"))
    config = faults.write_yaml({**faults.progressive_config(tiny_teacher),
                                "data": {"source": source, "num_workers": 2}}, tmp_path / "run.yaml")
    reference = faults.reference_run("progressive", config, tmp_path)
    point = faults.KillPoint("after backward, round 2 step 3", [{"kind": "after-backward", "at": 9}])
    result = faults.kill_and_resume(point, config, reference, tmp_path / "killed")
    assert result.killed and result.identical, result.detail
