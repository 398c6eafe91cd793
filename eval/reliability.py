"""Reliability benchmark: kill a run at many moments and check that --resume ends bit-identical; feed the CLI bad
input and check that each is refused with one line on stderr, exit code 2 and nothing written.

    python eval/reliability.py [--teacher DIR] [--work DIR] [--write]

Without --teacher it trains the tiny 8x8 digits teacher first (the tests' one, ~30 s). --write replaces the
reliability section of eval/RESULTS.md with the tables printed. The kill points and the bad-input cases live in
tests/faults.py and tests/bad_inputs.py, which the tests import too (and run a few / all of them); a kill is placed
by tests/kill_wrapper.py, the CLI with one function patched. The resumed run is the plain command with --resume.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "eval")]

from results_file import write_section

from tests.bad_inputs import CASES, CaseResult, check_case, run_subprocess
from tests.faults import (
    KILL_POINTS,
    TEACHER_CONFIG,
    KillResult,
    consistency_config,
    denoise_config,
    dmd_config,
    exported_weights,
    generator_config,
    kill_and_resume,
    progressive_config,
    reference_run,
    run_cli,
    two_networks_config,
    write_yaml,
)
from tests.in_process import run_in_process

# ---- report ----------------------------------------------------------------------------------------------------

def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{cpu}, {os.cpu_count()} cores, Python {platform.python_version()}"


def ensure_teacher(work: Path, teacher: str | None) -> str:
    if teacher:
        return teacher
    output = work / "teacher"
    pipeline = output / "pipeline"
    if not (output / "finished.json").exists():
        shutil.rmtree(output, ignore_errors=True)
        config = write_yaml(TEACHER_CONFIG, work / "teacher.yaml")
        result = run_cli(["train-teacher", str(config), "--output", str(output)])
        if result.returncode != 0:
            raise RuntimeError(result.stderr[-2000:])
    return str(pipeline)


def markdown(kills: list[KillResult], cases: list[CaseResult], command: str, seconds: float) -> str:
    good_kills = sum(r.identical for r in kills)
    good_cases = sum(r.ok for r in cases)
    lines = ["## Reliability (issue 5)", "",
             (f"Machine: {machine()}, shared with other jobs; every run single-threaded. Command: `{command}` "
             f"({seconds / 60:.1f} min). Seed 0. Teacher: the tiny 8x8 digits teacher of `TEACHER_CONFIG` (what the "
             "script trains when no --teacher is given)."), "",
             (f"**Kill and resume: {good_kills}/{len(kills)} bit-identical.** Each run was SIGKILLed at the point "
              "below (by a patched function in a wrapper process, or a timer), resumed with `--resume` until it "
              "finished, and its exported UNet compared tensor-by-tensor (`torch.equal`) with an uninterrupted run "
              "of the same config. Progressive: 8 -> 4 -> 2 -> 1 steps, 6 steps a round, checkpoint every 2 (last 2 "
              "kept), EMA 0.9; denoise: 12 steps, checkpoint every 4; generator: 64 teacher DDIM-8 pairs cached in 4 "
              "shards, then 8 steps, checkpoint every 2; two networks (`tests/two_networks.py`, issue 17): per step 3 "
              "critic updates then 1 student update, a target network following the student, 6 steps, checkpoint "
              "every 2, EMA 0.9. 'resumed from' is the checkpoint each resume started from."), "",
             "| # | method | kill point | resumed from | result |", "|---|---|---|---|---|"]
    for index, r in enumerate(kills, 1):
        lines.append(f"| {index} | {r.point.method} | {r.point.name} | {', '.join(r.resumed_from) or '-'} | "
                     f"{r.detail} |")
    lines += ["", (f"**Bad input: {good_cases}/{len(cases)} refused cleanly**: exit code 2, exactly one line on "
                   "stderr naming the problem and the fix, the output folder untouched (not created, or unchanged), "
                   "no crafted payload executed."), "", "| # | input | message (stderr) | ok |", "|---|---|---|---|"]
    for index, r in enumerate(cases, 1):
        message = r.message.replace("|", "\\|")
        lines.append(f"| {index} | {r.case.name} | {message} | {'yes' if r.ok else 'NO: ' + r.problem} |")
    return "\n".join(lines) + "\n"


def two_ranks(teacher: str, work: Path, method: str) -> tuple[float, float]:
    """torchrun with 2 ranks (gloo) vs one process with the same global batch as 2 accumulation shards: the max
    absolute weight difference, and for scale the max absolute weight. The CLI is tests/kill_wrapper.py without a
    kill (the plain CLI, with the tests' two-network method registered)."""
    from safetensors.torch import load_file

    make = {"progressive": progressive_config, "two-networks": two_networks_config,
            "consistency": consistency_config}[method]
    config = write_yaml({**make(teacher), "train": {**make(teacher)["train"], "batch_size": 16}},
                        work / f"two-ranks-{method}.yaml")
    outputs = {"two": work / f"two-ranks-{method}", "one": work / f"one-process-{method}"}
    for folder in outputs.values():
        shutil.rmtree(folder, ignore_errors=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cli = ["-m", "tests.kill_wrapper", "distill", str(config), "--output"]
    commands = {"two": ["-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29534", *cli,
                        str(outputs["two"])],
                "one": [*cli, str(outputs["one"]), "--set", "train.gradient_accumulation_steps=2"]}
    for name, command in commands.items():
        result = subprocess.run([sys.executable, *command], capture_output=True, text=True, env=env, cwd=ROOT,
                                check=False)
        if result.returncode != 0:
            raise RuntimeError(f"{name}: {result.stderr[-2000:]}")
    two, one = (load_file(exported_weights(outputs[n], method)) for n in ("two", "one"))
    return (max((two[k] - one[k]).abs().max().item() for k in two), max(v.abs().max().item() for v in one.values()))


def two_ranks_markdown(results: dict[str, tuple[float, float]], command: str) -> str:
    figures = "; ".join(f"{method}: **{difference:.3g}** (weights up to {scale:.3g})"
                        for method, (difference, scale) in results.items())
    return "\n".join([
        "## Two ranks (issues 5, 17)", "",
        f"Machine: {machine()}. Command: `{command}`.", "",
        ("`torchrun --nproc_per_node 2 -m diffkd distill` (gloo on CPU, global batch 16; the progressive and the "
         "two-network configs of the kill table) against one process with `train.gradient_accumulation_steps=2` "
         "(the same global batch as the same two shards): max absolute difference of the exported UNet weights, "
         f"{figures}; the test (`tests/test_two_ranks.py`) allows 1e-6."), ""])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher", help="tiny teacher pipeline folder (default: train one)")
    parser.add_argument("--work", default="/tmp/diffkd-reliability", help="scratch folder")
    parser.add_argument("--only", choices=("kills", "cases", "two-ranks"), help="run one part")
    parser.add_argument("--write", action="store_true", help="update the sections in eval/RESULTS.md")
    parser.add_argument("--in-process", action="store_true",
                        help="run the bad-input cases through cli.main in this process (as the tests do: minutes "
                             "instead of one torch start-up per case on a busy machine)")
    args = parser.parse_args()
    if args.write and args.only in ("kills", "cases"):  # one section holds both tables: half a run would blank one
        parser.error("--write rewrites the section that holds both the kill and the bad-input tables: run both "
                     "(no --only, or --only two-ranks for that section alone)")
    started = time.perf_counter()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    teacher = ensure_teacher(work, args.teacher)
    command = " ".join(["python eval/reliability.py", *sys.argv[1:]])
    if args.only in (None, "two-ranks"):
        methods = ("progressive", "two-networks", "consistency")
        text = two_ranks_markdown({m: two_ranks(teacher, work, m) for m in methods}, command)
        print(text)
        if args.write:
            write_section("reliability-two-ranks", text)
        if args.only:
            return
    kills: list[KillResult] = []
    if args.only != "cases":
        configs = {"progressive": write_yaml(progressive_config(teacher), work / "progressive.yaml"),
                   "denoise": write_yaml(denoise_config(), work / "denoise.yaml"),
                   "generator": write_yaml(generator_config(teacher), work / "generator.yaml"),
                   "two-networks": write_yaml(two_networks_config(teacher), work / "two-networks.yaml"),
                   "consistency": write_yaml(consistency_config(teacher), work / "consistency.yaml"),
                   "dmd": write_yaml(dmd_config(teacher), work / "dmd.yaml")}
        references = {m: reference_run(m, c, work) for m, c in configs.items()}
        for index, point in enumerate(KILL_POINTS):
            result = kill_and_resume(point, configs[point.method], references[point.method], work / f"kill-{index}")
            kills.append(result)
            print(f"kill {index + 1:2d}/{len(KILL_POINTS)} {point.name}: {result.detail}", flush=True)
    cases: list[CaseResult] = []
    if args.only != "kills":
        for index, case in enumerate(CASES):
            tmp = work / f"case-{index}"
            shutil.rmtree(tmp, ignore_errors=True)
            result = check_case(case, tmp, teacher, run_in_process if args.in_process else run_subprocess)
            cases.append(result)
            print(f"case {index + 1:2d}/{len(CASES)} {case.name}: {'ok' if result.ok else result.problem} "
                  f"| {result.message}", flush=True)
    text = markdown(kills, cases, command, time.perf_counter() - started)
    print(text)
    if args.write:
        write_section("reliability", text)


if __name__ == "__main__":
    main()
