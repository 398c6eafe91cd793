"""The bad-input catalogue: each case prepares files and a command line that the CLI must refuse with exit code 2,
exactly one line on stderr naming the problem and the fix, the output folder untouched and no crafted payload run.

tests/test_bad_input.py runs every case; ``python eval/reliability.py`` runs them all and writes the table in
eval/RESULTS.md.
"""

from __future__ import annotations

import atexit
import json
import os
import shutil
import subprocess
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from tests.faults import ROOT, run_cli


@dataclass
class Case:
    """One bad input: ``make(tmp, teacher)`` prepares files and returns (argv, a fragment the message must contain,
    the --output folder that must stay untouched)."""

    name: str
    make: Callable[[Path, str], tuple[list[str], str, Path]]
    env: dict[str, str] = field(default_factory=dict)  # "{tmp}" becomes the case's scratch folder


def _distill(tmp: Path, teacher: str, *sets: str, config: str = "configs/digits-progressive.yaml",
             output: Path | None = None, extra: tuple[str, ...] = ()) -> tuple[list[str], Path]:
    output = output or tmp / "run"
    base = [f"teacher.source={teacher}", "method.start_steps=8", "method.final_steps=2", "method.steps_per_round=2",
            "train.batch_size=8", "train.device=cpu", "run_eval=false"]
    argv = ["distill", str(ROOT / config) if not Path(config).is_absolute() else config, "--output", str(output)]
    for assignment in (*base, *sets):
        argv += ["--set", assignment]
    return argv + list(extra), output


def _set(fragment: str, *sets: str) -> Callable:
    def make(tmp: Path, teacher: str):
        argv, output = _distill(tmp, teacher, *sets)
        return argv, fragment, output
    return make


def _recipe(config: str, fragment: str, *sets: str) -> Callable:
    """A run of the shipped recipe ``config`` on the tiny teacher with ``sets`` (the progressive base's keys do not
    apply to other methods)."""
    def make(tmp: Path, teacher: str):
        output = tmp / "run"
        argv = ["distill", str(ROOT / "configs" / config), "--output", str(output)]
        for assignment in (f"teacher.source={teacher}", "train.batch_size=8", "train.device=cpu", "run_eval=false",
                           *sets):
            argv += ["--set", assignment]
        return argv, fragment, output
    return make


def _consistency(fragment: str, *sets: str) -> Callable:
    return _recipe("digits-consistency.yaml", fragment, "method.num_steps=2", *sets)


def _dmd(fragment: str, *sets: str) -> Callable:
    return _recipe("digits-dmd.yaml", fragment, *sets)


def _copy_teacher(teacher: str, tmp: Path) -> Path:
    copy = tmp / "teacher-copy"
    shutil.copytree(teacher, copy)
    return copy


def _teacher_case(fragment: str, damage: Callable[[Path], None]) -> Callable:
    def make(tmp: Path, teacher: str):
        copy = _copy_teacher(teacher, tmp)
        damage(copy)
        argv, output = _distill(tmp, str(copy))
        return argv, fragment, output
    return make


def _unet_weights(teacher: Path) -> Path:
    return teacher / "unet" / "diffusion_pytorch_model.safetensors"


