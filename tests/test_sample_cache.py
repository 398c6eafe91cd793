"""The teacher-sample cache: pure-function noise, sharded and resumable without duplicating or losing pairs."""

import json

import pytest
import torch
from diffusers import DDIMPipeline

from diffkd import sample_cache
from diffkd.errors import DiffkdError
from diffkd.io import LoadedPipeline, denoiser_of
from diffkd.sample_cache import SampleCache, ensure, pair_noise
from diffkd.sampling import ddim_sample
from tests.conftest import make_scheduler, make_tiny_unet

STEPS = 4


@pytest.fixture(scope="module")
def teacher() -> LoadedPipeline:
    pipeline = DDIMPipeline(make_tiny_unet().requires_grad_(False).eval(), make_scheduler(clip_sample=True))
    return LoadedPipeline("tiny", pipeline, denoiser_of(pipeline))


def make(teacher, folder, n, **kwargs) -> SampleCache:
    options = {"steps": STEPS, "shard_size": 4, "batch_size": 3, "progress": False, **kwargs}
    return ensure(teacher, n, folder=folder, **options)


def test_noise_of_a_pair_depends_only_on_seed_and_index():
    whole = pair_noise(7, 0, 6, (1, 8, 8))
    torch.testing.assert_close(pair_noise(7, 3, 2, (1, 8, 8)), whole[3:5], rtol=0, atol=0)
    assert not torch.equal(pair_noise(8, 0, 6, (1, 8, 8)), whole)


def test_pairs_are_the_teachers_samples_of_their_noise_in_shards(teacher, tmp_path):
    cache = make(teacher, tmp_path / "c", 10)
    manifest = json.loads((tmp_path / "c" / "manifest.json").read_text())
    assert [s["count"] for s in manifest["shards"]] == [4, 4, 2] and manifest["count"] == 10
    pairs = cache.load()
    assert torch.equal(pairs["index"], torch.arange(10))
    torch.testing.assert_close(pairs["noise"], pair_noise(0, 0, 10, (1, 8, 8)), rtol=0, atol=0)
    torch.testing.assert_close(pairs["sample"], ddim_sample(teacher.denoiser, pairs["noise"], STEPS))
    assert cache.load(5)["index"].tolist() == [0, 1, 2, 3, 4]
    with pytest.raises(DiffkdError, match="has 10 pairs, 11 wanted"):
        cache.load(11)


def test_a_killed_generation_resumes_without_duplicating_or_losing_pairs(teacher, tmp_path, monkeypatch):
    real, calls = sample_cache.teacher_sample, []

    def dying(*args, **kwargs):
        calls.append(1)
        if len(calls) == 5:  # in the middle of the third shard
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(sample_cache, "teacher_sample", dying)
    with pytest.raises(KeyboardInterrupt):
        make(teacher, tmp_path / "killed", 11)
    assert SampleCache(tmp_path / "killed", sample_cache.teacher_key(teacher, "ddim", STEPS, 0)).count == 8
    monkeypatch.setattr(sample_cache, "teacher_sample", real)
    resumed = make(teacher, tmp_path / "killed", 11).load()
    fresh = make(teacher, tmp_path / "fresh", 11).load()
    assert torch.equal(resumed["index"], torch.arange(11))
    for name in ("noise", "sample"):
        assert torch.equal(resumed[name], fresh[name]), name


def test_a_cache_is_reused_and_extended_consistently(teacher, tmp_path, monkeypatch):
    make(teacher, tmp_path / "c", 6)
    extended = make(teacher, tmp_path / "c", 10).load()
    fresh = make(teacher, tmp_path / "fresh", 10).load()
    assert torch.equal(extended["index"], torch.arange(10)) and torch.equal(extended["sample"], fresh["sample"])
    monkeypatch.setattr(sample_cache, "teacher_sample", lambda *a, **k: pytest.fail("should reuse the cache"))
    assert make(teacher, tmp_path / "c", 8).count == 10


def test_a_cache_of_another_key_is_refused(teacher, tmp_path):
    make(teacher, tmp_path / "c", 2)
    with pytest.raises(DiffkdError, match="different steps"):
        make(teacher, tmp_path / "c", 2, steps=STEPS * 2)


def test_default_folder_is_keyed_under_the_cache_root(teacher, tmp_path, monkeypatch):
    monkeypatch.setenv("DIFFKD_CACHE", str(tmp_path))
    cache = ensure(teacher, 2, steps=STEPS, progress=False)
    key = sample_cache.teacher_key(teacher, "ddim", STEPS, 0)
    assert cache.folder == tmp_path / "teacher-samples" / key.digest() and cache.count == 2


def test_command_line(teacher, tmp_path, capsys):
    from diffkd.cli import main

    teacher.pipeline.save_pretrained(tmp_path / "teacher")
    argv = ["teacher-samples", "--teacher", str(tmp_path / "teacher"), "--num-samples", "5", "--steps", "2",
            "--output", str(tmp_path / "c"), "--batch-size", "2", "--shard-size", "3"]
    assert main(argv) == 0
    assert "5 pairs in" in capsys.readouterr().out
    manifest = json.loads((tmp_path / "c" / "manifest.json").read_text())
    assert manifest["key"]["steps"] == 2 and [s["count"] for s in manifest["shards"]] == [3, 2]
    assert main([*argv, "--steps", "3"]) == 2  # the folder holds another key's pairs: one-line error
