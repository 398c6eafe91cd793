"""Rules every run obeys, whatever its method: an option that the teacher, the data set or the exported scheduler
cannot use is refused before any work, in one line.

A method's own ``check()`` knows its own options. These rules know only option *names* and what the teacher and
data bring, so a method added later is covered without a line here: any ``method.guidance*`` option asks for
classifier-free guidance, which an unconditional teacher does not have; prompts are for text teachers, and are
not read where the data set brings each image's own caption (unless the method says it reads them,
``Method.reads_data_prompts``); every step count the evaluation after training will sample must be one the
exported scheduler can set (LCMScheduler cannot go beyond its ``original_inference_steps``). Without these the run
trains for hours and then ignores the option, or fails after the work.
"""

from __future__ import annotations

import dataclasses

from diffkd.conditioning import read_prompts
from diffkd.config import Config
from diffkd.data import brings_captions
from diffkd.errors import DiffkdError
from diffkd.io import LoadedPipeline
from diffkd.methods import Method
from diffkd.sampling import check_scheduler_steps

GUIDANCE_PREFIX = "guidance"


def check_run_options(config: Config, teacher: LoadedPipeline, method: Method) -> None:
    """Refuse an option this run cannot use (raise DiffkdError); nothing has been written yet."""
    check_guidance_options(config, teacher)
    check_prompt_options(config, teacher, method)
    if config.run_eval and method.needs_teacher:
        check_scheduler_steps(method.export_spec().scheduler, config.eval.steps,
                              "eval.steps (the evaluation after training)")


def changed_options(options: object, prefix: str) -> dict[str, object]:
    """The fields of dataclass ``options`` named ``prefix*`` whose value is not the field's default."""
    changed = {}
    for item in dataclasses.fields(options):
        if not item.name.startswith(prefix):
            continue
        default = item.default_factory() if item.default_factory is not dataclasses.MISSING else item.default
        value = getattr(options, item.name)
        if value != default:
            changed[item.name] = value
    return changed


def check_guidance_options(config: Config, teacher: LoadedPipeline) -> None:
    """Classifier-free guidance needs a conditional teacher: on an unconditional one the guided and unguided
    predictions are the same network pass, so a guidance option trains nothing (a guidance round's loss is ~1e-14)."""
    if teacher.text_conditioned:
        return
    changed = changed_options(config.method, GUIDANCE_PREFIX)
    if changed:
        settings = ", ".join(f"method.{name}={_show(value)}" for name, value in changed.items())
        names = " and ".join(f"method.{name}" for name in changed)
        verb = "asks" if len(changed) == 1 else "ask"
        raise DiffkdError(f"{settings} {verb} for classifier-free guidance, but teacher {teacher.source!r} is "
                          f"unconditional (no text encoder): drop {names}")


def check_prompt_options(config: Config, teacher: LoadedPipeline, method: Method) -> None:
    """Prompts are for text teachers, and a data set with its own captions is trained on those; a prompts file
    that is set must be readable text with at least one prompt, whichever reads it."""
    data = config.data
    given = [name for name, value in (("data.prompts", data.prompts), ("data.prompts_file", data.prompts_file))
             if value]
    if given and not teacher.text_conditioned:
        raise DiffkdError(f"{given[0]} gives prompts, but teacher {teacher.source!r} is unconditional (no text "
                          f"encoder): drop {given[0]}")
    if given and brings_captions(data.source) and not method.reads_data_prompts:
        raise DiffkdError(f"{given[0]} is not used: data.source={data.source} brings each image's own caption, "
                          f"which method {method.name} trains on; drop {given[0]} (eval.prompts sets the "
                          "evaluation's prompts)")
    if config.run_eval and config.eval.text_options() and not teacher.text_conditioned:
        raise DiffkdError(f"{config.eval.text_options()[0]} is for text-conditioned pipelines, but teacher "
                          f"{teacher.source!r} is unconditional (no text encoder): drop it")
    if data.prompts_file:
        read_prompts((), data.prompts_file, "data.prompts_file")
    if config.run_eval and config.eval.prompts_file:
        read_prompts((), config.eval.prompts_file, "eval.prompts_file")


def _show(value: object) -> str:
    return str(value) if not dataclasses.is_dataclass(value) else "{...}"
