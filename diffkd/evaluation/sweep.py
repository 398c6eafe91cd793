"""The sweep: every (model, sampler, steps) setting from the same noise, measured against the real set and against
the teacher's many-step output, then written as results.json and a report.

Batches are the outer loop: batch b's noise is drawn once (seeded by (seed, b)) and goes through every setting, so
"same noise" holds exactly and only features, fidelity sums and a few grid images are kept per setting.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
import yaml

from diffkd.conditioning import read_prompts
from diffkd.errors import DiffkdError
from diffkd.eval_options import EvalConfig
from diffkd.evaluation import protocol
from diffkd.evaluation.clip import clip_score_metric, locate_clip
from diffkd.evaluation.features import load_feature_network, to_uint8
from diffkd.evaluation.frechet import frechet_distance, gaussian_stats, kernel_distance
from diffkd.evaluation.glyphs_classifier import GLYPHS_CLASSIFIER, load_glyphs_classifier, read_attributes
from diffkd.evaluation.plan import MetricPlan, plan_metrics
from diffkd.evaluation.prompt_accuracy import prompt_accuracy
from diffkd.evaluation.reference import check_reference, default_cache_dir, load_real_set
from diffkd.evaluation.report import setting_key, write_report
from diffkd.guidance_embedding import student_conditioning
from diffkd.io import LoadedPipeline, check_device, load_pipeline
from diffkd.losses.perceptual import LPIPSLoss
from diffkd.methods import METHODS, method_class
from diffkd.models import Conditioning
from diffkd.progress import Progress
from diffkd.sampling import check_scheduler_steps, sampler_settings, scheduler_sample, teacher_sample
from diffkd.weights import file_sha256

log = logging.getLogger(__name__)

OWN = "own"  # a student's (or any pipeline's) own scheduler


@dataclass
class EvalResults:
    """Everything measured, as plain values: ``rows`` has one dict per (model, sampler, steps) setting."""

    protocol: dict
    models: list[dict]
    rows: list[dict]
    noise_floor: dict | None
    elapsed_seconds: float
    output: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Model:
    name: str
    source: str
    pipe: LoadedPipeline
    card: dict
    student: bool

    @property
    def noise_shape(self) -> tuple[int, ...]:
        size = self.pipe.unet.config.sample_size
        size = tuple(size) if isinstance(size, (list, tuple)) else (size, size)
        return (self.pipe.unet.config.in_channels, *size)


@dataclass
class Setting:
    """One (model, sampler, steps, guidance scale) and what has been measured for it so far. ``guidance`` is None
    for pipelines without text; ``unet_rows`` counts the rows the UNet evaluated (a CFG step is two per image)."""

    model: Model
    sampler: str
    steps: int
    reference: bool = False
    guidance: float | None = None
    features: list = field(default_factory=list)
    psnr: list = field(default_factory=list)
    lpips: list = field(default_factory=list)
    seconds: float = 0.0
    peak_bytes: int = 0
    grid: torch.Tensor | None = None
    clip: object = None
    unet_rows: int = 0
    read: list = field(default_factory=list)

    @property
    def key(self) -> str:
        return setting_key(self.model.name, self.sampler, self.steps, self.guidance)


def read_card(source: str) -> dict:
    """The YAML front matter of a pipeline folder's README.md (a diffkd model card), or {}."""
    readme = Path(source).expanduser() / "README.md"
    if not readme.is_file():
        return {}
    parts = readme.read_text().split("---")
    try:
        front = yaml.safe_load(parts[1]) if len(parts) >= 3 else {}
    except yaml.YAMLError:
        return {}
    return front if isinstance(front, dict) else {}


def is_student(card: dict) -> bool:
    """A diffkd student's card names the method that made it; a pipeline that names none, or a method that trains
    without a teacher (``Method.needs_teacher``), is a teacher."""
    name = card.get("method")
    return name is not None and (name not in METHODS or method_class(name).needs_teacher)


