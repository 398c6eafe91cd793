"""Load teacher pipelines and save students as diffusers pipelines, leaning on diffusers' own config machinery.

A saved student is a plain diffusers folder: the teacher's pipeline class, the student UNet in safetensors and the
method's scheduler (DDIM with trailing spacing; LCMScheduler for a consistency student), so ``DiffusionPipeline.from_pretrained(folder)(num_inference_steps=k)``
samples exactly the grid the student was distilled on, with no diffkd import.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import logging
import pickle
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import diffusers
import torch
import yaml
from diffusers import DDIMPipeline, DDIMScheduler, DDPMPipeline, DiffusionPipeline
from diffusers.utils import logging as diffusers_logging
from safetensors import SafetensorError

from diffkd.errors import DiffkdError
from diffkd.layouts import Layout, layout_of
from diffkd.models import Denoiser
from diffkd.paths import FlowPath, NoisePath, VPPath, flow_shift, is_flow_scheduler

log = logging.getLogger(__name__)


@dataclass
class LoadedPipeline:
    """A diffusers pipeline and the Denoiser view of its network + scheduler.

    ``unet`` is the network whatever its kind: the pipeline component the layout names (``layout.component``, the
    UNet or a transformer), which a student replaces. ``latent_side``: the side of the latents it is distilled at
    (None: the pipeline's default).
    """

    source: str
    pipeline: DiffusionPipeline
    denoiser: Denoiser
    latent_side: int | None = None

    @property
    def latent_size(self) -> int:
        return self.latent_side or self.layout.latent_size(self.pipeline)

    @property
    def layout(self) -> Layout:
        return self.denoiser.layout

    @property
    def unet(self) -> torch.nn.Module:
        return self.layout.network(self.pipeline)

    @property
    def component(self) -> str:
        return self.layout.component

    @property
    def scheduler(self):
        return self.pipeline.scheduler

    @property
    def latent(self) -> bool:
        return self.denoiser.vae is not None

    @property
    def image_size(self) -> int:
        """Side of the images the pipeline makes (pixels, after the VAE for latent pipelines)."""
        return self.latent_size * self.layout.vae_scale(self.pipeline)

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of the latents the Denoiser works on (unpacked, for a layout that packs them)."""
        return self.layout.latent_channels(self.pipeline), self.latent_size, self.latent_size

    @property
    def image_channels(self) -> int:
        return self.denoiser.vae.config.in_channels if self.latent else self.unet.config.in_channels

    @property
    def text_conditioned(self) -> bool:
        return getattr(self.pipeline, "text_encoder", None) is not None


def is_local_reference(source: str) -> bool:
    """Paths start with '.', '/' or '~' or exist; anything else of the form 'org/name' is a hub id."""
    return source.startswith((".", "/", "~")) or Path(source).exists() or source.count("/") != 1


def load_pipeline(source: str, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
                  trust_remote_code: bool = False, image_size: int | None = None) -> LoadedPipeline:
    """Load a diffusers pipeline from a local folder or a hub id and check that diffkd can distil it, at
    ``image_size`` pixels (None: the pipeline's default size)."""
    kwargs = {"trust_remote_code": trust_remote_code}
    if dtype is not None:
        kwargs["torch_dtype"] = dtype
    if is_local_reference(source):
        folder = Path(source).expanduser()
        if not folder.exists():
            raise DiffkdError(f"teacher path {source!r} does not exist: point teacher.source at a diffusers "
                              "pipeline folder (one with model_index.json) or a hub id like 'google/ddpm-cifar10-32'")
        if not (folder / "model_index.json").is_file():
            raise DiffkdError(f"{source!r} is not a diffusers pipeline folder (no model_index.json): point at the "
                              "folder that DiffusionPipeline.save_pretrained wrote")
        _check_model_index(folder / "model_index.json", source)
    pipeline = _from_pretrained(source, kwargs)
    pipeline.set_progress_bar_config(disable=True)
    layout = layout_of(pipeline, source)
    latent_size = layout.latent_size(pipeline, image_size)
    return LoadedPipeline(source, pipeline.to(device), denoiser_of(pipeline, source, latent_size), latent_size)


def _from_pretrained(source: str, kwargs: dict) -> DiffusionPipeline:
    """DiffusionPipeline.from_pretrained with every way it can fail on a bad folder as one DiffkdError.

    Weights load through safetensors, or through diffusers' ``torch.load(weights_only=True)`` for ``.bin`` files,
    which refuses a pickle that would run code; custom pipeline code needs ``teacher.trust_remote_code``. The
    libraries' warnings are held back while loading and shown only if it succeeds, so a failure is one line.
    """
    local = is_local_reference(source)
    if local:
        kwargs = {**_absent_components(Path(source).expanduser()), **kwargs}
    with _held_library_output() as held:
        try:
            pipeline = DiffusionPipeline.from_pretrained(source, **kwargs)
        except (OSError, ValueError, RuntimeError, SafetensorError, pickle.UnpicklingError) as error:
            held.clear()
            raise _load_error(source, local, kwargs, error) from None
    return pipeline


def _absent_components(folder: Path) -> dict[str, None]:
    """Components a pipeline was saved without (SD3 without its T5: ``text_encoder_3=None``), which
    model_index.json records as [null, null] and ``from_pretrained`` then demands all the same: passed as None, as a
    user loading that folder passes them."""
    try:
        index = json.loads((folder / "model_index.json").read_text())
    except (OSError, ValueError):
        return {}
    pipeline_class = getattr(diffusers, str(index.get("_class_name")), None) if isinstance(index, dict) else None
    if pipeline_class is None or not hasattr(pipeline_class, "_get_signature_keys"):
        return {}
    expected, _ = pipeline_class._get_signature_keys(pipeline_class)
    absent = {name for name, entry in index.items() if entry == [None, None]}
    return {name: None for name in sorted(set(expected) & absent - set(pipeline_class._optional_components))}


def _check_model_index(path: Path, source: str) -> None:
    """A broken model_index.json is a JSON problem, not a weights problem: say which, where, and how to mend it."""
    try:
        index = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        where = f" (line {error.lineno}, column {error.colno})" if isinstance(error, json.JSONDecodeError) else ""
        raise DiffkdError(f"{source!r}: model_index.json is not valid JSON{where}: repair it, or save the pipeline "
                          "again with DiffusionPipeline.save_pretrained") from None
    if not isinstance(index, dict) or "_class_name" not in index:
        raise DiffkdError(f"{source!r}: model_index.json has no '_class_name' (the pipeline class): repair it, or "
                          "save the pipeline again with DiffusionPipeline.save_pretrained")


def _load_error(source: str, local: bool, kwargs: dict, error: Exception) -> DiffkdError:
    chain, cause = [], error
    while cause is not None and len(chain) < 10:
        chain.append(cause)
        cause = cause.__cause__ or cause.__context__
    if any(isinstance(e, pickle.UnpicklingError) for e in chain):
        return DiffkdError(f"refusing a weight file of {source!r}: it is a pickle that torch.load(weights_only=True) "
                           "rejects (it could run code); convert the weights to safetensors where they came from")
    if local and _custom_code(Path(source).expanduser()) and not kwargs.get("trust_remote_code"):
        return DiffkdError(f"{source!r} needs its own pipeline code (pipeline.py): read it, then set "
                           "teacher.trust_remote_code=true if you trust it")
    if local:
        return DiffkdError(f"could not load pipeline {source!r}: a weight or config file is corrupt, truncated or "
                           f"not safetensors ({_first_line(error)}); re-save it with "
                           "save_pretrained(safe_serialization=True)")
    return DiffkdError(f"could not load pipeline {source!r} from the Hugging Face hub ({_own_words(error)}); "
                       "without network, download it where there is one (`hf download ID --local-dir DIR`) and "
                       "pass DIR")


class _Held(logging.Handler):
    def __init__(self):
        super().__init__()
        self.records: list[logging.LogRecord] = []
        self.warnings: list[warnings.WarningMessage] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def clear(self) -> None:
        self.records.clear()
        self.warnings.clear()


@contextlib.contextmanager
def _held_library_output():
    """Hold diffusers/transformers log records, Python warnings and the loading progress bars (a text encoder's
    comes from transformers); replay on success."""
    from transformers.utils import logging as transformers_logging

    held = _Held()
    loggers = [logging.getLogger(name) for name in ("diffusers", "transformers")]
    saved = [(logger, logger.handlers[:], logger.propagate) for logger in loggers]
    bar = diffusers_logging.is_progress_bar_enabled()
    text_bar = transformers_logging.is_progress_bar_enabled()
    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()
    for logger in loggers:
        logger.handlers, logger.propagate = [held], False
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("default")
            yield held
        held.warnings.extend(caught)
    finally:
        for logger, handlers, propagate in saved:
            logger.handlers, logger.propagate = handlers, propagate
        if bar:
            diffusers_logging.enable_progress_bar()
        if text_bar:
            transformers_logging.enable_progress_bar()
    for record in held.records:
        logging.getLogger(record.name).handle(record)
    for warning in held.warnings:
        warnings.warn_explicit(warning.message, warning.category, warning.filename, warning.lineno)


def _first_line(error: Exception) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _own_words(error: Exception) -> str:
    """The library's message without its pointers to a stack trace the user is not shown."""
    sentences = re.split(r"(?<=[.!?])\s+", " ".join(_first_line(error).split()))
    kept = [s for s in sentences if not re.search(r"stack ?trace|traceback", s, re.IGNORECASE)]
    return " ".join(kept).rstrip(".") or type(error).__name__


def _custom_code(folder: Path) -> bool:
    try:
        name = json.loads((folder / "model_index.json").read_text()).get("_class_name")
    except (OSError, ValueError):
        return False
    return isinstance(name, list) or (folder / "pipeline.py").exists()


def denoiser_of(pipeline: DiffusionPipeline, source: str = "pipeline", latent_size: int | None = None) -> Denoiser:
    """The Denoiser view of a pipeline through its layout, at latents of side ``latent_size`` (default: the
    pipeline's); refuses pipelines of no family diffkd knows and schedulers with no Gaussian noise path it knows."""
    layout = layout_of(pipeline, source)
    unet = layout.network(pipeline)
    scheduler = getattr(pipeline, "scheduler", None)
    side = latent_size or layout.latent_size(pipeline)
    path = noise_path_of(scheduler, source, image_seq_len=max(1, (side // 2) ** 2))  # packed 2x2, as Flux packs
    prediction_type = "flow" if isinstance(path, FlowPath) else scheduler.config.get("prediction_type", "epsilon")
    vae = layout.autoencoder(pipeline)
    clip = None
    if vae is None and scheduler.config.get("clip_sample", False):
        clip = float(scheduler.config.get("clip_sample_range", 1.0))
    return Denoiser(unet, path, prediction_type, clip_sample=clip, vae=vae, layout=layout)


def noise_path_of(scheduler, source: str = "pipeline", image_seq_len: int | None = None) -> NoisePath:
    """The noise path of a scheduler: rectified flow for the FlowMatch schedulers, variance preserving for a
    discrete ``alphas_cumprod`` (DDPM, DDIM, PNDM, DPM-Solver, UniPC, Euler); anything else is refused."""
    name = type(scheduler).__name__ if scheduler is not None else "none"
    if is_flow_scheduler(scheduler):
        config = dict(scheduler.config)  # its sigma-grid options (karras, shift_terminal, ...) change sampling only
        if config.get("invert_sigmas"):
            raise DiffkdError(f"{source!r} has a {name} with invert_sigmas (Mochi's z = sigma x + (1 - sigma) eps): "
                              "diffkd takes rectified flow z = (1 - sigma) x + sigma eps; unset invert_sigmas")
        return FlowPath(config["num_train_timesteps"], flow_shift(config, image_seq_len))
    alphas = getattr(scheduler, "alphas_cumprod", None)
    if alphas is None:
        raise DiffkdError(f"{source!r} has scheduler {name}, which has no Gaussian path diffkd takes; use a teacher "
                          "whose scheduler is DDPM, DDIM, PNDM, DPMSolver, UniPC or Euler (a VP schedule of "
                          "alphas_cumprod) or FlowMatchEulerDiscrete (rectified flow)")
    return VPPath(alphas.clone())


def save_pipeline(folder: Path, teacher: LoadedPipeline, unet: torch.nn.Module, scheduler,
                  card: dict | None = None, component: str = "unet") -> Path:
    """Write ``unet`` (as pipeline component ``component``) + ``scheduler`` in the teacher's pipeline class with a
    model card. An unconditional student is a DDIMPipeline when its scheduler is DDIM (deterministic, eta = 0), else
    a DDPMPipeline: DDIMPipeline turns any scheduler into DDIM, while DDPMPipeline's loop calls the scheduler's own
    step (LCMScheduler's, say)."""
    pipeline_class = type(teacher.pipeline)
    if pipeline_class in (DDPMPipeline, DDIMPipeline):
        pipeline_class = DDIMPipeline if isinstance(scheduler, DDIMScheduler) else DDPMPipeline
    components = {**teacher.pipeline.components, component: unet, "scheduler": scheduler}
    names = _init_names(pipeline_class)
    settings = {k: v for k, v in teacher.pipeline.config.items()  # e.g. requires_safety_checker=False
                if k in names and k not in components and not k.startswith("_")}
    pipeline = pipeline_class(**{k: v for k, v in components.items() if k in names}, **settings)
    folder.mkdir(parents=True, exist_ok=True)
    pipeline.save_pretrained(folder, safe_serialization=True)
    if card is not None:
        write_model_card(folder / "README.md", card)
    return folder


def _init_names(pipeline_class) -> set[str]:
    return set(inspect.signature(pipeline_class.__init__).parameters) - {"self"}


def write_model_card(path: Path, card: dict, usage: list[str] | None = None) -> None:
    """A Hub-style model card: YAML front matter with the facts, then a short human summary with the code that
    samples it (``usage``; by default loading the folder as a pipeline)."""
    front = {"library_name": "diffusers", "tags": ["diffusers", "diffkd", "distillation"], **card}
    usage = usage or ["from diffusers import DiffusionPipeline",
                      f"pipe = DiffusionPipeline.from_pretrained({str(path.parent)!r})",
                      f"images = pipe(num_inference_steps={card.get('num_inference_steps', '?')}).images"]
    lines = ["---", yaml.safe_dump(front, sort_keys=False).strip(), "---", "",
             f"# {card.get('method', 'distilled')} student of `{card.get('teacher', '?')}`", "",
             "Made with diffkd. Sample it with plain diffusers:", "", "```python", *usage, "```", ""]
    schedulers = card.get("schedulers")
    if isinstance(schedulers, dict):
        also = ", ".join(f"`{name}`" for name in schedulers.get("also_works", []))
        lines += [f"Sample it with its own `{schedulers['exported']}`" + (f" or, built with `from_config` of it, {also}"
                                                                          if also else "")
                  + "; other schedulers are not supported and may give noise.", ""]
    if "details" in card:
        lines += ["## Details", "", "```json", json.dumps(card["details"], indent=2), "```", ""]
    path.write_text("\n".join(lines))


def add_card_section(path: Path, title: str, lines: list[str]) -> None:
    """Append a Markdown section to a model card's body (the evaluation's verdict, written after the export)."""
    path.write_text(path.read_text().rstrip("\n") + "\n\n" + "\n".join([f"## {title}", "", *lines]) + "\n")


def check_device(device: str, option: str) -> None:
    """Refuse a device this machine does not have before anything loads onto it (torch's own error comes after the
    teacher has loaded, as a traceback)."""
    kind, _, index = str(device).partition(":")
    if kind == "cuda":
        if not torch.cuda.is_available():
            raise DiffkdError(f"{option}={device!r} but CUDA is not available on this machine: use cpu")
        if index and (not index.isdigit() or int(index) >= torch.cuda.device_count()):
            raise DiffkdError(f"{option}={device!r} is not available: this machine has {torch.cuda.device_count()} "
                              f"CUDA device(s), cuda:0 to cuda:{torch.cuda.device_count() - 1}")
    elif kind == "mps":
        if not torch.backends.mps.is_available():
            raise DiffkdError(f"{option}={device!r} but MPS is not available on this machine: use cpu")
    elif kind not in ("cpu", "auto"):
        raise DiffkdError(f"{option}={device!r} is not a device: use cpu, cuda, cuda:N or mps")
