"""The ``diffkd`` command: a thin layer over the API. Bad input is one line on stderr and exit code 2; an error no
check foresaw is one line naming a log file that holds its traceback, and exit code 1 (``diffkd.crash_log``).

Start-up time matters here: ``diffkd --help`` and a config error answer without importing torch. This module and
what it imports at the top (config, options, the eval command's arguments) are torch-free; the few imports inside
the command handlers are deferred for that reason and no other.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading

from diffkd.config import dump_config, load_config
from diffkd.crash_log import write_crash_log
from diffkd.errors import DiffkdError
from diffkd.evaluation import cli as eval_cli
from diffkd.validation import SAMPLERS

EXIT_UNEXPECTED = 1
EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="YAML config (see configs/)")
    parser.add_argument("--output", required=True, help="run folder: checkpoints/, logs/, the exported pipeline")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value, e.g. --set train.learning_rate=3e-4 (repeatable)")
    parser.add_argument("--dry-run", action="store_true",
                        help="check everything a run would (teacher, data, options, output folder), print the "
                             "resolved config and exit without writing")
    parser.add_argument("--print-config", action="store_true",
                        help="print the resolved config and exit (the config's own checks only: no teacher needed)")
    parser.add_argument("--resume", nargs="?", const=True, default=False, metavar="CHECKPOINT",
                        help="continue from the newest complete checkpoint (or from CHECKPOINT)")
    parser.add_argument("--resume-from-other", action="store_true",
                        help="allow --resume CHECKPOINT of another run (another folder, config or teacher); the "
                             "model card names that run")
    parser.add_argument("--overwrite", action="store_true", help="discard a previous run in --output")
    parser.add_argument("--no-eval", action="store_true", help="skip the evaluation after distillation")


def add_teacher_samples_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--teacher", required=True, help="teacher pipeline: a diffusers folder or hub id")
    parser.add_argument("--num-samples", type=int, required=True, help="pairs the cache must hold")
    parser.add_argument("--sampler", choices=SAMPLERS, default="ddim", help="teacher sampler (default ddim)")
    parser.add_argument("--steps", type=int, default=32, help="teacher sampling steps (default 32)")
    parser.add_argument("--output", required=True, help="cache folder (resumed if it holds a matching cache)")
    parser.add_argument("--seed", type=int, default=0, help="noise seed: pair i's noise depends on (seed, i)")
    parser.add_argument("--batch-size", type=int, default=250, help="pairs per teacher batch")
    parser.add_argument("--shard-size", type=int, default=1000, help="pairs per safetensors shard")
    parser.add_argument("--prompts-file", default=None, help="text teachers: prompts, one a line (cycled)")
    parser.add_argument("--guidance-scale", type=float, default=1.0, help="text teachers: classifier-free guidance")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or mps")


def run_job(args: argparse.Namespace, teacher_training: bool) -> int:
    config = load_config(args.config, args.overrides)
    if args.print_config:
        sys.stdout.write(dump_config(config))
        return 0
    check_command(config.method.name, args.config, teacher_training)
    if args.no_eval:
        config.run_eval = False
    if args.resume_from_other and not isinstance(args.resume, str):
        raise DiffkdError("--resume-from-other goes with --resume CHECKPOINT: name the other run's checkpoint folder")
    from diffkd.api import distill, validate  # deferred for start-up time

    if args.dry_run:
        validate(config, args.output, resume=args.resume, overwrite=args.overwrite,
                 from_other=args.resume_from_other)
        sys.stdout.write(dump_config(config))
        print("dry run: config, output folder, teacher, data and options checked as a run would; nothing written",
              file=sys.stderr)
        return 0
    folder = distill(config, args.output, resume=args.resume, overwrite=args.overwrite,
                     from_other=args.resume_from_other)
    if os.environ.get("RANK", "0") == "0":
        print(f"saved {folder}")
    return 0


def check_command(method: str, config_file: str, teacher_training: bool) -> None:
    """``train-teacher`` runs the methods that train without a teacher, ``distill`` the others."""
    from diffkd.methods import method_class  # deferred for start-up time: a method's module imports torch

    if teacher_training == method_class(method).needs_teacher:
        wanted = "distill" if teacher_training else "train-teacher"
        raise DiffkdError(f"{config_file} is a method.name={method} config: run `diffkd {wanted}`")


def run_teacher_samples(args: argparse.Namespace) -> int:
    from diffkd import sample_cache  # deferred for start-up time

    return sample_cache.run(args)


def run_plan(args: argparse.Namespace) -> int:
    from diffkd import plan_check  # deferred for start-up time

    return plan_check.run(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="diffkd", description="Distil diffusers pipelines into few-step students.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    commands = parser.add_subparsers(dest="command", required=True)
    distill = commands.add_parser("distill", help="distil a teacher pipeline into a student (then evaluate it)")
    add_run_arguments(distill)
    distill.set_defaults(handler=lambda a: run_job(a, teacher_training=False))
    teacher = commands.add_parser("train-teacher",
                                  help="train a small teacher from scratch (methods: denoise, vq, vae, text-denoise)")
    add_run_arguments(teacher)
    teacher.set_defaults(handler=lambda a: run_job(a, teacher_training=True))
    evaluate = commands.add_parser("eval", help="quality vs steps of pipelines and training-free samplers")
    eval_cli.add_arguments(evaluate)
    evaluate.set_defaults(handler=eval_cli.run)
    samples = commands.add_parser("teacher-samples", help="generate (or resume) a cache of teacher samples for the "
                                                          "generator method")
    add_teacher_samples_arguments(samples)
    samples.set_defaults(handler=run_teacher_samples)
    plan = commands.add_parser("plan", help="peak accelerator memory of one optimiser step, planned without weights")
    plan.add_argument("config", help="YAML config (see configs/)")
    plan.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                      help="override a config value (repeatable)")
    plan.add_argument("--layout", default=None, choices=["sd15", "sdxl", "sd3-medium", "flux-dev", "sana-1600m"],
                      help="plan on this real-size layout instead of the teacher folder's UNet config")
    plan.add_argument("--processes", type=int, default=1, metavar="N",
                      help="plan one of N devices: the batch split among them, and with train.shard the trained "
                           "networks too (default 1)")
    plan.set_defaults(handler=run_plan)
    return parser


def _terminate(signum, frame) -> None:
    """SIGTERM (how schedulers pre-empt) unwinds like Ctrl-C, so the run lock is released on the way out."""
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        return args.handler(args)
    except DiffkdError as error:
        print(f"diffkd: error: {' '.join(str(error).split())}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("diffkd: interrupted; continue with the same command and --resume", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as error:  # noqa: BLE001 - the catch-all: a user reads one line, the log keeps the rest
        try:
            where = f"traceback in {write_crash_log(error, argv if argv is not None else sys.argv[1:])}"
        except OSError as unwritable:
            where = f"traceback not saved: {unwritable.strerror}; set DIFFKD_LOG_DIR to a writable folder"
        first = " ".join(str(error).split())[:300]
        print(f"diffkd: unexpected error: {type(error).__name__}: {first} ({where}; please report it)", file=sys.stderr)
        return EXIT_UNEXPECTED
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