def display_name(source: str) -> str:
    """A model's label in tables: its folder's name, or the run's name for a diffkd DIR/student folder."""
    path = Path(source.rstrip("/"))
    if path.name == "student" and path.parent.name:
        return path.parent.name
    return path.name or source


def load_models(config: EvalConfig, device: torch.device) -> tuple[list[Model], Model | None]:
    sources = list(dict.fromkeys(config.pipelines + ([config.teacher] if config.teacher else [])))
    if not sources:
        raise DiffkdError("eval.pipelines is empty: name at least one pipeline folder or hub id to evaluate")
    models, names = [], set()
    for source in sources:
        card = read_card(source)
        name = display_name(source)
        while name in names:
            name += "'"
        names.add(name)
        models.append(Model(name, source, load_pipeline(source, device=device), card, is_student(card)))
    if config.teacher:
        teacher = next(m for m in models if m.source == config.teacher)
    else:
        teacher = next((m for m in models if not m.student), None)
    return models, teacher


def guidance_distilled(model: Model) -> bool:
    """A student trained to give the guided output at one fixed scale in one pass (its card records the scale)."""
    return (model.student and not guidance_embedding_dim(model)
            and float(model.card.get("guidance_scale", 1.0)) > 1)


def guidance_embedding_dim(model: Model) -> int | None:
    """A guidance-embedded student's w-embedding size (None otherwise): it takes any scale as an input."""
    return getattr(model.pipe.unet, "config", {}).get("time_cond_proj_dim")


def guidance_scales(config: EvalConfig, model: Model) -> list[float | None]:
    """The guidance scales a model is swept over: none without text; the card's for a guidance-distilled student
    (it runs unguided, the scale is baked in); ``guidance_scales`` (or ``guidance_scale``) otherwise."""
    if not model.pipe.text_conditioned:
        return [None]
    if guidance_distilled(model):
        return [float(model.card["guidance_scale"])]
    return list(config.guidance_scales or [config.guidance_scale])


def make_settings(config: EvalConfig, models: list[Model], teacher: Model | None) -> list[Setting]:
    """Teachers: each sampler at each k and guidance scale. Students: their own scheduler at each k and at their
    card's k. The reference teacher's ``reference_steps`` run (at ``guidance_scale``) comes first: it is the
    fidelity target of the rest."""
    settings = []
    reference = None
    if teacher is not None:
        guidance = config.guidance_scale if teacher.pipe.text_conditioned else None
        reference = (config.reference_sampler, config.reference_steps, guidance)
        settings.append(Setting(teacher, config.reference_sampler, config.reference_steps, reference=True,
                                guidance=guidance))
    for model in models:
        scales = guidance_scales(config, model)
        if model.student:
            own = model.card.get("num_inference_steps")
            steps = sorted(set(config.steps) | ({int(own)} if isinstance(own, int) else set()))
            settings += [Setting(model, OWN, k, guidance=w) for k in steps for w in scales]
        else:
            settings += [Setting(model, s, k, guidance=w) for s in config.samplers for k in config.steps
                         for w in scales if not (model is teacher and (s, k, w) == reference)]
    return settings


def sample(setting: Setting, noise: torch.Tensor, cond: Conditioning | None) -> torch.Tensor:
    """Students run their exported scheduler, as ``DiffusionPipeline`` users will; teachers each sampler."""
    pipe = setting.model.pipe
    if setting.sampler == OWN:
        own = type(pipe.scheduler).from_config(pipe.scheduler.config)
        return scheduler_sample(pipe.denoiser, own, noise, setting.steps, cond)
    return teacher_sample(pipe, noise, setting.sampler, setting.steps, cond)


