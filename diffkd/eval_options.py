"""What an evaluation measures, as one plain dataclass: the ``eval:`` section of a distill config, the options of
``diffkd eval``, and the argument of ``diffkd.evaluation.evaluate``.

Every field has a default and is checked in ``__post_init__`` so that a bad value costs one line before any
sampling starts. It lives below ``diffkd.config`` and imports no torch, so a config is checked in a fraction of a
second.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from diffkd.errors import DiffkdError
from diffkd.validation import SAMPLERS, check

FEATURES = ("auto", "digits-classifier", "glyphs-classifier", "random-conv", "inception")
LPIPS_NETS = ("alex", "vgg", "squeeze")


def unknown_feature(name: str) -> DiffkdError:
    """The one-line error for an eval.feature that names no network the evaluation has."""
    if name == "latent-random-conv":
        return DiffkdError("latent-random-conv scores latents, which only in-run validation reads "
                           "(train.validate_feature): the evaluation scores decoded images, so use random-conv")
    return DiffkdError(f"eval.feature {name!r} is neither {', '.join(FEATURES[1:-1])}, {FEATURES[-1]} nor a "
                       "TorchScript file")


@dataclass
class EvalConfig:
    """Sample-quality-vs-steps sweep of pipelines against a real image set and a teacher.

    pipelines: diffusers folders or hub ids. Students written by diffkd (their model card names a distillation
        method) are sampled with their own scheduler; every other pipeline is a teacher and is also swept with
        ``samplers``.
    teacher: the reference model for fidelity (PSNR/LPIPS to its ``reference_steps`` output from the same noise)
        and for speed-up; "" = the first pipeline that is not a student. It is added to ``pipelines`` if missing.
    steps: step counts k of the sweep. Students are also evaluated at the k of their model card.
    samplers: training-free samplers for teachers (see SAMPLERS), each with the settings its users use.
    reference_steps / reference_sampler: the teacher's many-step reference (a quality row and the fidelity target).
    reference: real images: "digits" (the embedded set), "glyphs" (glyphs-32 as diffkd renders it), a folder of
        images, or a ``.safetensors`` statistics file written by a previous evaluation (mu/sigma; KID and the noise
        floor need features and are then skipped).
    num_samples / batch_size: generated images per setting, and the batch that sampling (and timing) uses.
    feature: feature network for FD/KID: "digits-classifier" / "glyphs-classifier" (the shipped small
        classifiers), "inception" (torchmetrics' FID Inception, 2048-d), a path to a TorchScript module mapping uint8
        NxCxHxW to NxD, or "auto" (the shipped classifier for the digits or glyphs reference, a statistics file's own
        network, Inception otherwise).
    feature_weights: Inception weights file (``feature_extractor_weights_path``); None = the torch hub cache.
    kid_subsets / kid_subset_size: KID's subset estimator (Binkowski et al. 2018); the size is capped at the set sizes.
    fidelity: measure PSNR (and LPIPS) to the teacher's reference output.
    lpips: LPIPS in the fidelity metrics: True, False, or None = when the backbone weights are on disk.
    lpips_net / lpips_backbone_weights: the LPIPS backbone and an explicit weights file for it.
    prompts / prompts_file: prompts for text-conditioned pipelines, cycled over the samples.
    guidance_scale: classifier-free guidance of text teachers (students with guidance distilled in run unguided);
        the reference run uses it.
    guidance_scales: the guidance scales the text teachers are swept over ([] = just ``guidance_scale``).
    clip_score: CLIPScore for text pipelines: True, False, or None = when there are prompts and a text pipeline.
    clip_model: CLIP model id or local folder for CLIPScore; "glyphs-clip" is the small CLIP diffkd ships for
        glyphs-32; "auto" = glyphs-clip for the glyphs reference, ViT-L/14 (torchmetrics' default) otherwise.
    prompt_accuracy: the fraction of images whose character and colours (read by the glyphs classifier) match
        their prompt's: True, False, or None = when a text pipeline is evaluated and every prompt names them.
    grid_size: images per (model, sampler, steps) row of the sample grid, all from the same noise.
    seed: seed of the noise (one generator per batch index, shared by every setting) and of KID's subsets.
    device: "cpu", "cuda", "cuda:N" or "mps".
    output: folder for results.json, report.md/html, plots and grids ("" = return results, write nothing).
    cache_dir: where real-set statistics are cached ("" = ~/.cache/diffkd).
    """

    pipelines: list[str] = field(default_factory=list)
    teacher: str = ""
    steps: list[int] = field(default_factory=lambda: [1, 2, 4, 8])
    samplers: list[str] = field(default_factory=lambda: list(SAMPLERS))
    reference_steps: int = 64
    reference_sampler: str = "ddim"
    reference: str = "digits"
    num_samples: int = 1000
    batch_size: int = 250
    feature: str = "auto"
    feature_weights: str | None = None
    kid_subsets: int = 50
    kid_subset_size: int = 1000
    fidelity: bool = True
    lpips: bool | None = None
    lpips_net: str = "alex"
    lpips_backbone_weights: str | None = None
    prompts: list[str] = field(default_factory=list)
    prompts_file: str | None = None
    guidance_scale: float = 7.5
    guidance_scales: list[float] = field(default_factory=list)
    clip_score: bool | None = None
    clip_model: str = "auto"
    prompt_accuracy: bool | None = None
    grid_size: int = 8
    seed: int = 0
    device: str = "cpu"
    output: str = ""
    cache_dir: str = ""

    def __post_init__(self):
        self.steps = sorted({int(k) for k in self.steps})
        check(bool(self.steps) and self.steps[0] >= 1, f"eval.steps must be integers >= 1; got {self.steps}")
        for name in self.samplers:
            check(name in SAMPLERS, f"eval.samplers: {name!r} is not one of {', '.join(SAMPLERS)}")
        check(self.reference_sampler in SAMPLERS,
               f"eval.reference_sampler must be one of {', '.join(SAMPLERS)}; got {self.reference_sampler!r}")
        for name in ("reference_steps", "batch_size", "kid_subsets", "kid_subset_size", "grid_size"):
            check(getattr(self, name) >= 1, f"eval.{name} must be >= 1; got {getattr(self, name)}")
        check(self.num_samples >= 2, f"eval.num_samples must be >= 2 (a covariance needs two); got {self.num_samples}")
        check(self.lpips_net in LPIPS_NETS,
               f"eval.lpips_net must be one of {', '.join(LPIPS_NETS)}; got {self.lpips_net!r}")
        check(bool(self.feature), f"eval.feature must be one of {', '.join(FEATURES)} or a path to a TorchScript file")
        check(bool(self.reference), "eval.reference must be 'digits', an image folder or a statistics .safetensors")
        check(self.guidance_scale >= 1, f"eval.guidance_scale must be >= 1 (1 = no guidance); got {self.guidance_scale}")
        self.guidance_scales = sorted({float(w) for w in self.guidance_scales})
        check(all(w >= 1 for w in self.guidance_scales),
              f"eval.guidance_scales must all be >= 1 (1 = no guidance); got {self.guidance_scales}")
        check(self.device in ("cpu", "cuda", "mps") or self.device.startswith("cuda:"),
               f"eval.device must be cpu, cuda, cuda:N or mps; got {self.device!r}")

    def text_options(self) -> list[str]:
        """The options set here that only a text-conditioned pipeline uses (prompts, guidance scales to sweep), by
        the names a user gives them: an evaluation without such a pipeline refuses them rather than ignore them."""
        given = (("eval.prompts (--prompt)", self.prompts), ("eval.prompts_file (--prompts-file)", self.prompts_file),
                 ("eval.guidance_scales (--guidance-scales)", self.guidance_scales))
        return [name for name, value in given if value]

