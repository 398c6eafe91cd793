"""Issue 37's wrong starts that are not refusals: --resume-from-other continues another run and the card names it;
an unforeseen exception is one line and a log file; --dry-run checks what a run would and writes nothing; the
scheduler swaps the README allows."""

import shutil
from pathlib import Path

import pytest
import yaml

from diffkd import cli
from diffkd.crash_log import write_crash_log
from tests.bad_inputs import _distill, _newest, real_run_template
from tests.in_process import run_in_process


def card_of(folder: Path) -> dict:
    return yaml.safe_load((folder / "README.md").read_text().split("---")[1])


def test_resume_from_other_run_names_that_run_in_the_card(tiny_teacher, tmp_path):
    source = real_run_template(tiny_teacher)
    argv, output = _distill(tmp_path, tiny_teacher, "method.steps_per_round=3", output=tmp_path / "b",
                            extra=("--resume", str(_newest(source)), "--resume-from-other"))
    code, stderr = run_in_process(argv, {})
    assert code == 0, stderr
    record = card_of(output / "student")["resumed_from_other_run"]
    assert record["run"] == str(source.resolve())
    assert record["differences"]["method.steps_per_round"] == {"there": 2, "here": 3}


def test_refusal_of_another_run_names_both_runs(tiny_teacher, tmp_path):
    source = tmp_path / "a"
    shutil.copytree(real_run_template(tiny_teacher), source)
    (source / "config.yaml").unlink()
    (source / "finished.json").unlink()
    argv, _ = _distill(tmp_path, tiny_teacher, "method.steps_per_round=3", output=source, extra=("--resume",))
    code, stderr = run_in_process(argv, {})
    assert code == 2
    assert "method.steps_per_round=2" in stderr and "method.steps_per_round=3" in stderr
    assert str(real_run_template(tiny_teacher).resolve()) in stderr and str(source) in stderr


def test_own_checkpoint_resumes_without_the_flag(tiny_teacher, tmp_path):
    output = tmp_path / "run"
    shutil.copytree(real_run_template(tiny_teacher), output)
    (output / "finished.json").unlink()
    argv, _ = _distill(tmp_path, tiny_teacher, output=output, extra=("--resume", str(_newest(output))))
    code, stderr = run_in_process(argv, {})
    assert code == 0, stderr
    assert "resumed_from_other_run" not in card_of(output / "student")


def test_unforeseen_exception_is_one_line_and_a_log_with_the_traceback(monkeypatch, tmp_path):
    def broken(args):
        raise ZeroDivisionError("something no check foresaw")

    monkeypatch.setenv("DIFFKD_LOG_DIR", str(tmp_path / "logs"))
    monkeypatch.setattr(cli, "run_teacher_samples", broken)
    code, stderr = run_in_process(["teacher-samples", "--teacher", "x", "--num-samples", "1", "--output",
                                   str(tmp_path / "out")], {})
    lines = stderr.strip().splitlines()
    assert code == 1 and len(lines) == 1
    assert "ZeroDivisionError: something no check foresaw" in lines[0]
    log_file = Path(lines[0].split("traceback in ")[1].split(";")[0])
    assert log_file.parent == tmp_path / "logs"
    assert "Traceback" in log_file.read_text() and "def broken" not in lines[0]
    assert not (tmp_path / "out").exists()


def test_crash_log_records_the_command_line(tmp_path, monkeypatch):
    monkeypatch.setenv("DIFFKD_LOG_DIR", str(tmp_path))
    try:
        raise KeyError("k")
    except KeyError as error:
        path = write_crash_log(error, ["eval", "--steps", "1"])
    assert path.read_text().startswith("diffkd eval --steps 1\n") and "KeyError" in path.read_text()


def test_dry_run_loads_the_teacher_and_writes_nothing(tiny_teacher, tmp_path):
    argv, output = _distill(tmp_path, tiny_teacher, extra=("--dry-run",))
    code, stderr = run_in_process(argv, {})
    assert code == 0, stderr
    assert "checked as a run would" in stderr
    assert not output.exists()


@pytest.mark.parametrize("sets, fragment", [
    (("teacher.source=/nonexistent/teacher",), "does not exist"),
    (("method.guidance_scale=3",), "drop method.guidance_scale"),
])
def test_dry_run_refuses_what_a_run_would(tiny_teacher, tmp_path, sets, fragment):
    argv, output = _distill(tmp_path, tiny_teacher, *sets, extra=("--dry-run",))
    code, stderr = run_in_process(argv, {})
    assert code == 2 and fragment in stderr
    assert not output.exists()


def test_dry_run_reads_the_data_set(tiny_teacher, tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not a png")
    argv, output = _distill(tmp_path, tiny_teacher, f"data.source={tmp_path / 'images'}", extra=("--dry-run",))
    code, stderr = run_in_process(argv, {})
    assert code == 2 and "cannot read image" in stderr
    assert not output.exists()
