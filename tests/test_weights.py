"""Weight files are found in the explicit path or the caches, or named in one line; nothing is downloaded."""

import pytest
import torch

from diffkd import weights
from diffkd.errors import DiffkdError


@pytest.fixture
def hub(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    return tmp_path / "hub" / "checkpoints"


def test_explicit_path_wins_and_must_exist(tmp_path, hub):
    file = tmp_path / "w.pth"
    file.write_bytes(b"x")
    assert weights.locate_checkpoint("a.pth", "https://x/a.pth", str(file), "FID", "--w") == file
    with pytest.raises(DiffkdError, match="'.*missing.pth' \\(--w\\) does not exist"):
        weights.locate_checkpoint("a.pth", "https://x/a.pth", str(tmp_path / "missing.pth"), "FID", "--w")


def test_hub_cache_is_searched(hub):
    hub.mkdir(parents=True)
    (hub / "a.pth").write_bytes(b"x")
    assert weights.locate_checkpoint("a.pth", "https://x/a.pth", None, "FID", "--w") == hub / "a.pth"


def test_missing_file_is_one_line_with_file_place_and_source(hub):
    filename, url = weights.INCEPTION
    with pytest.raises(DiffkdError) as error:
        weights.locate_checkpoint(filename, url, None, "FID (Inception)", "--feature-weights")
    message = str(error.value)
    assert "\n" not in message
    for part in (filename, str(hub), url, "--feature-weights"):
        assert part in message


def test_hf_model_is_a_local_folder_or_a_cached_snapshot(tmp_path):
    assert weights.locate_hf_model(str(tmp_path), "CLIPScore", "--clip-model") == str(tmp_path)
    with pytest.raises(DiffkdError, match="'nobody/nothing'.*hf download nobody/nothing"):
        weights.locate_hf_model("nobody/nothing", "CLIPScore", "--clip-model")


def test_sha256_of_a_file(tmp_path):
    (tmp_path / "w").write_bytes(b"abc")
    assert weights.file_sha256(str(tmp_path / "w")).startswith("ba7816bf8f01cfea")