def batch_noise(shape: tuple[int, ...], seed: int, index: int, count: int, device: torch.device) -> torch.Tensor:
    """Noise of batch ``index``: a pure function of (seed, index, shape), identical for every setting."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + index)
    return torch.randn(count, *shape, generator=generator).to(device)


class Prompts:
    """Per-batch text conditioning of each text model, cycled over the prompt list."""

    def __init__(self, prompts: list[str], guidance_scale: float):
        self.prompts, self.guidance_scale = prompts, guidance_scale

    def batch(self, start: int, count: int) -> list[str]:
        return [self.prompts[(start + i) % len(self.prompts)] for i in range(count)]

    @torch.no_grad()
    def condition(self, model: Model, start: int, count: int) -> Conditioning | None:
        if not model.pipe.text_conditioned:
            return None
        device = model.pipe.unet.device
        embeds, negative = model.pipe.pipeline.encode_prompt(self.batch(start, count), device, 1, True, [""] * count)
        cond = Conditioning(encoder_hidden_states=embeds, uncond_encoder_hidden_states=negative,
                            guidance_scale=self.guidance_scale)
        return cond.unguided() if guidance_distilled(model) else cond


def with_guidance(cond: Conditioning | None, setting: Setting) -> Conditioning | None:
    """The batch's conditioning at the setting's guidance scale (a guidance-distilled student stays unguided; a
    guidance-embedded one makes one pass, told w as StableDiffusionPipeline tells it)."""
    if cond is None or setting.guidance is None or cond.uncond_encoder_hidden_states is None:
        return cond
    cond = replace(cond, guidance_scale=setting.guidance)
    embedding_dim = guidance_embedding_dim(setting.model)
    if embedding_dim:
        w = torch.full((cond.encoder_hidden_states.shape[0],), float(setting.guidance),
                       device=cond.encoder_hidden_states.device)
        return student_conditioning(cond, w, embedding_dim)
    return cond


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def run_setting(setting: Setting, noise: torch.Tensor, cond: Conditioning | None, device: torch.device
                ) -> torch.Tensor:
    """Sample and decode one batch; time it (and its peak GPU memory) into the setting."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    rows = [0]
    counter = setting.model.pipe.unet.register_forward_pre_hook(
        lambda _module, inputs: rows.__setitem__(0, rows[0] + inputs[0].shape[0]))
    _sync(device)
    start = time.perf_counter()
    try:
        latents = sample(setting, noise, cond)
        images = setting.model.pipe.denoiser.decode(latents)
        _sync(device)
    finally:
        counter.remove()
    setting.seconds += time.perf_counter() - start
    setting.unet_rows += rows[0]
    if device.type == "cuda":
        setting.peak_bytes = max(setting.peak_bytes, torch.cuda.max_memory_allocated(device))
    return images


