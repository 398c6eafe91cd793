"""The plan against the measured step at bf16 autocast with the frozen weights stored at bf16 (train.frozen_dtype),
run in a process of its own (accelerate keeps one precision per process): a LoRA student (its frozen base at bf16)
and DMD2 with a LoRA fake score (a whole fake score planned 44.78 MB against 44.84 measured when it was in the list). Prints one JSON line {case: [planned, measured]}.

    python -m tests.plan_bf16 PIXEL_TEACHER TEXT_TEACHER
"""

import json
import sys
import tempfile
from pathlib import Path

from diffkd.api import frozen_precision, prepare
from diffkd.config import parse_config
from diffkd.plan_check import measured_peak, plan_for, teacher_layout
from diffkd.trainer import Trainer, make_accelerator

BF16 = {"batch_size": 32, "device": "cpu", "mixed_precision": "bf16", "frozen_dtype": "bf16"}
DMD = {"name": "dmd", "student_steps": 1, "num_steps": 10, "fake_updates": 2}


def cases(teacher: str, text_teacher: str) -> dict[str, dict]:
    return {
        "lora-consistency": {"method": {"name": "consistency", "num_steps": 10, "teacher_grid": 20,
                                        "target_ema": 0.0, "guidance_scale": 3.0},
                             "teacher": {"source": text_teacher}, "student": {"lora": {"rank": 8}},
                             "data": {"source": "digits", "convert": True, "prompts": ["a cat", "a dog"]},
                             "train": BF16, "run_eval": False},
        "dmd-lora-fake": {"method": {**DMD, "fake_score_lora_rank": 8}, "teacher": {"source": teacher},
                          "data": {"source": "digits"}, "train": BF16, "run_eval": False},
    }


def main() -> None:
    teacher, text_teacher = sys.argv[1:3]
    figures = {}
    for name, data in cases(teacher, text_teacher).items():
        config = parse_config(data)
        planned = plan_for(config, teacher_layout(config.teacher.source)).peak_bytes
        loaded, method, _ = prepare(config)
        with tempfile.TemporaryDirectory() as work:
            trainer = Trainer(method, config.train, Path(work), make_accelerator(config.train, Path(work)))
            with frozen_precision(loaded, "bf16", trainer.trained_networks()):
                figures[name] = [planned, measured_peak(trainer)]
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
