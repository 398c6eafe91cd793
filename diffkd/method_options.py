"""Each method's ``method:`` section as a dataclass, and the registry that maps ``method.name`` to it.

These live below ``diffkd.config`` and import no torch: the config is parsed and checked (a typo in the method
section included) without loading a method, and a method's module is imported only when a run needs it. Adding a
method is its options dataclass here, one registry line in ``METHODS``, and its file in ``diffkd/methods/``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from diffkd.validation import LOSS_WEIGHTINGS, PREDICTION_TYPES, SAMPLERS, check, check_choice


@dataclass
class MethodConfig:
    """Base of each method's own section; ``name`` picks the method (see ``METHODS``)."""

    name: str = "progressive"


KD_ROUNDS = ("all", "imitation")
TARGET_SPACES = ("auto", "x", "z")


@dataclass
class ProgressiveConfig(MethodConfig):
    """start_steps -> final_steps by halvings of ``steps_per_round`` training steps each.

    ``imitation_steps`` > 0 adds a first round in which the student learns the teacher's own start_steps-step
    DDIM (one teacher step per student step): a compact student, most of whose tensors start fresh, first
    learns to denoise like the teacher before it learns to skip steps.

    ``kd_rounds``: where the losses section's output and feature KD apply. Both compare the student with the
    pipeline's teacher at the same noisy input, which is the target only when the student does the teacher's own
    step; in a halving they pull against it. "imitation" keeps them to the imitation round, "all" to every round.

    ``target_space``: "x" is Salimans & Ho's loss, the x-space MSE to the target times ``loss_weighting``; "z"
    multiplies it by c^2 = (alpha_s - sigma_s alpha_t / sigma_t)^2, which makes it the MSE of where the student's
    step lands, z_s; "auto" (the default) takes z in the rounds whose teacher predicts epsilon, x otherwise (see
    ``ProgressiveDistillation.step_weight``).
    """

    name: str = "progressive"
    start_steps: int = 64
    final_steps: int = 4
    steps_per_round: int = 500
    imitation_steps: int = 0
    loss_weighting: str = "snr_trunc"
    student_prediction_type: str = "v_prediction"
    guidance_scale: float = 1.0
    kd_rounds: str = "all"
    target_space: str = "auto"

    def __post_init__(self):
        check(self.final_steps >= 1, f"method.final_steps must be >= 1; got {self.final_steps}")
        check(self.start_steps > self.final_steps,
              f"method.start_steps ({self.start_steps}) must be larger than method.final_steps ({self.final_steps})")
        ratio = self.start_steps / self.final_steps
        check(ratio == int(ratio) and math.log2(ratio) == int(math.log2(ratio)),
              f"method.start_steps ({self.start_steps}) must be a power-of-two multiple of method.final_steps "
              f"({self.final_steps}) to be reached by halving; try start_steps="
              f"{self.final_steps * 2 ** max(1, round(math.log2(max(ratio, 2))))}")
        check(self.steps_per_round >= 1, f"method.steps_per_round must be >= 1; got {self.steps_per_round}")
        check(self.imitation_steps >= 0, f"method.imitation_steps must be >= 0 (0 = none); got {self.imitation_steps}")
        check_choice("method.kd_rounds", self.kd_rounds, KD_ROUNDS)
        check_choice("method.target_space", self.target_space, TARGET_SPACES)
        check(self.kd_rounds == "all" or self.imitation_steps > 0,
              'method.kd_rounds="imitation" needs an imitation round: set method.imitation_steps > 0, '
              'or kd_rounds="all"')
        check_choice("method.loss_weighting", self.loss_weighting, LOSS_WEIGHTINGS)
        check_choice("method.student_prediction_type", self.student_prediction_type, PREDICTION_TYPES + ("teacher",))
        check(self.guidance_scale >= 1, f"method.guidance_scale must be >= 1 (1 = no guidance); "
                                        f"got {self.guidance_scale}")


