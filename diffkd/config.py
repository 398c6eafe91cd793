"""Typed configuration: dataclasses <-> YAML, with ``--set a.b=value`` overrides.

Every key is checked against the dataclass fields (a typo gets the closest valid key), every value is coerced to
the field's type, and each section validates its ranges in ``__post_init__``. A bad config costs one line on
stderr before any work starts. Like everything it imports (the option dataclasses of ``diffkd.method_options`` and
``diffkd.eval_options``, the checks of ``diffkd.validation``), it imports no torch and nothing above it.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from diffkd.errors import DiffkdError
from diffkd.eval_options import EvalConfig
from diffkd.method_options import METHODS, MethodConfig
from diffkd.validation import VALIDATION_REFERENCES, check, check_choice


@dataclass
class TeacherConfig:
    """The pipeline to distil: a local diffusers folder or a hub id.

    image_size: the pixel side to distil at (None: the pipeline's default, its network's sample size through the
    VAE; Flux's 1024). The student samples best at this size, which the model card records.
    """

    source: str = "teachers/digits-16"
    trust_remote_code: bool = False
    image_size: int | None = None

    def __post_init__(self):
        check(bool(self.source), "teacher.source must name a diffusers pipeline folder or hub id")
        check(self.image_size is None or self.image_size >= 1,
              f"teacher.image_size must be a positive number of pixels; got {self.image_size}")


@dataclass
class DataConfig:
    """Training images ('digits', 'glyphs' or a folder) and prompts for text teachers.

    resize / convert: scale-and-crop images to the teacher's size / convert grey <-> RGB; off by default, so a set
    that does not match the teacher is refused rather than silently adapted.
    num_glyphs / seed: how many glyphs-32 images (source 'glyphs') and which; each comes with its caption, which
    a text teacher is trained or distilled on in place of data.prompts.
    source may also be a captioned set streamed from disk (diffkd.captioned): a folder with diffusers'
    metadata.jsonl, a dataset saved with save_to_disk or a hub name, or WebDataset shards (brace patterns joined by
    '::'). image_column / caption_column: its columns (empty: 'image' and 'text', or a shard's image extension and
    'txt'; 'json.caption' reads a field of a json column). num_workers: DataLoader workers that decode it.
    skip_bad_rows: leave out unreadable images and rows without caption (counted in the log and the model card)
    instead of refusing the set.
    """

    source: str = "digits"
    resize: bool = False
    convert: bool = False
    prompts: list[str] = field(default_factory=list)
    prompts_file: str | None = None
    num_glyphs: int = 20000
    seed: int = 0
    image_column: str = ""
    caption_column: str = ""
    num_workers: int = 2
    skip_bad_rows: bool = False

    def __post_init__(self):
        check(self.num_workers >= 0, f"data.num_workers must be >= 0; got {self.num_workers}")
        check(self.num_glyphs >= 1, f"data.num_glyphs must be >= 1; got {self.num_glyphs}")
        check(self.seed >= 0, f"data.seed must be >= 0; got {self.seed}")


# The layers LCM-LoRA adapts in Stable Diffusion's UNet (Luo et al. 2023): attention and feed-forward projections,
# the transformer blocks' in/out projections, every resnet convolution, the up/down samplers and time projections.
LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2", "conv1",
                "conv2", "conv_shortcut", "downsamplers.0.conv", "upsamplers.0.conv", "time_emb_proj")


@dataclass
class LoraOptions:
    """LoRA adapters (Hu et al. 2021) on a frozen copy of the teacher's UNet: W + (alpha / rank) B A per target layer.

    target_modules: module names, or name suffixes after a dot (peft's rule); None: the LCM-LoRA layers of the
    teacher's layout (``LORA_TARGETS`` for a UNet; attention projections for SD3's and Flux's transformers).
    fuse: besides the adapter folder, also export the full student with the adapters folded into its weights
    (``student-fused``).
    """

    rank: int = 16
    alpha: float = 16.0
    target_modules: list[str] | None = None
    fuse: bool = False

    def __post_init__(self):
        check(self.rank >= 1, f"student.lora.rank must be >= 1 (the adapters' inner width); got {self.rank}")
        check(self.alpha > 0, f"student.lora.alpha must be > 0 (the adapters' scale is alpha / rank); "
                              f"got {self.alpha}")
        check(self.target_modules is None or bool(self.target_modules), "student.lora.target_modules needs at least one layer name, e.g. "
                                         "[to_q, to_k, to_v, to_out.0]")


@dataclass
class StudentConfig:
    """The student network: a copy of the teacher's UNet, or a compact one derived from it (BK-SDM style).

    narrow_init: how a compact student's narrower tensors start: "slice" takes strided slices of the teacher's
    (weight selection), "fresh" leaves them as diffusers initialises them. lora: train LoRA adapters on the
    teacher's own UNet instead of all of its weights (LCM-LoRA, Luo et al. 2023); a copy student only.
    init_from: a pipeline (folder or hub id) whose UNet, of the teacher's shape, a copy student starts from instead
    of the teacher's, such as a distilled one-step generator refined into a 4-step one.
    """

    architecture: str = "copy"
    width_multiplier: float = 1.0
    layers_per_block: int | None = None
    drop_mid_block: bool = False
    norm_num_groups: int | None = None
    narrow_init: str = "slice"
    latency_batch_size: int = 16
    lora: LoraOptions | None = None
    init_from: str = ""

    def __post_init__(self):
        check_choice("student.architecture", self.architecture, ("copy", "compact"))
        check(not self.init_from or (self.architecture == "copy" and self.lora is None),
              "student.init_from starts a full copy student from another UNet of the teacher's shape: drop "
              "student.lora and the compact architecture, or student.init_from")
        check(self.lora is None or self.architecture == "copy",
              "student.lora adapts the teacher's own UNet, so it needs student.architecture=copy: drop student.lora "
              "or the compact architecture")
        check_choice("student.narrow_init", self.narrow_init, ("slice", "fresh"))
        check(self.norm_num_groups is None or self.norm_num_groups >= 1,
              f"student.norm_num_groups must be >= 1 (or null: scale the teacher's); got {self.norm_num_groups}")
        check(self.latency_batch_size >= 0,
              f"student.latency_batch_size must be >= 0 (0 = don't time); got {self.latency_batch_size}")
        check(0 < self.width_multiplier <= 1, f"student.width_multiplier must be in (0, 1]; got {self.width_multiplier}")
        check(self.layers_per_block is None or self.layers_per_block >= 1,
              f"student.layers_per_block must be >= 1; got {self.layers_per_block}")


@dataclass
class LossConfig:
    """Weights of the auxiliary terms added to a method's own loss (0 switches a term off)."""

    output_kd: float = 0.0
    feature_kd: float = 0.0
    feature_taps: list[str] = field(default_factory=list)
    lpips: float = 0.0
    lpips_net: str = "alex"
    lpips_backbone_weights: str | None = None

    def __post_init__(self):
        for name in ("output_kd", "feature_kd", "lpips"):
            check(getattr(self, name) >= 0, f"losses.{name} must be >= 0; got {getattr(self, name)}")
        check_choice("losses.lpips_net", self.lpips_net, ("alex", "vgg", "squeeze"))


@dataclass
class TrainConfig:
    """The training loop: plain values, as in nanoGPT.

    ema_decay: the exported weights' EMA (0 = off), diffusers' EMAModel with its (1 + t) / (10 + t) warm-up, so
    about the last tenth of a run at most; with ema_warmup the decay is 1 - (1 + t / ema_inv_gamma)^-ema_power
    (capped by ema_decay), as in diffusers' unconditional training example: ema_power 1 with ema_inv_gamma g + 1
    averages the whole run with weights growing as t^g (EDM2's power-function EMA, Karras et al. 2024), the
    long average that a one-step DMD generator needs (its weights swing between checkpoints).
    validate_every: every so many steps of the last round (and at its end) score the student's samples of
    ``validate_samples`` fixed noises at each of ``validate_steps`` (empty = the exported k) by FD to
    ``validate_reference`` on ``validate_feature`` ("auto": the digits classifier for grey images, the glyphs one
    for glyphs, "latent-random-conv" on a latent teacher's latents, undecoded, else "random-conv"), and export the
    checkpoint whose FDs have the least geometric mean (``diffkd.run_validation``); 0 = off. A text teacher's
    noises are each drawn for one of the run's own prompts (the set's captions, else data.prompts), the teacher
    guided and the student conditioned as the method trains them. validate_reference: "data" (the training
    images), "teacher" (its DDIM-64 samples of the same noise) or "auto" (data when the run trains on an in-memory
    set, else teacher). validate_batch_size: the noises sampled at once (no gradients; a guided teacher doubles
    them): lower it to the training batch on a large teacher (``diffkd plan`` sizes it). --resume takes a new one
    (a run that ran out of memory validating); it changes only which fresh noise a re-noising sampler (LCM)
    draws between steps, and a w range's draws, so the record goes on.
    patience: stop after that many validations without a new best (0 = never). The same settings score the
    samplers a consistency run may export (``method.sampler: auto``, ``diffkd.sampler_choice``), once at the run's
    end, with validate_every 0 too.

    Memory levers (``diffkd plan`` shows what each saves): gradient_checkpointing recomputes the trained networks'
    activations in the backward instead of keeping them (diffusers' ``enable_gradient_checkpointing``: about a third
    more compute for most of the activations). frozen_dtype stores the frozen teacher (the real score) at the
    autocast precision while trained networks keep fp32 master weights; it needs mixed_precision set to the same,
    since autocast is what feeds those weights inputs of their dtype. optimizer adamw8bit keeps Adam's moments in
    8 bits (bitsandbytes, CUDA only). offload_ema keeps the export EMA (ema_decay > 0) in host memory and
    averages it there each step: the accelerator saves a copy of the trained weights, each step moves them to the
    host once. shard: with several processes, each keeps 1/N of the trained networks' weights, gradients, Adam
    moments and EMA (FSDP2, ``diffkd.sharding``) instead of a whole copy; the frozen teacher stays whole.
    """

    batch_size: int = 64
    learning_rate: float = 1e-4
    lr_schedule: str = "linear"
    warmup_steps: int = 0
    adam_betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    gradient_accumulation_steps: int = 1
    mixed_precision: str = "no"
    ema_decay: float = 0.0
    ema_warmup: bool = False
    ema_inv_gamma: float = 1.0
    ema_power: float = 2 / 3
    checkpoint_every: int = 250
    keep_checkpoints: int = 2
    log_every: int = 10
    seed: int = 0
    device: str = "auto"
    nan_policy: str = "stop"
    max_skipped_steps: int = 10
    validate_every: int = 0
    validate_samples: int = 1024
    validate_steps: list[int] = field(default_factory=list)
    validate_reference: str = "auto"
    validate_feature: str = "auto"
    validate_batch_size: int = 128
    patience: int = 0
    gradient_checkpointing: bool = False
    frozen_dtype: str = "no"
    optimizer: str = "adamw"
    offload_ema: bool = False
    shard: bool = False

    def __post_init__(self):
        for name in ("batch_size", "gradient_accumulation_steps", "checkpoint_every", "keep_checkpoints",
                     "log_every", "validate_batch_size"):
            check(getattr(self, name) > 0, f"train.{name} must be > 0; got {getattr(self, name)}")
        for name in ("validate_every", "patience"):
            check(getattr(self, name) >= 0, f"train.{name} must be >= 0 (0 = off); got {getattr(self, name)}")
        check(self.validate_samples >= 2, f"train.validate_samples must be >= 2; got {self.validate_samples}")
        check(all(k > 0 for k in self.validate_steps),
              f"train.validate_steps must be step counts > 0 (empty: the exported k); got {self.validate_steps}")
        check_choice("train.validate_reference", self.validate_reference, VALIDATION_REFERENCES)
        check(self.patience == 0 or self.validate_every > 0,
              f"train.patience={self.patience} stops on validation: set train.validate_every too")
        check(self.learning_rate > 0, f"train.learning_rate must be > 0; got {self.learning_rate}")
        check(self.warmup_steps >= 0, f"train.warmup_steps must be >= 0; got {self.warmup_steps}")
        check(self.grad_clip >= 0, f"train.grad_clip must be >= 0 (0 = off); got {self.grad_clip}")
        check(0 <= self.ema_decay < 1, f"train.ema_decay must be in [0, 1) (0 = off); got {self.ema_decay}")
        check(self.ema_inv_gamma > 0 and self.ema_power > 0, "train.ema_inv_gamma and train.ema_power must be > 0; "
              f"got {self.ema_inv_gamma} and {self.ema_power}")
        check_choice("train.lr_schedule", self.lr_schedule, ("linear", "constant", "cosine"))
        check_choice("train.mixed_precision", self.mixed_precision, ("no", "fp16", "bf16"))
        check_choice("train.nan_policy", self.nan_policy, ("stop", "skip"))
        check_choice("train.frozen_dtype", self.frozen_dtype, ("no", "bf16", "fp16"))
        check(self.frozen_dtype in ("no", self.mixed_precision),
              f"train.frozen_dtype={self.frozen_dtype} needs train.mixed_precision={self.frozen_dtype} (autocast feeds "
              f"the frozen weights inputs of their dtype); got mixed_precision={self.mixed_precision}")
        check_choice("train.optimizer", self.optimizer, ("adamw", "adamw8bit"))
        check(not self.offload_ema or self.ema_decay > 0,
              "train.offload_ema moves the export EMA to host memory, and there is none: set train.ema_decay > 0 "
              "or drop train.offload_ema")
        check(not (self.offload_ema and self.shard), "train.offload_ema and train.shard both move the export EMA "
              "off the accelerator's whole copy (sharding keeps 1/N of it on each): keep one of them")
        check(self.device in ("auto", "cpu", "cuda", "mps") or self.device.startswith("cuda:"),
              f"train.device must be auto, cpu, cuda, cuda:N or mps; got {self.device!r}")


@dataclass
class Config:
    """A whole job: what to distil, into what, how to train, and how to evaluate the result."""

    method: MethodConfig = field(default_factory=MethodConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    data: DataConfig = field(default_factory=DataConfig)
    student: StudentConfig = field(default_factory=StudentConfig)
    losses: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    run_eval: bool = True

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def parse_config(data: dict) -> Config:
    """Build a Config from nested plain values; the method section's type comes from ``method.name``."""
    data = dict(data or {})
    method = dict(data.pop("method", None) or {})
    name = method.get("name", MethodConfig.name)
    check_choice("method.name", name, METHODS)
    config = build(Config, data, "")
    config.method = build(METHODS[name].options, method, "method")
    check(not (config.train.shard and config.student.lora), "train.shard shards whole trained networks, and a LoRA "
          "student trains megabytes of adapters on a frozen base: drop train.shard (train.frozen_dtype halves the "
          "base's memory)")
    return config


def build(cls: type, data: Any, path: str):
    """Instantiate dataclass ``cls`` from ``data``, naming the exact key on any error."""
    check(isinstance(data, dict), f"config section {path or '<top level>'!r} must be a mapping; got {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    values = {}
    for key, value in data.items():
        full = f"{path}.{key}" if path else str(key)
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f"; did you mean '{path + '.' if path else ''}{close[0]}'?" if close else ""
            raise DiffkdError(f"unknown config key '{full}'{hint} (valid: {', '.join(names)})")
        values[key] = coerce(hints[key], value, full)
    try:
        return cls(**values)
    except TypeError as error:
        raise DiffkdError(f"config section {path!r}: {error}") from error


def coerce(kind: Any, value: Any, key: str) -> Any:
    """Convert a YAML/CLI value to the annotated type, or raise naming the key."""
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if dataclasses.is_dataclass(kind):
        return build(kind, value, key)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        return coerce(next(a for a in args if a is not type(None)), value, key)
    if origin in (list, tuple):
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            value = [value]  # one item
        check(isinstance(value, (list, tuple)), f"config key '{key}' must be a list; got {value!r}")
        if origin is tuple and args and args[-1] is not Ellipsis:
            check(len(value) == len(args), f"config key '{key}' must have {len(args)} items; got {value!r}")
            return tuple(coerce(a, v, key) for a, v in zip(args, value))
        return origin(coerce(args[0], v, key) for v in value) if args else origin(value)
    if kind is bool:
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
        check(isinstance(value, bool), f"config key '{key}' must be true or false; got {value!r}")
        return value
    if kind in (int, float):
        check(not isinstance(value, bool), f"config key '{key}' must be a number; got {value!r}")
        try:
            number = kind(value) if not isinstance(value, str) else kind(float(value) if kind is float else value)
        except (TypeError, ValueError):
            raise DiffkdError(f"config key '{key}' must be {'an integer' if kind is int else 'a number'}; "
                              f"got {value!r}") from None
        check(kind is float or float(value) == number, f"config key '{key}' must be an integer; got {value!r}")
        return number
    if kind is str:
        check(isinstance(value, (str, int, float)) and not isinstance(value, bool),
              f"config key '{key}' must be a string; got {value!r}")
        return str(value)
    return value


def apply_override(data: dict, assignment: str) -> None:
    """``a.b.c=value`` into nested dicts; the value is read as YAML (so 3, 1e-4, true, [1, 2] work)."""
    check("=" in assignment, f"--set expects key=value; got {assignment!r}")
    key, raw = assignment.split("=", 1)
    parts = key.strip().split(".")
    node = data
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        check(isinstance(node, dict), f"--set {key}: '{part}' is not a section")
    node[parts[-1]] = yaml.safe_load(raw) if raw.strip() else ""


def load_config(path: str | Path | None, overrides: typing.Sequence[str] = ()) -> Config:
    """Read a YAML file (or start from defaults), apply ``--set`` overrides and validate."""
    data: dict = {}
    if path is not None:
        file = Path(path)
        check(file.is_file(), f"config file {str(path)!r} not found: pass a YAML file such as "
                              "configs/digits-progressive.yaml")
        data = read_yaml_mapping(file, "config file", "sections such as method:, teacher:, train:")
    for assignment in overrides:
        apply_override(data, assignment)
    return parse_config(data)


def read_yaml_mapping(file: Path, what: str, expected: str) -> dict:
    """A YAML file that must hold a mapping: an empty file, a list or a tab-indented line is one clear error (an
    empty file would otherwise run on every default, and YAML's own tab message names neither line nor tab)."""
    text = file.read_text()
    name = f"{what} {str(file)!r}"
    tab = next((number for number, line in enumerate(text.splitlines(), 1)
                if "\t" in line[:len(line) - len(line.lstrip(" \t"))]), None)
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as error:
        if tab is not None:
            raise DiffkdError(f"{name}: line {tab} is indented with a tab; YAML needs spaces: replace the "
                              "tab with spaces") from None
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        raise DiffkdError(f"{name} is not valid YAML{where}: {str(error).splitlines()[0]}") from None
    if data is None:
        raise DiffkdError(f"{name} is empty: write {expected} into it (see configs/ for examples)")
    if not isinstance(data, dict):
        kind = "a list" if isinstance(data, list) else f"a single {type(data).__name__} value"
        raise DiffkdError(f"{name} holds {kind}, not a mapping: write {expected} at the top level "
                          "(see configs/ for examples)")
    return data


def dump_config(config: Config) -> str:
    """The fully resolved config as YAML (what --dry-run prints and what a run directory keeps)."""
    return yaml.safe_dump(_plain(config.to_dict()), sort_keys=False)


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value
