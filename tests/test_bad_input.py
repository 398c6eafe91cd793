"""Every bad input of tests/bad_inputs.py's CASES, in process: exit code 2, one line on stderr naming the problem
and the fix, the output folder untouched, no crafted payload run. A few also through the real command line."""

import pytest

from tests.bad_inputs import CASES, check_case, run_subprocess
from tests.in_process import run_in_process


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