@dataclass
class GeneratorConfig(MethodConfig):
    """num_samples pairs of the teacher's ``teacher_sampler`` at ``teacher_steps``; a ``student_steps``-step student.

    cache: the pair cache folder ("" = ~/.cache/diffkd/teacher-samples/<key>, or under $DIFFKD_CACHE), made or
    completed before training and reused by every run with the same teacher, sampler, steps and seed.
    mse: weight of the x-space MSE to the teacher's sample (the losses section adds the KD terms).
    """

    name: str = "generator"
    num_steps: int = 2000
    student_steps: int = 1
    student_prediction_type: str = "v_prediction"
    mse: float = 1.0
    num_samples: int = 6000
    teacher_sampler: str = "ddim"
    teacher_steps: int = 32
    sample_seed: int = 0
    cache: str = ""
    cache_batch_size: int = 250
    cache_shard_size: int = 1000
    guidance_scale: float = 1.0

    def __post_init__(self):
        check(self.num_steps >= 1, f"method.num_steps must be >= 1; got {self.num_steps}")
        check(self.student_steps >= 1, f"method.student_steps must be >= 1; got {self.student_steps}")
        check_choice("method.student_prediction_type", self.student_prediction_type, PREDICTION_TYPES + ("teacher",))
        check(self.mse >= 0, f"method.mse must be >= 0; got {self.mse}")
        check(self.num_samples >= 1, f"method.num_samples must be >= 1; got {self.num_samples}")
        check_choice("method.teacher_sampler", self.teacher_sampler, SAMPLERS)
        check(self.teacher_steps >= 1, f"method.teacher_steps must be >= 1; got {self.teacher_steps}")
        check(self.sample_seed >= 0, f"method.sample_seed must be >= 0; got {self.sample_seed}")
        check(self.cache_batch_size >= 1 and self.cache_shard_size >= 1,
              "method.cache_batch_size and method.cache_shard_size must be >= 1")
        check(self.guidance_scale >= 1, f"method.guidance_scale must be >= 1 (1 = no guidance); "
                                        f"got {self.guidance_scale}")


@dataclass
class DenoiseConfig(MethodConfig):
    """A small pixel-space UNet2DModel and its noise schedule."""

    name: str = "denoise"
    num_steps: int = 3000
    sample_size: int = 16
    channels: int = 1
    block_out_channels: list[int] = (32, 64, 64)
    layers_per_block: int = 1
    attention_at_lowest: bool = True
    prediction_type: str = "v_prediction"
    beta_schedule: str = "squaredcos_cap_v2"
    num_train_timesteps: int = 1000
    clip_sample: bool = True
    sample_steps: int = 64

    def __post_init__(self):
        check(self.num_steps >= 1, f"method.num_steps must be >= 1; got {self.num_steps}")
        check(self.sample_size >= 4, f"method.sample_size must be >= 4; got {self.sample_size}")
        check(len(self.block_out_channels) >= 1, "method.block_out_channels needs at least one entry")
        check_choice("method.prediction_type", self.prediction_type, PREDICTION_TYPES)
        check_choice("method.beta_schedule", self.beta_schedule, ("linear", "scaled_linear", "squaredcos_cap_v2"))


@dataclass
class VaeConfig(MethodConfig):
    """The frozen parts of a small Stable-Diffusion-shaped pipeline: an AutoencoderKL trained here (L1
    reconstruction + kl_weight x KL, the LDM autoencoder's loss without its perceptual and GAN terms), and a CLIP
    text encoder and tokenizer made from the glyphs caption words, kept at their seeded random initialisation.

    init_from: a pipeline folder (this method's export) whose VAE training continues, its architecture options
    then ignored. The exported pipeline holds them beside a placeholder UNet; ``text-denoise`` trains the real one on top.
    Each level of ``block_out_channels`` but the last halves the side (32 px, two levels -> 16x16x4 latents).
    """

    name: str = "vae"
    num_steps: int = 400
    sample_size: int = 32
    block_out_channels: list[int] = field(default_factory=lambda: [16, 32])
    layers_per_block: int = 1
    latent_channels: int = 4
    kl_weight: float = 1.0e-6
    text_hidden_size: int = 64
    text_layers: int = 2
    text_heads: int = 4
    max_tokens: int = 20
    init_from: str = ""

    def __post_init__(self):
        check(self.num_steps >= 1, f"method.num_steps must be >= 1; got {self.num_steps}")
        check(len(self.block_out_channels) >= 1, "method.block_out_channels needs at least one entry")
        levels = len(self.block_out_channels)
        check(self.sample_size % 2 ** (levels - 1) == 0,
              f"method.sample_size ({self.sample_size}) must be divisible by 2^{levels - 1}, the VAE's downsampling")
        check(self.kl_weight >= 0, f"method.kl_weight must be >= 0; got {self.kl_weight}")
        check(self.text_hidden_size % self.text_heads == 0,
              f"method.text_hidden_size ({self.text_hidden_size}) must be a multiple of method.text_heads "
              f"({self.text_heads})")
        check(self.max_tokens >= 16, f"method.max_tokens must be >= 16 (the longest glyphs caption is 15 tokens); "
                                     f"got {self.max_tokens}")


