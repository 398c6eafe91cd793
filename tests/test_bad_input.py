"""Every bad input of tests/bad_inputs.py's CASES, in process: exit code 2, one line on stderr naming the problem
and the fix, the output folder untouched, no crafted payload run. A few also through the real command line."""

import contextlib
import io
import logging
import os

import pytest

from diffkd.cli import main
from tests.bad_inputs import CASES, check_case, run_subprocess


def run_in_process(argv: list[str], env: dict) -> tuple[int, str]:
    """cli.main with stderr captured; log records go to the same stream, as they would in a terminal."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    root = logging.getLogger()
    root.addHandler(handler)
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        with contextlib.redirect_stderr(stream):
            code = main(argv)
    finally:
        root.removeHandler(handler)
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key)
            else:
                os.environ[key] = value
    return code, stream.getvalue()


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_input_is_refused_cleanly(case, tiny_teacher, tmp_path):
    result = check_case(case, tmp_path / "case", tiny_teacher, run_in_process)
    assert result.ok, f"{result.problem}: {result.message}"


def test_there_are_at_least_30_cases():
    assert len(CASES) >= 30


ONE_LINE = ["unknown config key (closest suggested)", "teacher weights as a crafted pickle (.bin)",
            "output holds a finished run"]


@pytest.mark.parametrize("name", ONE_LINE)
def test_real_command_line_prints_exactly_one_line(name, tiny_teacher, tmp_path):
    case = next(c for c in CASES if c.name == name)
    result = check_case(case, tmp_path / "case", tiny_teacher, run_subprocess)
    assert result.ok, f"{result.problem}: {result.message}"


@pytest.mark.parametrize("name, wrong", [("teacher model_index.json not valid JSON", "safetensors"),
                                         ("hub teacher offline", "stacktrace"),
                                         ("eval reference folder missing (Inception weights missing too)",
                                          "weights-inception")])
def test_message_does_not_point_at_the_wrong_cause(name, wrong, tiny_teacher, tmp_path):
    case = next(c for c in CASES if c.name == name)
    result = check_case(case, tmp_path / "case", tiny_teacher, run_in_process)
    assert result.ok and wrong not in result.message.lower(), result.message
