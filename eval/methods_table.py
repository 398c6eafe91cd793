"""One methods table on digits-16: every distilled student beside the teacher's training-free solvers, same teacher,
same evaluation seeds, same noise.

    python eval/methods_table.py --student progressive=runs/digits-progressive \
        --student consistency=runs/digits-consistency [--student NAME=RUN ...] --seeds 0,1,2,3 [--write-results]

RUN is a ``diffkd distill`` output folder (its student/ is evaluated, its training_summary.json gives the training
wall time, its config.yaml the model passes of one training step). Each seed is one ``diffkd.evaluation`` sweep:
the students with their own exported scheduler and the teacher with DDIM, DPM-Solver++ and UniPC at k = 1, 2, 4,
and the teacher's DDIM-64 reference; FD on the shipped digits classifier. Passes per step are counted by forward
hooks on every diffusers network during one optimiser step of the run's own method (a classifier-free guided
teacher call, cond and uncond batched, counts once); the same step gives its time over the summed time of those
passes and the backward passes (the method's and the trainer's overhead on top of the networks).
"""

from __future__ import annotations

import argparse
import json
import logging
import shlex
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from results_file import machine, write_section

from diffkd.evaluation import EvalConfig, evaluate
from diffkd.evaluation.report import fmt, markdown_table

SAMPLERS = ["ddim", "heun", "dpmsolver++", "unipc"]
STEPS = [1, 2, 4]
DEFAULT_OUTPUT = str(Path(__file__).parent / "out" / "methods-table")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher", default="teachers/digits-16")
    parser.add_argument("--student", action="append", default=[], metavar="NAME=RUN",
                        help="a method's name and its diffkd run folder (repeatable)")
    parser.add_argument("--baseline", default="configs/digits-progressive.yaml",
                        help="the recipe whose training time the others are compared with (the shipped progressive)")
    parser.add_argument("--seeds", default="0,1,2,3")
    parser.add_argument("--num-samples", type=int, default=1000)
    parser.add_argument("--output", default=DEFAULT_OUTPUT)
    parser.add_argument("--reuse", action="store_true",
                        help="read each seed's results.json from --output where it exists instead of sampling again")
    parser.add_argument("--section", default="methods-table", help="the eval/RESULTS.md section to write")
    parser.add_argument("--title", default="Methods table on digits-16 (issue 18)")
    parser.add_argument("--write-results", action="store_true", help="rewrite this benchmark's eval/RESULTS.md section")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    students = dict(named_run(s) for s in args.student)

    started = time.perf_counter()
    sweeps = {seed: sweep(args, students, seed) for seed in [int(s) for s in args.seeds.split(",")]}
    costs = {name: step_cost(Path(run) / "config.yaml") for name, run in students.items()}
    costs["baseline"] = step_cost(Path(args.baseline))
    text = section(sweeps, students, costs, args, time.perf_counter() - started)
    print(text)
    if args.write_results:
        write_section(args.section, text)
    return 0


def sweep(args: argparse.Namespace, students: dict[str, str], seed: int) -> dict:
    """One seed's evaluation of the teacher's samplers and every student (or, with --reuse, its saved results)."""
    saved = Path(args.output) / f"seed{seed}" / "results.json"
    if args.reuse and saved.is_file():
        return json.loads(saved.read_text())
    return evaluate(EvalConfig(
        pipelines=[args.teacher, *[str(Path(run) / "student") for run in students.values()]], teacher=args.teacher,
        steps=STEPS, samplers=SAMPLERS, reference_steps=64, reference="digits", feature="digits-classifier",
        num_samples=args.num_samples, batch_size=250, seed=seed, lpips=False, output=str(saved.parent))).to_dict()


def named_run(value: str) -> tuple[str, str]:
    name, sep, run = value.partition("=")
    if not sep or not name or not run:
        raise SystemExit(f"--student expects NAME=RUN_FOLDER, got {value!r}")
    return name, run


def fd_of(results: dict, source_or_name: str, sampler: str, steps: int) -> float:
    model = next(m["name"] for m in results["models"] if source_or_name in (m["source"], m["name"]))
    return next(r["fd"] for r in results["rows"] if r["model"] == model and r["sampler"] == sampler
                and r["steps"] == steps and not r["is_reference"])


def reference_fd(results: dict) -> float:
    return next(r["fd"] for r in results["rows"] if r["is_reference"])


def training_seconds(run: Path) -> float | None:
    summary = run / "training_summary.json"
    if not summary.is_file():
        return None
    return sum(json.loads(summary.read_text())["round_seconds"].values())