@dataclass
class TextDenoiseConfig(MethodConfig):
    """A UNet2DConditionModel trained on the latents of ``components`` (a pipeline folder with a VAE, text encoder
    and tokenizer, such as the ``vae`` method's export), conditioned on each image's caption.

    cross_attention: per level, whether the UNet cross-attends to the text there.
    caption_dropout: the fraction of rows trained on the empty prompt, so that the same network also gives the
    unconditional prediction classifier-free guidance needs (Ho & Salimans 2022). The schedule defaults are Stable
    Diffusion's: epsilon prediction, scaled-linear betas 0.00085..0.012 over 1000 steps.
    """

    name: str = "text-denoise"
    components: str = "runs/glyphs-vae/pipeline"
    num_steps: int = 1400
    block_out_channels: list[int] = field(default_factory=lambda: [32, 64])
    cross_attention: list[bool] = field(default_factory=lambda: [False, True])
    layers_per_block: int = 1
    attention_head_dim: int = 8
    caption_dropout: float = 0.1
    prediction_type: str = "epsilon"
    beta_schedule: str = "scaled_linear"
    beta_start: float = 0.00085
    beta_end: float = 0.012
    num_train_timesteps: int = 1000
    sample_steps: int = 50

    def __post_init__(self):
        check(self.num_steps >= 1, f"method.num_steps must be >= 1; got {self.num_steps}")
        check(len(self.block_out_channels) >= 1, "method.block_out_channels needs at least one entry")
        check(len(self.cross_attention) == len(self.block_out_channels) and any(self.cross_attention),
              f"method.cross_attention needs one true/false per level of method.block_out_channels "
              f"({len(self.block_out_channels)}), at least one true; got {list(self.cross_attention)}")
        check(0 <= self.caption_dropout < 1, f"method.caption_dropout must be in [0, 1); got {self.caption_dropout}")
        check_choice("method.prediction_type", self.prediction_type, PREDICTION_TYPES)
        check_choice("method.beta_schedule", self.beta_schedule, ("linear", "scaled_linear", "squaredcos_cap_v2"))
        check(0 < self.beta_start < self.beta_end < 1,
              f"method.beta_start and beta_end must satisfy 0 < start < end < 1; got {self.beta_start}, "
              f"{self.beta_end}")


@dataclass(frozen=True)
class RegisteredMethod:
    """A method's options class and where its implementation lives ("module:Class", imported on first use)."""

    options: type[MethodConfig]
    implementation: str


METHODS: dict[str, RegisteredMethod] = {
    "progressive": RegisteredMethod(ProgressiveConfig, "diffkd.methods.progressive:ProgressiveDistillation"),
    "generator": RegisteredMethod(GeneratorConfig, "diffkd.methods.generator:GeneratorDistillation"),
    "denoise": RegisteredMethod(DenoiseConfig, "diffkd.methods.denoise:DenoisingTraining"),
    "vae": RegisteredMethod(VaeConfig, "diffkd.methods.vae:VaeTraining"),
    "text-denoise": RegisteredMethod(TextDenoiseConfig, "diffkd.methods.text_denoise:TextDenoisingTraining"),
}
