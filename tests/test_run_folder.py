"""The run folder's own rules (diffkd.run_folder), without training: what --overwrite deletes, what each wrong
start is told, which checkpoint --resume picks."""

import pytest

from diffkd import run_folder
from diffkd.errors import DiffkdError


def test_clear_deletes_what_a_run_wrote_and_nothing_else(tmp_path):
    for name in ("checkpoints/ckpt-3", "logs", "student/unet", "eval"):
        (tmp_path / name).mkdir(parents=True)
    for name in ("config.yaml", "finished.json", "training_summary.json", "run.lock", "notes.txt"):
        (tmp_path / name).write_text("x")
    (tmp_path / "mine").mkdir()
    run_folder.clear(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine", "notes.txt", "run.lock"]


@pytest.mark.parametrize("setup, resume, overwrite, message", [
    (None, True, True, "contradict each other"),
    ("finished.json", False, False, "holds a finished run: pass --overwrite"),
    ("config.yaml", False, False, "holds an unfinished run: pass --resume"),
])
def test_check_output_refuses_each_wrong_start(tmp_path, setup, resume, overwrite, message):
    if setup:
        (tmp_path / setup).write_text("x")
    with pytest.raises(DiffkdError, match=message):
        run_folder.check_output(tmp_path, resume, overwrite)


def test_check_output_allows_a_fresh_folder_and_a_resume(tmp_path):
    run_folder.check_output(tmp_path / "new", resume=False, overwrite=False)
    (tmp_path / "config.yaml").write_text("x")
    run_folder.check_output(tmp_path, resume=True, overwrite=False)


def test_resume_point(tmp_path):
    assert run_folder.resume_point(tmp_path, False) is None
    assert run_folder.resume_point(tmp_path, True) is None  # no checkpoint yet: start at step 0
    with pytest.raises(DiffkdError, match="no such checkpoint folder"):
        run_folder.resume_point(tmp_path, str(tmp_path / "ckpt-9"))
    (tmp_path / "ckpt-9").mkdir()
    assert run_folder.resume_point(tmp_path, str(tmp_path / "ckpt-9")) == tmp_path / "ckpt-9"