def _truncate(teacher: Path) -> None:
    file = _unet_weights(teacher)
    data = file.read_bytes()
    file.write_bytes(data[:len(data) // 2])


def _pickle_as_safetensors(teacher: Path) -> None:
    import torch
    from safetensors.torch import load_file

    file = _unet_weights(teacher)
    tensors = {k: v.clone() for k, v in load_file(file).items()}  # clone: load_file maps the file it reads
    torch.save(tensors, file)  # a torch pickle under the safetensors name


class Payload:
    """Unpickling this runs ``touch <marker>``: what a crafted pickle does."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _malicious_bin(teacher: Path) -> None:
    import pickle

    file = _unet_weights(teacher)
    file.unlink()
    (file.parent / "diffusion_pytorch_model.bin").write_bytes(
        pickle.dumps({"weight": Payload(str(teacher.parent / "PWNED"))}))


def _unsupported_scheduler(teacher: Path) -> None:
    from diffusers import EDMEulerScheduler

    index = json.loads((teacher / "model_index.json").read_text())
    index["_class_name"] = "DDPMPipeline"
    index["scheduler"] = ["diffusers", "EDMEulerScheduler"]
    (teacher / "model_index.json").write_text(json.dumps(index))
    shutil.rmtree(teacher / "scheduler")
    EDMEulerScheduler().save_pretrained(teacher / "scheduler")


def _remote_code(teacher: Path) -> None:
    index = json.loads((teacher / "model_index.json").read_text())
    index["_class_name"] = ["pipeline", "EvilPipeline"]
    (teacher / "model_index.json").write_text(json.dumps(index))
    (teacher / "pipeline.py").write_text(
        f"import pathlib\npathlib.Path({str(teacher.parent / 'PWNED')!r}).touch()\n"
        "from diffusers import DDIMPipeline\nclass EvilPipeline(DDIMPipeline):\n    pass\n")


def _images(folder: Path, specs: list[tuple[str, tuple[int, int]]]) -> Path:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    for index, (mode, size) in enumerate(specs):
        Image.new(mode, size, color=128 if mode == "L" else (128, 64, 32)).save(folder / f"{index:03d}.png")
    return folder


def _data_case(fragment: str, prepare: Callable[[Path], Path | str]) -> Callable:
    def make(tmp: Path, teacher: str):
        argv, output = _distill(tmp, teacher, f"data.source={prepare(tmp)}")
        return argv, fragment, output
    return make


def _garbage_image(tmp: Path) -> Path:
    folder = _images(tmp / "images", [("L", (8, 8))] * 3)
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not a png")
    return folder


def _captioned(kind: str, count: int = 6, damage: Callable[[int], tuple] | None = None) -> Callable[[Path], str]:
    """A captioned set of 8x8 grey images (the tiny teacher's) in format ``kind``; ``damage(i)`` may replace row
    i's image (a PIL image, or bytes written as they are) or caption (None: keep it)."""
    from tests import captioned_sets

    base = captioned_sets.flat_rows(8, "L")

    def pick(i: int):
        image, caption = damage(i) if damage else (None, None)
        return base(i)[0] if image is None else image, base(i)[1] if caption is None else caption

    return lambda tmp: captioned_sets.write(kind, tmp / kind, count, pick)


def _grey(width: int, height: int):
    from PIL import Image

    return Image.new("L", (width, height))


def _empty_shard(tmp: Path) -> str:
    import tarfile

    from tests import captioned_sets

    pattern = captioned_sets.write_shards(tmp / "shards", 4, captioned_sets.flat_rows(8, "L"), per_shard=2)
    tarfile.open(tmp / "shards" / "shard-00002.tar", "w").close()
    return pattern.replace("00001}", "00002}")


def _metadata_without_file_names(tmp: Path) -> str:
    """A metadata.jsonl whose lines name their images under another key than diffusers' file_name."""
    folder = Path(_captioned("metadata", count=2)(tmp))
    metadata = folder / "metadata.jsonl"
    metadata.write_text(metadata.read_text().replace('"file_name"', '"path"'))
    return str(folder)


def _captioned_case(fragment: str, prepare: Callable[[Path], str], *sets: str) -> Callable:
    def make(tmp: Path, teacher: str):
        argv, output = _distill(tmp, teacher, f"data.source={prepare(tmp)}", "data.num_workers=0", *sets)
        return argv, fragment, output
    return make


def _output_case(fragment: str, prepare: Callable[[Path], Path], *extra: str) -> Callable:
    def make(tmp: Path, teacher: str):
        output = prepare(tmp)
        argv, _ = _distill(tmp, teacher, output=output, extra=extra)
        return argv, fragment, output
    return make


def _file(tmp: Path) -> Path:
    (tmp / "run").write_text("not a folder")
    return tmp / "run"


def _read_only(tmp: Path) -> Path:
    """chmod is no obstacle to root, so as root the folder is made immutable (chattr +i) instead; where the file
    system cannot do that (overlayfs), a folder under /proc, which no one can write, stands in."""
    folder = tmp / "readonly"
    folder.mkdir()
    if os.geteuid() != 0:
        folder.chmod(0o555)
    elif subprocess.run(["chattr", "+i", str(folder)], capture_output=True, check=False).returncode != 0:
        return Path("/proc/diffkd-read-only/run")
    return folder / "run"


def _fake_run(tmp: Path, finished: bool = False, lock: dict | None = None) -> Path:
    output = tmp / "run"
    (output / "checkpoints").mkdir(parents=True)
    (output / "config.yaml").write_text("method: {name: progressive}\n")
    if finished:
        (output / "finished.json").write_text("{}")
    if lock is not None:
        (output / "run.lock").write_text(json.dumps(lock))
    return output


def _live_lock(tmp: Path) -> Path:
    """A lock held by a process that is alive (a sleeping child that outlives the check)."""
    import socket

    sleeper = subprocess.Popen(["sleep", "600"])
    (tmp / "sleeper.pid").write_text(str(sleeper.pid))
    stat = Path(f"/proc/{sleeper.pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    return _fake_run(tmp, lock={"pid": sleeper.pid, "host": socket.gethostname(), "process_start": stat})


def stop_sleeper(tmp: Path) -> None:
    pid_file = tmp / "sleeper.pid"
    if pid_file.exists():
        try:
            os.kill(int(pid_file.read_text()), 9)
            os.waitpid(int(pid_file.read_text()), 0)
        except (ProcessLookupError, ChildProcessError):
            pass


def _real_run(tmp: Path, teacher: str) -> Path:
    """A finished 2-step run (made once per session and copied), with its checkpoints, minus the finished marker."""
    source = real_run_template(teacher)
    output = tmp / "run"
    shutil.copytree(source, output)
    (output / "finished.json").unlink()
    return output


_TEMPLATE: dict[str, Path] = {}


def real_run_template(teacher: str) -> Path:
    if teacher not in _TEMPLATE:
        import tempfile

        folder = Path(tempfile.mkdtemp(prefix="diffkd-run-template-")) / "run"
        atexit.register(shutil.rmtree, folder.parent, True)
        argv, _ = _distill(folder.parent, teacher, "train.checkpoint_every=1", output=folder)
        from diffkd.cli import main

        if main(argv) != 0:
            raise RuntimeError("could not make the template run")
        _TEMPLATE[teacher] = folder
    return _TEMPLATE[teacher]


def _resume_case(fragment: str, damage: Callable[[Path], list[str]], *sets: str) -> Callable:
    def make(tmp: Path, teacher: str):
        output = _real_run(tmp, teacher)
        extra = damage(output)
        argv, _ = _distill(tmp, teacher, *sets, output=output, extra=tuple(extra))
        return argv, fragment, output
    return make


def _newest(output: Path) -> Path:
    return max((output / "checkpoints").glob("ckpt-*"))


def _garble_checkpoint(output: Path) -> list[str]:
    file = _newest(output) / "student.safetensors"
    file.write_bytes(b"\xff" * file.stat().st_size)  # same size: only reading it can tell
    return ["--resume"]


def _truncate_checkpoint(output: Path) -> list[str]:
    file = _newest(output) / "student.safetensors"
    file.write_bytes(file.read_bytes()[:100])
    return ["--resume", str(_newest(output))]


def _pickle_in_checkpoint(output: Path) -> list[str]:
    import pickle

    (_newest(output) / "rng_state.pkl").write_bytes(pickle.dumps(Payload(str(output.parent / "PWNED"))))
    return ["--resume"]


def _pickle_named_safetensors(output: Path) -> list[str]:
    import pickle

    file = _newest(output) / "optimizer.student.safetensors"
    file.write_bytes(pickle.dumps(Payload(str(output.parent / "PWNED"))))
    state = json.loads((_newest(output) / "state.json").read_text())
    state["files"][file.name] = file.stat().st_size
    (_newest(output) / "state.json").write_text(json.dumps(state))
    return ["--resume"]


def _not_a_checkpoint(output: Path) -> list[str]:
    (output.parent / "elsewhere").mkdir()
    return ["--resume", str(output.parent / "elsewhere")]


def _other_shape_checkpoint(output: Path) -> list[str]:
    """A checkpoint from a different network (shapes do not fit); config.yaml removed so only the weights can tell."""
    import torch

    from diffkd import checkpoint

    folder = output.parent / "foreign"
    checkpoint.save(folder, 0, 1, {"student": {"conv_in.weight": torch.zeros(3, 3)}},
                    {"progress": {"round": 0, "step": 1}, "optimizer": {"state": {}, "param_groups": []}}, 1)
    (output / "config.yaml").unlink()
    return ["--resume", str(checkpoint.latest(folder))]


def _no_cuda() -> tuple[str, str]:
    import torch

    if torch.cuda.is_available():
        return f"train.device=cuda:{torch.cuda.device_count()}", "not available"
    return "train.device=cuda", "CUDA is not available"


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _cuda_case(tmp: Path, teacher: str):
    setting, fragment = _no_cuda()
    argv, output = _distill(tmp, teacher, setting)
    return argv, fragment, output


def _config_file_case(content: str | None, fragment: str) -> Callable:
    def make(tmp: Path, teacher: str):
        path = tmp / "config.yaml"
        if content is not None:
            path.write_text(content)
        argv, output = _distill(tmp, teacher, config=str(path))
        return argv, fragment, output
    return make


def _teacher_config_case(tmp: Path, teacher: str):
    output = tmp / "run"
    return ["distill", str(ROOT / "configs/digits-teacher.yaml"), "--output", str(output)], "train-teacher", output


def rgb_teacher(tmp: Path) -> Path:
    """A random 32 px RGB pixel teacher (the layout of google/ddpm-cifar10-32, in miniature)."""
    from diffusers import DDIMScheduler, DDPMPipeline, UNet2DModel

    unet = UNet2DModel(sample_size=32, in_channels=3, out_channels=3, block_out_channels=(8, 16), layers_per_block=1,
                       norm_num_groups=4, down_block_types=("DownBlock2D",) * 2, up_block_types=("UpBlock2D",) * 2)
    folder = tmp / "rgb-teacher"
    DDPMPipeline(unet=unet, scheduler=DDIMScheduler()).save_pretrained(folder)
    return folder


def _rgb_teacher_case(fragment: str, *sets: str) -> Callable:
    def make(tmp: Path, teacher: str):
        argv, output = _distill(tmp, str(rgb_teacher(tmp)), *sets)
        return argv, fragment, output
    return make


def _eval_case(fragment: str, *options: str) -> Callable:
    """``diffkd eval`` of the 32 px RGB teacher with ``options``; {tmp}/real holds 32 px RGB images that fit it."""
    def make(tmp: Path, teacher: str):
        _images(tmp / "real", [("RGB", (32, 32))] * 4)
        output = tmp / "eval"
        argv = ["eval", "--pipeline", str(rgb_teacher(tmp)), "--steps", "1", "--num-samples", "4", "--output",
                str(output), "--cache-dir", str(tmp / "cache"), *(o.replace("{tmp}", str(tmp)) for o in options)]
        return argv, fragment, output
    return make


def _resume_file(output: Path) -> list[str]:
    (output.parent / "ckpt.safetensors").write_bytes(b"not a folder")
    return ["--resume", str(output.parent / "ckpt.safetensors")]


def _teacher_steps_case(tmp: Path, teacher: str):
    output = tmp / "run"
    return (["train-teacher", str(ROOT / "configs/digits-teacher.yaml"), "--output", str(output), "--set",
             "method.num_steps=-5"], "method.num_steps must be >= 1", output)


def _text_teacher_case(fragment: str, *sets: str) -> Callable:
    """A distillation of the tiny Stable-Diffusion-shaped teacher of tests/conftest.py with ``sets``."""
    def make(tmp: Path, teacher: str):
        from tests.conftest import make_tiny_sd_pipeline

        text_teacher = make_tiny_sd_pipeline(tmp / "text-teacher")
        argv, output = _distill(tmp, text_teacher, "data.convert=true", "data.prompts=[a cat]", *sets)
        return argv, fragment, output
    return make


def _glyphs_teacher_before_its_parts(tmp: Path, teacher: str):
    output = tmp / "run"
    return (["train-teacher", str(ROOT / "configs/glyphs-teacher.yaml"), "--output", str(output), "--set",
             f"method.components={tmp / 'no-vae-stage'}"], "train it first", output)


def _glyphs_teacher_without_its_text_encoder(tmp: Path, teacher: str):
    from tests.conftest import make_tiny_sd_pipeline

    output = tmp / "run"
    return (["train-teacher", str(ROOT / "configs/glyphs-teacher.yaml"), "--output", str(output), "--set",
             f"method.components={make_tiny_sd_pipeline(tmp / 'vae-stage')}", "--set",
             f"method.text_encoder={tmp / 'no-text-clip'}"], "neither a folder nor in the Hugging Face cache", output)


def _glyphs_count_case(tmp: Path, teacher: str):
    output = tmp / "run"
    return (["train-teacher", str(ROOT / "configs/glyphs-vae.yaml"), "--output", str(output), "--set",
             "data.num_glyphs=0"], "data.num_glyphs must be >= 1", output)



def _other_run_checkpoint(output: Path) -> list[str]:
    """Run A (the template) and run B (this folder, another config, interrupted before its first checkpoint): B
    resumes from A's checkpoint by path, as issue 37's user did."""
    import yaml

    other = output.parent / "run-a"
    shutil.copytree(output, other)
    shutil.rmtree(output / "checkpoints")
    (output / "checkpoints").mkdir()
    config = yaml.safe_load((output / "config.yaml").read_text())
    config["method"]["steps_per_round"] = 3
    (output / "config.yaml").write_text(yaml.safe_dump(config))
    return ["--resume", str(_newest(other))]


def _foreign_checkpoint_inside(output: Path) -> list[str]:
    """Another run's checkpoint copied into this run's checkpoints/, this run's config.yaml lost: only the
    checkpoint's own record of its run can tell."""
    (output / "config.yaml").unlink()
    return ["--resume"]


def _teacher_changed_since(output: Path) -> list[str]:
    """The teacher folder was retrained under its name since the checkpoint: its recorded content hash differs."""
    state_file = _newest(output) / "state.json"
    state = json.loads(state_file.read_text())
    state["run"]["teacher"]["teacher_sha256"] = "0" * 64
    state_file.write_text(json.dumps(state))
    return ["--resume"]


def _text_file(name: str, content: bytes | None) -> Callable[[Path], Path]:
    def make(tmp: Path) -> Path:
        path = tmp / name
        if content is not None:
            path.write_bytes(content)
        return path
    return make


def _prompts_file_case(fragment: str, prepare: Callable[[Path], Path], *sets: str) -> Callable:
    """The tiny text teacher with ``data.prompts_file`` pointing at what ``prepare`` makes."""
    def make(tmp: Path, teacher: str):
        return _text_teacher_case(fragment, f"data.prompts_file={prepare(tmp)}", *sets)(tmp, teacher)
    return make


def lcm_student(tmp: Path) -> Path:
    """A consistency student in miniature: the 32 px RGB pipeline with LCMScheduler on a 50-point grid, and a card
    naming its method, as diffkd exports it."""
    from diffusers import LCMScheduler

    folder = rgb_teacher(tmp)
    shutil.rmtree(folder / "scheduler")
    LCMScheduler(original_inference_steps=50, timestep_spacing="trailing").save_pretrained(folder / "scheduler")
    index = json.loads((folder / "model_index.json").read_text())
    index["scheduler"] = ["diffusers", "LCMScheduler"]
    (folder / "model_index.json").write_text(json.dumps(index))
    (folder / "README.md").write_text("---\nmethod: consistency\nnum_inference_steps: 4\n---\n")
    return folder


def _eval_student_case(fragment: str, *options: str) -> Callable:
    def make(tmp: Path, teacher: str):
        output = tmp / "eval"
        argv = ["eval", "--pipeline", str(lcm_student(tmp)), "--reference", "digits", "--num-samples", "4",
                "--output", str(output), "--cache-dir", str(tmp / "cache"), *options]
        return argv, fragment, output
    return make


def _teacher_samples_case(fragment: str, *options: str) -> Callable:
    """``diffkd teacher-samples`` of the tiny digits teacher with ``options``."""
    def make(tmp: Path, teacher: str):
        output = tmp / "cache"
        argv = ["teacher-samples", "--teacher", teacher, "--num-samples", "4", "--steps", "2", "--output", str(output),
                *(o.replace("{tmp}", str(tmp)) for o in options)]
        return argv, fragment, output
    return make


def _vae_stage_case(fragment: str, init_from: str) -> Callable:
    def make(tmp: Path, teacher: str):
        output = tmp / "run"
        return (["train-teacher", str(ROOT / "configs/glyphs-vae-decoder.yaml"), "--output", str(output), "--set",
                 f"method.init_from={init_from.replace('{tmp}', str(tmp))}"], fragment, output)
    return make

CASES = [
    Case("unknown config key (closest suggested)", _set("did you mean 'train.learning_rate'", "train.learning_rat=1")),
    Case("unknown config section", _set("did you mean 'train'", "trian.batch_size=4")),
    Case("wrong type: text for an integer", _set("train.batch_size' must be an integer", "train.batch_size=abc")),
    Case("wrong type: fraction for an integer", _set("must be an integer", "train.batch_size=2.5")),
    Case("wrong type: not a boolean", _set("must be true or false", "teacher.trust_remote_code=maybe")),
    Case("zero batch size", _set("train.batch_size must be > 0", "train.batch_size=0")),
    Case("negative batch size", _set("train.batch_size must be > 0", "train.batch_size=-4")),
    Case("zero learning rate", _set("train.learning_rate must be > 0", "train.learning_rate=0")),
    Case("negative learning rate", _set("train.learning_rate must be > 0", "train.learning_rate=-1e-3")),
    Case("zero steps per round", _set("method.steps_per_round must be >= 1", "method.steps_per_round=0")),
    Case("negative teacher-training steps", _teacher_steps_case),
    Case("N not a power-of-two multiple of k", _set("power-of-two multiple", "method.start_steps=48",
                                                    "method.final_steps=4")),
    Case("k does not divide the teacher's timesteps", _set("does not divide", "method.start_steps=12",
                                                           "method.final_steps=3")),
    Case("N beyond the teacher's timesteps", _set("exceeds the teacher's", "method.start_steps=2048",
                                                  "method.final_steps=1")),
    Case("dmd without fake-score updates", _dmd("method.fake_updates must be >= 1", "method.fake_updates=0")),
    Case("dmd timestep range reversed", _dmd("method.timestep_range must be [low, high] with 0 <= low < high <= 1",
                                             "method.timestep_range=0.9,0.1")),
    Case("dmd generator steps that do not divide the teacher's grid", _dmd("does not divide",
                                                                           "method.student_steps=3")),
    Case("dmd multistep sampler misspelt", _dmd("method.multistep must be one of consistency, ddim",
                                                "method.multistep=lcm")),
    Case("dmd backward simulation misspelt", _dmd("method.backward_simulation must be one of random_step, unrolled",
                                                  "method.backward_simulation=unroled")),
    Case("unknown method", _set("method.name must be one of", "method.name=consistencyy")),
    Case("consistency target EMA of 1.5", _consistency("method.target_ema must be in [0, 1)", "method.target_ema=1.5")),
    Case("consistency skipping interval that does not divide the grid",
         _consistency("method.skip=3 must be >= 1 and divide method.teacher_grid=50", "method.skip=3")),
    Case("consistency grid that does not divide the teacher's timesteps",
         _consistency("method.teacher_grid=30 must divide the teacher's 1000", "method.teacher_grid=30")),
    Case("consistency LPIPS distance without its backbone weights (offline)",
         _consistency("alexnet-owt-7be5be79.pth", "method.distance=lpips"), {"TORCH_HOME": "{tmp}/torch-home"}),
    Case("unknown choice (LR schedule)", _set("train.lr_schedule must be one of", "train.lr_schedule=exp")),
    Case("EMA decay of 1", _set("train.ema_decay must be in [0, 1)", "train.ema_decay=1")),
    Case("batch not divisible into accumulation steps", _set("must divide into", "train.batch_size=10",
                                                             "train.gradient_accumulation_steps=3")),
    Case("config file missing", _config_file_case(None, "not found")),
    Case("config file not YAML", _config_file_case("method: [unclosed\n", "not valid YAML")),
    Case("config file that is a YAML list", _config_file_case("- method: progressive\n", "holds a list")),
    Case("config file empty", _config_file_case("", "is empty")),
    Case("config file of comments only", _config_file_case("# nothing yet\n", "is empty")),
    Case("config file indented with a tab", _config_file_case("train:\n\tbatch_size: 4\n",
                                                              "line 2 is indented with a tab")),
    Case("teacher config given to distill", _teacher_config_case),
    Case("--set without =", _set("--set expects key=value", "train.batch_size")),
    Case("teacher path missing", _set("does not exist", "teacher.source=/nonexistent/teacher")),
    Case("teacher folder that is not a diffusers pipeline",
         _teacher_case("no model_index.json", lambda t: (t / "model_index.json").unlink())),
    Case("teacher without a supported scheduler", _teacher_case("no Gaussian path diffkd takes", _unsupported_scheduler)),
    Case("teacher weights truncated", _teacher_case("corrupt", _truncate)),
    Case("teacher pickle where safetensors is expected", _teacher_case("corrupt", _pickle_as_safetensors)),
    Case("teacher weights as a crafted pickle (.bin)", _teacher_case("weights_only", _malicious_bin)),
    Case("teacher with custom pipeline code, no trust_remote_code", _teacher_case("trust_remote_code", _remote_code)),
    Case("teacher model_index.json not valid JSON",
         _teacher_case("model_index.json is not valid JSON", lambda t: (t / "model_index.json").write_text("{,"))),
    Case("hub teacher offline", _set("from the Hugging Face hub", "teacher.source=nobody/no-such-model")),
    Case("data set grey, teacher RGB", _rgb_teacher_case("holds 8x8 or 16x16 grey images but the model makes "
                                                         "32x32 RGB ones")),
    Case("image folder of another size than the teacher's", _data_case("holds 12x12 grey images", lambda tmp: _images(
        tmp / "images", [("L", (12, 12))] * 2))),
    Case("image folder in colour, teacher grey", _data_case("data.convert=true", lambda tmp: _images(
        tmp / "images", [("RGB", (8, 8))] * 2))),
    Case("eval of an RGB pipeline against the digits", _eval_case("holds 8x8 or 16x16 grey images", "--reference",
                                                                   "digits", "--feature", "inception")),
    Case("eval of an RGB pipeline with the digits classifier", _eval_case("the digits classifier", "--reference",
                                                                          "{tmp}/real", "--feature",
                                                                          "digits-classifier")),
    Case("eval reference folder missing (Inception weights missing too)",
         _eval_case("eval.reference '/nonexistent/real' does not exist", "--reference", "/nonexistent/real"),
         {"TORCH_HOME": "{tmp}/torch-home"}),
    Case("eval Inception weights file missing", _eval_case("--feature-weights", "--reference", "{tmp}/real",
                                                           "--feature", "inception", "--feature-weights",
                                                           "{tmp}/no-inception.pth"),
         {"TORCH_HOME": "{tmp}/torch-home"}),
    Case("glyphs (32 px RGB) for a grey teacher", _data_case("data.resize=true to render them", lambda tmp: "glyphs")),
    Case("zero glyphs", _glyphs_count_case),
    Case("glyphs UNet stage before its VAE stage", _glyphs_teacher_before_its_parts),
    Case("glyphs UNet stage before its text encoder stage", _glyphs_teacher_without_its_text_encoder),
    Case("eval guidance scales below 1", _eval_case("eval.guidance_scales must all be >= 1", "--guidance-scales",
                                                    "0.5,2")),
    Case("eval prompt accuracy asked of a pipeline without text",
         _eval_case("eval.prompt_accuracy=true but there is no text-conditioned pipeline", "--reference", "{tmp}/real",
                    "--prompt-accuracy")),
    Case("data folder missing", _data_case("does not exist", lambda tmp: tmp / "no-images")),
    Case("data folder empty", _data_case("holds no PNG/JPEG", lambda tmp: _images(tmp / "empty", []))),
    Case("unreadable image", _data_case("cannot read image", _garbage_image)),
    Case("images of mixed sizes", _data_case("mixed sizes", lambda tmp: _images(
        tmp / "images", [("L", (8, 8)), ("L", (8, 8)), ("L", (12, 10))]))),
    Case("captioned folder: unreadable image", _captioned_case("data.skip_bad_rows=true", _captioned(
        "metadata", damage=lambda i: (b"not a png" if i == 3 else None, None)))),
    Case("captioned folder: row without caption", _captioned_case("has no caption", _captioned(
        "metadata", damage=lambda i: (None, "" if i == 2 else None)))),
    Case("captioned set: caption column missing", _captioned_case("has no column 'prompt'", _captioned("saved"),
                                                                 "data.caption_column=prompt")),
    Case("WebDataset shard empty", _captioned_case("is empty", _empty_shard)),
    Case("captioned folder: metadata.jsonl without file_name", _captioned_case(
        "metadata.jsonl' has no file_name field", _metadata_without_file_names)),
    Case("captioned images of mixed sizes without data.resize", _captioned_case("set data.resize=true", _captioned(
        "webdataset", damage=lambda i: (_grey(12, 10) if i == 4 else None, None)))),
    Case("hub data set offline", _captioned_case("save_to_disk", lambda tmp: "nobody/no-such-dataset")),
    Case("images of mixed channels", _data_case("mixed channels", lambda tmp: _images(
        tmp / "images", [("L", (8, 8)), ("RGB", (8, 8))]))),
    Case("CUDA asked for on a machine without it", _cuda_case),
    Case("fp16 asked for on a machine without CUDA" if not _has_cuda() else "fp16 on CPU",
         _set("mixed_precision=fp16 needs a CUDA GPU" if not _has_cuda() else "fp16", "train.mixed_precision=fp16",
              *(() if not _has_cuda() else ("train.device=cpu",)))),
    Case("student config that cannot be derived from the teacher",
         _set("student", "student.architecture=compact", "student.width_multiplier=0.1")),
    Case("LPIPS loss without its backbone weights (offline)", _set("alexnet-owt-7be5be79.pth", "losses.lpips=0.5"),
         {"TORCH_HOME": "{tmp}/torch-home"}),
    Case("evaluation needs Inception weights (offline)",
         _set("weights-inception-2015-12-05-6726825d.pth", "run_eval=true", "eval.feature=inception"),
         {"TORCH_HOME": "{tmp}/torch-home"}),
    Case("evaluation needs LPIPS weights (offline)",
         _set("alexnet-owt-7be5be79.pth", "run_eval=true", "eval.lpips=true"), {"TORCH_HOME": "{tmp}/torch-home"}),
    Case("evaluation needs CLIP weights (offline)",
         _set("CLIPScore", "run_eval=true", "eval.clip_score=true", "eval.clip_model=nobody/no-clip-model")),
    Case("output is a file", _output_case("is a file", _file)),
    Case("output folder read-only", _output_case("not writable", _read_only)),
    Case("output holds a finished run", _output_case("holds a finished run", lambda t: _fake_run(t, finished=True))),
    Case("output holds an unfinished run", _output_case("--resume to continue", _fake_run)),
    Case("output in use by a running job", _output_case("in use by a running job", _live_lock, "--resume")),
    Case("--resume with --overwrite", _output_case("contradict", _fake_run, "--resume", "--overwrite")),
    Case("--resume PATH that is not a checkpoint", _resume_case("not a diffkd checkpoint", _not_a_checkpoint)),
    Case("--resume FILE", _resume_case("is a file, not a checkpoint folder", _resume_file)),
    Case("checkpoint safetensors corrupt", _resume_case("not a readable safetensors", _garble_checkpoint)),
    Case("checkpoint safetensors truncated", _resume_case("incomplete", _truncate_checkpoint)),
    Case("crafted pickle in a checkpoint folder", _resume_case("refusing", _pickle_in_checkpoint)),
    Case("pickle named .safetensors in a checkpoint", _resume_case("refusing", _pickle_named_safetensors)),
    Case("checkpoint of another network", _resume_case("does not fit",
                                                       lambda o: [*_other_shape_checkpoint(o), "--resume-from-other"])),
    Case("resume with a changed config", _resume_case("train.learning_rate differs",
                                                      lambda o: ["--resume"], "train.learning_rate=0.5")),
    Case("LoRA rank of 0", _set("student.lora.rank must be >= 1", "student.lora.rank=0")),
    Case("LoRA on a compact student", _set("needs student.architecture=copy", "student.lora.rank=4",
                                           "student.architecture=compact")),
    Case("LoRA on a pipeline that cannot load adapters", _set("needs a pipeline that loads LoRA weights",
                                                              "student.lora.rank=4")),
    Case("LoRA target modules that match nothing", _text_teacher_case("match no layer", "student.lora.rank=4",
                                                                      "student.lora.target_modules=[to_qq]")),
    Case("guidance range with w_min > w_max", _set("must not exceed method.guidance.w_max",
                                                   "method.guidance.w_min=6", "method.guidance.w_max=2")),
    Case("guidance embedding on an unconditional teacher", _set("is unconditional: drop method.guidance",
                                                                "method.guidance.w_min=2")),
    Case("guidance embedding on a LoRA student", _text_teacher_case("method.guidance needs a full student",
                                                                    "method.guidance.w_min=2", "student.lora.rank=4")),
    # issue 37: no wrong start may cost a result
    Case("--resume another run's checkpoint by path", _resume_case("--resume-from-other", _other_run_checkpoint,
                                                                   "method.steps_per_round=3")),
    Case("another run's checkpoint inside this run's folder",
         _resume_case("belongs to another run", _foreign_checkpoint_inside, "method.steps_per_round=3")),
    Case("teacher changed since the checkpoint", _resume_case("teacher=", _teacher_changed_since)),
    Case("--resume-from-other without a checkpoint path", _output_case("goes with --resume CHECKPOINT", _fake_run,
                                                                       "--resume", "--resume-from-other")),
    Case("guidance scale on an unconditional teacher (progressive)",
         _set("is unconditional (no text encoder): drop method.guidance_scale", "method.guidance_scale=3")),
    Case("guidance round on an unconditional teacher (consistency)",
         _consistency("drop method.guidance_steps and method.guidance_scale", "method.guidance_scale=3",
                      "method.guidance_steps=10")),
    Case("guidance scale on an unconditional teacher (generator)",
         _recipe("digits-generator.yaml", "drop method.guidance_scale", "method.guidance_scale=3")),
    Case("guidance scale on an unconditional teacher (dmd)", _dmd("drop method.guidance_scale",
                                                                  "method.guidance_scale=3")),
    Case("prompts for an unconditional teacher", _set("is unconditional (no text encoder): drop data.prompts",
                                                      "data.prompts=[a cat]")),
    Case("prompts where the data set brings its own captions",
         _text_teacher_case("data.source=glyphs brings each image's own caption", "data.source=glyphs")),
    Case("prompts file where the data set brings its own captions",
         _prompts_file_case("brings each image's own caption", _text_file("prompts.txt", b"a dog\n"),
                            "data.prompts=[]", "data.source=glyphs")),
    Case("prompts file missing", _prompts_file_case("not found", _text_file("no-prompts.txt", None))),
    Case("prompts file empty", _prompts_file_case("holds no prompts", _text_file("prompts.txt", b"\n  \n"))),
    Case("prompts file binary", _prompts_file_case("is not a text file", _text_file("prompts.txt",
                                                                                   b"\x00\xff\xfe weights"))),
    Case("eval steps the consistency student's LCMScheduler cannot sample (distill)",
         _consistency("eval.steps (the evaluation after training) has 64, which the pipeline's LCMScheduler cannot "
                      "sample", "run_eval=true", "eval.steps=[1,64]")),
    Case("eval steps the student's LCMScheduler cannot sample (diffkd eval)",
         _eval_student_case("has 64, which the pipeline's LCMScheduler cannot sample", "--steps", "1,64")),
    Case("diffkd eval on a CUDA device that is not there", _eval_student_case(
        "CUDA is not available" if not _has_cuda() else "not available", "--device",
        "cuda" if not _has_cuda() else "cuda:99")),
    Case("train-teacher VAE stage from a missing init_from folder",
         _vae_stage_case("does not exist: point it at a pipeline folder", "{tmp}/no-vae")),
    Case("train-teacher VAE stage from a hub id not in the cache",
         _vae_stage_case("could not load its VAE", "nobody/no-such-vae")),
    Case("diffkd eval prompts for pipelines without text", _eval_student_case(
        "eval.prompts (--prompt) is for text-conditioned pipelines", "--prompt", "a cat")),
    Case("diffkd eval guidance scales for pipelines without text", _eval_student_case(
        "eval.guidance_scales (--guidance-scales) is for text-conditioned pipelines", "--guidance-scales", "1,3")),
    Case("evaluation after training given prompts for an unconditional teacher",
         _set("eval.prompts (--prompt) is for text-conditioned pipelines", "run_eval=true", "eval.prompts=[a cat]")),
    Case("teacher-samples on a CUDA device that is not there", _teacher_samples_case(
        "not available", "--device", "cuda" if not _has_cuda() else "cuda:99")),
    Case("teacher-samples guidance on an unconditional teacher",
         _teacher_samples_case("drop --guidance-scale", "--guidance-scale", "3")),
    Case("teacher-samples prompts for an unconditional teacher",
         _teacher_samples_case("drop --prompts-file", "--prompts-file", str(ROOT / "README.md"))),
    Case("teacher-samples with zero steps", _teacher_samples_case("--steps must be >= 1", "--steps", "0")),
]


def snapshot(path: Path) -> dict | None:
    """Every entry under ``path`` with its size and mtime (None if it does not exist)."""
    if not path.exists():
        return None
    if path.is_file():
        return {".": (path.stat().st_size, path.stat().st_mtime_ns)}
    return {str(p.relative_to(path)): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(path.rglob("*"))}


@dataclass
class CaseResult:
    case: Case
    ok: bool
    message: str
    problem: str = ""


def check_case(case: Case, tmp: Path, teacher: str, run: Callable[[list[str], dict], tuple[int, str]]
               ) -> CaseResult:
    """Prepare, run via ``run(argv, env) -> (exit code, stderr)``, and check: exit 2, exactly one stderr line with the
    expected fragment, the output folder as it was, no crafted payload executed."""
    tmp.mkdir(parents=True, exist_ok=True)
    argv, fragment, output = case.make(tmp, teacher)
    env = {k: v.replace("{tmp}", str(tmp)) for k, v in case.env.items()}
    before = snapshot(output)
    try:
        code, stderr = run(argv, env)
    finally:
        stop_sleeper(tmp)
        if os.geteuid() == 0 and (tmp / "readonly").exists():
            subprocess.run(["chattr", "-i", str(tmp / "readonly")], check=False)
    lines = [line for line in stderr.splitlines() if line.strip()]
    message = lines[-1] if lines else ""
    problems = []
    if code != 2:
        problems.append(f"exit code {code}")
    if len(lines) != 1:
        problems.append(f"{len(lines)} stderr lines")
    if fragment not in message:
        problems.append(f"message lacks {fragment!r}")
    if snapshot(output) != before:
        problems.append("output changed")
    if list(tmp.rglob("PWNED")):
        problems.append("a crafted payload ran")
    return CaseResult(case, not problems, message, "; ".join(problems))


def run_subprocess(argv: list[str], env: dict) -> tuple[int, str]:
    result = run_cli(argv, env=env)
    return result.returncode, result.stderr
