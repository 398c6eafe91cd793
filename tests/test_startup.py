"""`diffkd --help` and a config error answer without importing torch, diffusers or the metric stack (issue 16:
they took 7-14 s, nearly all of it imports). Checked on the real command with ``python -X importtime``, which
lists every module the process imported."""

import subprocess
import sys

import pytest

HEAVY = ("torch", "diffusers", "accelerate", "transformers", "torchmetrics", "lpips", "matplotlib", "sklearn",
         "safetensors", "numpy")


def imported_modules(*args: str) -> tuple[subprocess.CompletedProcess, set[str]]:
    result = subprocess.run([sys.executable, "-X", "importtime", "-m", "diffkd", *args], capture_output=True,
                            text=True, timeout=300, check=False)
    modules = {line.rsplit("|", 1)[1].strip() for line in result.stderr.splitlines()
               if line.startswith("import time:") and line.count("|") == 2}
    return result, modules


def heavy(modules: set[str]) -> list[str]:
    return sorted(m for m in modules if m.split(".")[0] in HEAVY)


def test_importtime_output_is_parsed():
    """The check below would pass vacuously if -X importtime's format changed: the CLI's own modules must show."""
    _, modules = imported_modules("--help")
    assert {"diffkd.cli", "diffkd.config", "yaml"} <= modules


@pytest.mark.parametrize("args", [
    ("--help",),
    ("distill", "--help"),
    ("eval", "--help"),
    ("distill", "configs/digits-progressive.yaml", "--output", "unused", "--set", "method.steps_per_rond=3"),
    ("distill", "configs/digits-progressive.yaml", "--output", "unused", "--set", "train.learning_rate=-1"),
    ("train-teacher", "configs/digits-teacher.yaml", "--output", "unused", "--set", "method.nmu_steps=3"),
], ids=["help", "distill-help", "eval-help", "method-key-typo", "bad-value", "teacher-key-typo"])
def test_help_and_config_errors_do_not_import_torch(args, tmp_path):
    result, modules = imported_modules(*[str(tmp_path / a) if a == "unused" else a for a in args])
    assert result.returncode == (0 if "--help" in args else 2), result.stderr[-2000:]
    assert not heavy(modules), f"{' '.join(args)} imported {heavy(modules)[:10]}"
    assert not (tmp_path / "unused").exists()


def test_a_config_typo_names_the_key_and_its_fix(tmp_path):
    result, _ = imported_modules("distill", "configs/digits-progressive.yaml", "--output", str(tmp_path / "run"),
                                 "--set", "method.steps_per_rond=3")
    errors = [line for line in result.stderr.splitlines() if not line.startswith("import time:")]
    expected = ("diffkd: error: unknown config key 'method.steps_per_rond'; did you mean 'method.steps_per_round'? "
                "(valid: name, start_steps, final_steps, steps_per_round, imitation_steps, loss_weighting, "
                "student_prediction_type, guidance_scale, guidance, kd_rounds, target_space)")
    assert errors == [expected]