def step_cost(config_file: Path) -> dict:
    """One optimiser step of a config's method (the second of two, so that nothing is timed cold): its network
    forward calls, its seconds, its time over the summed time of its forward and backward passes, and the recipe's
    number of steps (so that recipes compare by estimated training time, measured in one run)."""
    from diffusers import ModelMixin

    from diffkd.api import prepare
    from diffkd.config import load_config
    from diffkd.trainer import Trainer, make_accelerator

    config = load_config(config_file)
    with tempfile.TemporaryDirectory() as scratch:
        accelerator = make_accelerator(config.train, Path(scratch))
        teacher, method, _ = prepare(config, accelerator.device)
        trainer = Trainer(method, config.train, Path(scratch), accelerator)
        trainer.load_data()
        trainer._begin_round(0)
        modules = {id(m): m for m in [teacher.unet, *(n.module for n in trainer.networks.values()),
                                      *method.followers().values()] if isinstance(m, ModelMixin)}
        seen = {"calls": 0, "seconds": 0.0}
        starts: list[float] = []

        def before(*_):
            starts.append(time.perf_counter())

        def after(*_):
            seen["calls"] += 1
            seen["seconds"] += time.perf_counter() - starts.pop()

        original_backward = accelerator.backward

        def timed_backward(loss, **kwargs):
            begun = time.perf_counter()
            original_backward(loss, **kwargs)
            seen["seconds"] += time.perf_counter() - begun

        accelerator.backward = timed_backward
        hooks = [h for m in modules.values() for h in (m.register_forward_pre_hook(before),
                                                        m.register_forward_hook(after))]
        num_steps = method.rounds()[0].num_steps
        for _ in range(2):
            seen.update(calls=0, seconds=0.0)
            begun = time.perf_counter()
            trainer._optimizer_step(0, num_steps)
            step = time.perf_counter() - begun
        for hook in hooks:
            hook.remove()
    return {"passes": seen["calls"], "overhead": step / seen["seconds"], "seconds": step,
            "steps": sum(r.num_steps for r in method.rounds())}


def section(sweeps: dict[int, dict], students: dict[str, str], costs: dict[str, dict], args: argparse.Namespace,
            seconds: float) -> str:
    seeds = list(sweeps)
    teacher = Path(args.teacher).name
    flow = any(m["scheduler"].startswith("FlowMatch") for m in sweeps[seeds[0]]["models"] if m["name"] == teacher)
    label = {"ddim": "euler"} if flow else {}  # on a rectified-flow path the DDIM step is the Euler step
    reference = _stats([reference_fd(sweeps[s]) for s in seeds])
    baseline = costs["baseline"]["seconds"] * costs["baseline"]["steps"]
    reference_name = f"{label.get('ddim', 'ddim')}-64"
    header = ["method", "sampler", *[f"k={k}: FD (x {reference_name})" for k in STEPS], "training s (run's own)",
              "recipe steps x s/step (x baseline)", "model passes / step", "step time / passes' time"]
    body = []
    for name, run in students.items():
        source = str(Path(run) / "student")
        fds = [_stats([fd_of(sweeps[s], source, "own", k) for s in seeds]) for k in STEPS]
        train, cost = training_seconds(Path(run)), costs[name]
        estimate = cost["seconds"] * cost["steps"]
        body.append([name, "own", *[_cell(fd, reference) for fd in fds],
                     f"{train:.0f}" if train is not None else "-",
                     f"{cost['steps']} x {cost['seconds']:.2f} ({estimate / baseline:.2f}x)", str(cost["passes"]),
                     f"{cost['overhead']:.2f}"])
    for sampler in SAMPLERS:
        fds = [_stats([fd_of(sweeps[s], teacher, sampler, k) for s in seeds]) for k in STEPS]
        body.append([f"teacher ({teacher})", label.get(sampler, sampler), *[_cell(fd, reference) for fd in fds], "-",
                     "-", "-", "-"])
    body.append([f"teacher ({teacher})", f"{reference_name} (reference)", _cell(reference, reference), "", "", "-", "-", "-",
                 "-"])
    cost = costs["baseline"]
    command = "python eval/methods_table.py " + " ".join(
        [f"--teacher {shlex.quote(args.teacher)}", *[f"--student {shlex.quote(f'{n}={r}')}" for n, r in students.items()],
         f"--baseline {shlex.quote(args.baseline)}", f"--seeds {args.seeds}", f"--num-samples {args.num_samples}",
         *([f"--output {shlex.quote(args.output)}"] if args.output != DEFAULT_OUTPUT else []), f"--section {args.section}", f"--title {shlex.quote(args.title)}", *(["--reuse"] if args.reuse else []),
         "--write-results"])
    return "\n".join([
        f"## {args.title}", "",
        f"- command: `{command}` ({seconds:.0f} s wall)",
        f"- machine: {machine()}, shared with other developers' jobs",
        (f"- FD (digits classifier), {args.num_samples} samples per setting, mean +- spread (half the range) over "
         f"seeds {args.seeds}, the same noise through every setting of a seed; the ratio is to the mean "
         f"{reference_name} FD"),
        ("- training s: the run's own training_summary.json (wall time under whatever load it ran); recipe steps x "
         "s/step: the run's config's steps times one optimiser step timed in this command, over the baseline's "
         f"(`{args.baseline}`: {cost['steps']} steps x {cost['seconds']:.2f} s, {cost['passes']} passes a step), "
         "the like-for-like training-time ratio; model passes / step: network forward calls in one optimiser step "
         "(a guided teacher call counts once); step time / passes' time: that step's wall time over its forward "
         "and backward passes' time"), "",
        markdown_table(header, body),
    ])


def _stats(values: list[float]) -> tuple[float, float]:
    return sum(values) / len(values), (max(values) - min(values)) / 2


def _cell(fd: tuple[float, float], reference: tuple[float, float]) -> str:
    mean, spread = fd
    return f"{fmt(mean)} +- {fmt(spread)} ({mean / reference[0]:.2f}x)"


if __name__ == "__main__":
    raise SystemExit(main())