def psnr(images: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR (dB) of uint8 images against uint8 targets, on [0, 1]; identical images give inf."""
    mse = ((images.double() - target.double()) / 255).square().flatten(1).mean(1)
    return -10 * torch.log10(mse)


def evaluate(config: EvalConfig) -> EvalResults:
    """Run the sweep that ``config`` describes; write the report when ``config.output`` is set."""
    started = time.perf_counter()
    check_device(config.device, "eval.device (--device)")
    device = torch.device(config.device)
    torch.manual_seed(config.seed)
    models, teacher = load_models(config, device)
    if config.text_options() and not any(m.pipe.text_conditioned for m in models):
        raise DiffkdError(f"{config.text_options()[0]} is for text-conditioned pipelines, and none of those evaluated "
                          "has a text encoder: drop it")
    for model in models:
        if model.student:
            check_scheduler_steps(model.pipe.pipeline.scheduler, config.steps, f"eval.steps (--steps) of {model.name}")
    first = teacher or models[0]
    size, channels = first.pipe.image_size, first.pipe.image_channels
    prompts = _prompts(config, models)
    plan = plan_metrics(config, teacher is not None, any(m.pipe.text_conditioned for m in models), prompts is not None,
                        prompts.prompts if prompts else None)
    check_reference(config.reference, plan.feature, size, channels)
    feature = load_feature_network(plan.feature, device, config.feature_weights)
    cache_dir = Path(config.cache_dir).expanduser() if config.cache_dir else default_cache_dir()
    real = load_real_set(config.reference, feature, size, channels, cache_dir)
    lpips_model, lpips_note = _lpips(config, plan, device)
    clip_note = plan.clip_off
    if plan.clip:
        clip_note = f"on: {locate_clip(plan.clip_model)}"
    settings = make_settings(config, models, teacher)
    if plan.clip:
        for setting in settings:
            if setting.model.pipe.text_conditioned:
                setting.clip = clip_score_metric(plan.clip_model).to(device)
    reader, accuracy_note = _attribute_reader(plan, device)

    _warm_up(settings, config.seed, device, prompts)
    log.info("%d settings x %d samples (%d models; feature %s)", len(settings), config.num_samples, len(models),
             feature.label)
    shown = Progress(len(settings) * math.ceil(config.num_samples / config.batch_size), "evaluation")
    for index, start in enumerate(range(0, config.num_samples, config.batch_size)):
        count = min(config.batch_size, config.num_samples - start)
        conds = {m.name: prompts.condition(m, start, count) if prompts else None for m in models}
        target = None
        for setting in settings:
            model = setting.model
            images = to_uint8(run_setting(setting, batch_noise(model.noise_shape, config.seed, index, count, device),
                                          with_guidance(conds[model.name], setting), device))
            setting.features.append(feature(images))
            if reader is not None and model.pipe.text_conditioned:
                setting.read.append(read_attributes(reader, images))
            if setting.reference:
                target = images
            elif config.fidelity and target is not None and images.shape == target.shape:
                setting.psnr.append(psnr(images, target).cpu())
                if lpips_model is not None:
                    setting.lpips.append(lpips_model(images.float() / 127.5 - 1, target.float() / 127.5 - 1).cpu())
            if setting.clip is not None:
                setting.clip.update(_rgb(images), prompts.batch(start, count))
            if index == 0:
                setting.grid = images[:config.grid_size].cpu()
            shown.update(1, f"batch {index + 1}, {setting.key}")
    shown.close()

    rows = [_row(s, real, config, teacher, settings, prompts) for s in settings]
    results = EvalResults(
        protocol=_protocol(config, device, feature, real, models, teacher, lpips_note, clip_note, accuracy_note, size,
                           channels, prompts),
        models=[_model_info(m, teacher) for m in models], rows=rows, noise_floor=_noise_floor(real, config),
        elapsed_seconds=round(time.perf_counter() - started, 2))
    if config.output:
        results.output = str(Path(config.output))
        write_report(results, {s.key: s.grid for s in settings}, Path(config.output))
    return results


def _warm_up(settings: list[Setting], seed: int, device: torch.device, prompts: Prompts | None) -> None:
    """One tiny pass per model so that lazy initialisation does not land in the first setting's time."""
    seen = set()
    for setting in settings:
        if setting.model.name in seen:
            continue
        seen.add(setting.model.name)
        cond = prompts.condition(setting.model, 0, 2) if prompts else None
        with torch.no_grad():
            probe = Setting(setting.model, setting.sampler, 1)
            run_setting(probe, batch_noise(setting.model.noise_shape, seed, 0, 2, device), cond, device)


def _rgb(images: torch.Tensor) -> torch.Tensor:
    return images.repeat(1, 3, 1, 1) if images.shape[1] == 1 else images


def _attribute_reader(plan: MetricPlan, device: torch.device):
    """The glyphs classifier that reads each image's attributes for prompt accuracy, or None, and a note."""
    if not plan.prompt_accuracy:
        return None, plan.prompt_accuracy_off
    classifier, details = load_glyphs_classifier(device)
    return classifier, (f"on: glyphs classifier sha256 {file_sha256(str(GLYPHS_CLASSIFIER))}, held-out accuracy "
                        f"{details['heldout_accuracy']}")


def _lpips(config: EvalConfig, plan: MetricPlan, device: torch.device):
    """The LPIPS model for fidelity, or None and the reason."""
    if plan.lpips is False:
        return None, plan.lpips_off
    try:
        model = LPIPSLoss(config.lpips_net, config.lpips_backbone_weights).to(device)
    except DiffkdError as error:
        if plan.lpips:
            raise
        log.warning("LPIPS skipped: %s", error)
        return None, f"off: {error}"
    return model, f"on: {config.lpips_net}, backbone sha256 {file_sha256(model.weights_path)}"


def _prompts(config: EvalConfig, models: list[Model]) -> Prompts | None:
    if not any(m.pipe.text_conditioned for m in models):
        return None
    prompts = read_prompts(config.prompts, config.prompts_file, "eval.prompts_file")
    if not prompts:
        raise DiffkdError("a text-conditioned pipeline is evaluated but no prompts were given: set eval.prompts "
                          "(--prompt) or eval.prompts_file")
    return Prompts(prompts, config.guidance_scale)


def _mean(values: list[torch.Tensor]) -> float | None:
    if not values:
        return None
    value = float(torch.cat(values).double().mean())
    return value if math.isfinite(value) else None


def _prompt_accuracy(setting: Setting, prompts: Prompts | None, num: int) -> dict | None:
    if not setting.read:
        return None
    read = {name: torch.cat([r[name] for r in setting.read]) for name in setting.read[0]}
    return prompt_accuracy(read, prompts.batch(0, num))


def _row(setting: Setting, real, config: EvalConfig, teacher: Model | None, settings: list[Setting],
         prompts: Prompts | None) -> dict:
    features = torch.cat(setting.features)
    fd = kid = kid_std = None
    if not torch.isfinite(features).all():  # a diverged sampler: say so in the table rather than crash
        log.warning("%s produced non-finite features; its FD/KID are left empty", setting.key)
    else:
        fd = real.frechet_distance(features)
        if real.features is not None:
            kid, kid_std = kernel_distance(real.features, features, config.kid_subsets, config.kid_subset_size,
                                           config.seed)
    num = features.shape[0]
    reference = next((s for s in settings if s.reference), None)
    ms = 1000 * setting.seconds / num
    return {
        "model": setting.model.name, "role": "student" if setting.model.student else "teacher",
        "sampler": setting.sampler, "steps": setting.steps, "guidance_scale": setting.guidance,
        "is_reference": setting.reference, "unet_passes": setting.unet_rows / num,
        "fd": fd, "kid": kid, "kid_std": kid_std,
        "psnr": _mean(setting.psnr), "lpips": _mean(setting.lpips),
        "clip_score": float(setting.clip.compute()) if setting.clip is not None else None,
        "prompt_accuracy": _prompt_accuracy(setting, prompts, num),
        "ms_per_image": ms, "images_per_second": 1000 / ms if ms > 0 else None,
        "speedup": (1000 * reference.seconds / num) / ms if reference is not None and ms > 0 else None,
        "peak_memory_mb": setting.peak_bytes / 2**20 if setting.peak_bytes else None,
        "parameters": sum(p.numel() for p in setting.model.pipe.unet.parameters()),
        "num_samples": num, "grid": f"grids/{_slug(setting.key)}.png",
    }


def _slug(key: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in key)


def _noise_floor(real, config: EvalConfig) -> dict | None:
    """Real vs real: FD (and KID) between two disjoint seeded halves of the real set."""
    if real.features is None or real.features.shape[0] < 4:
        return None
    order = torch.randperm(real.features.shape[0], generator=torch.Generator().manual_seed(config.seed))
    half = real.features.shape[0] // 2
    a, b = real.features[order[:half]], real.features[order[half:]]
    kid, kid_std = kernel_distance(a, b, config.kid_subsets, config.kid_subset_size, config.seed)
    return {"fd": frechet_distance(*gaussian_stats(a), *gaussian_stats(b)), "kid": kid, "kid_std": kid_std,
            "split": [len(a), len(b)]}


def _model_info(model: Model, teacher: Model | None) -> dict:
    pipe = model.pipe
    return {"name": model.name, "source": model.source, "role": "student" if model.student else "teacher",
            "is_reference_teacher": model is teacher, "pipeline": type(pipe.pipeline).__name__,
            "parameters": sum(p.numel() for p in pipe.unet.parameters()), "image_size": pipe.image_size,
            "image_channels": pipe.image_channels, "latent": pipe.latent, "text_conditioned": pipe.text_conditioned,
            "scheduler": type(pipe.scheduler).__name__, "prediction_type": pipe.denoiser.prediction_type,
            "card_steps": model.card.get("num_inference_steps"), "method": model.card.get("method")}


def _protocol(config: EvalConfig, device: torch.device, feature, real, models: list[Model], teacher: Model | None,
              lpips_note: str, clip_note: str, accuracy_note: str, size: int, channels: int,
              prompts: Prompts | None) -> dict:
    samplers = {}
    for model in models:
        pipe = model.pipe
        if model.student:
            samplers[model.name] = {OWN: {"class": type(pipe.scheduler).__name__,
                                          "timestep_spacing": pipe.scheduler.config.get("timestep_spacing"),
                                          "clip_sample": pipe.scheduler.config.get("clip_sample")}}
        else:
            names = set(config.samplers) | ({config.reference_sampler} if model is teacher else set())
            samplers[model.name] = {s: sampler_settings(s, pipe.scheduler, pipe.latent)
                                    for s in sorted(names)}
    return {
        "date": protocol.timestamp(), "libraries": protocol.library_versions(), "machine": protocol.machine(device),
        "feature_network": {"name": feature.name, "label": feature.label, "weights_sha256": feature.weights_sha256,
                            "resize": feature.resize, **feature.details},
        "image_to_features": "images clamped to [-1, 1], scaled to [0, 255] and rounded to uint8",
        "reference_set": {"source": config.reference, "num_images": real.num_images, "image_size": size,
                          "image_channels": channels, "statistics": real.cache_file},
        "num_samples": config.num_samples, "batch_size": config.batch_size, "steps": config.steps,
        "teacher": teacher.name if teacher else None,
        "teacher_reference": {"sampler": config.reference_sampler, "steps": config.reference_steps} if teacher else None,
        "samplers": samplers,
        "seeds": {"noise": config.seed, "noise_rule": "batch b uses torch.Generator().manual_seed(seed * 1000003 + b) "
                  "on the CPU; the same noise goes through every setting", "kid_subsets": config.seed},
        "kid": {"subsets": config.kid_subsets, "subset_size": config.kid_subset_size, "kernel": "cubic polynomial"},
        "fidelity": ("PSNR (dB, per image on [0, 1] after uint8 rounding, averaged) and LPIPS to the teacher's "
                     f"{config.reference_sampler}-{config.reference_steps} output from the same noise")
        if config.fidelity and teacher else "off",
        "lpips": lpips_note, "clip_score": clip_note, "prompt_accuracy": accuracy_note,
        "guidance_scale": config.guidance_scale if any(m.pipe.text_conditioned for m in models) else None,
        "grid_prompts": prompts.batch(0, config.grid_size) if prompts else None,
        "guidance_scales": (config.guidance_scales or [config.guidance_scale])
        if any(m.pipe.text_conditioned for m in models) else None,
        "unet_passes": "UNet rows evaluated per image while sampling (a classifier-free-guided step is two)",
        "timing": "sampling + decoding wall time over all batches of batch_size, after one warm-up pass per model",
        "peak_memory": "torch.cuda.max_memory_allocated per setting" if device.type == "cuda" else
        f"per setting on CUDA only; this process's peak RSS was {protocol.peak_rss_mb():.0f} MB",
    }
