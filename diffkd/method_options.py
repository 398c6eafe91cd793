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


@dataclass
class GuidanceRange:
    """A guidance-embedded student (Meng et al. 2023 stage 1; LCM's w-conditioning): it learns the teacher's
    classifier-free guided output for every w in [w_min, w_max] (drawn per sample), told w through a guidance
    embedding of ``embedding_dim`` features (the UNet's ``time_cond_proj_dim``), so one pass per step serves any w.
    """

    w_min: float = 2.0
    w_max: float = 8.0
    embedding_dim: int = 256

    def __post_init__(self):
        check(self.w_min >= 1, f"method.guidance.w_min must be >= 1 (1 = the conditional model); got {self.w_min}")
        check(self.w_min <= self.w_max, f"method.guidance.w_min ({self.w_min}) must not exceed method.guidance.w_max "
                                        f"({self.w_max}): swap them")
        check(self.embedding_dim >= 4, f"method.guidance.embedding_dim must be >= 4; got {self.embedding_dim}")


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

    ``guidance``: a w range makes a guidance-embedded student: a first round (of ``imitation_steps``, or
    ``steps_per_round`` when that is 0) learns the CFG teacher's start_steps-step DDIM at per-sample w, then each
    halving distils the previous w-conditioned student at the same w. Exclusive with a fixed ``guidance_scale``.

    ``target_space``: "x" is Salimans & Ho's loss, the x-space MSE to the target times ``loss_weighting``; "z"
    multiplies it by c^2 = (alpha_s - sigma_s alpha_t / sigma_t)^2, which makes it the MSE of where the student's
    step lands, z_s; "auto" (the default) takes z in the halvings and imitation round whose teacher predicts
    epsilon, x otherwise and in a guidance round: the first round of a w range, or the imitation round of a
    fixed guidance_scale > 1 (see ``ProgressiveDistillation.uses_z_space``).
    """

    name: str = "progressive"
    start_steps: int = 64
    final_steps: int = 4
    steps_per_round: int = 500
    imitation_steps: int = 0
    loss_weighting: str = "snr_trunc"
    student_prediction_type: str = "v_prediction"
    guidance_scale: float = 1.0
    guidance: GuidanceRange | None = None
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
        check_choice("method.loss_weighting", self.loss_weighting, LOSS_WEIGHTINGS)
        check_choice("method.student_prediction_type", self.student_prediction_type, PREDICTION_TYPES + ("teacher",))
        check(self.guidance_scale >= 1, f"method.guidance_scale must be >= 1 (1 = no guidance); "
                                        f"got {self.guidance_scale}")
        check(self.guidance is None or self.guidance_scale == 1,
              "method.guidance (a w range, embedded in the student) and a fixed method.guidance_scale exclude each "
              "other: drop one")
        check(self.kd_rounds == "all" or self.imitation_steps > 0 or self.guidance is not None,
              'method.kd_rounds="imitation" needs an imitation round: set method.imitation_steps > 0, '
              'or kd_rounds="all"')


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


DMD_MULTISTEP = ("consistency", "ddim")
DMD_BACKWARD_SIMULATIONS = ("random_step", "unrolled")
CONSISTENCY_DISTANCES = ("pseudo_huber", "l2", "lpips")
CONSISTENCY_SOLVERS = ("ddim", "dpmsolver++")


@dataclass
class ConsistencyConfig(MethodConfig):
    """Consistency distillation (Song et al. 2023; LCM, Luo et al. 2023) on the teacher's ``teacher_grid``-point grid.

    Each update takes one teacher DDIM step of ``skip`` grid intervals (LCM's skipping interval) and pulls the
    student at the noisier point towards the target network at the less noisy one. ``target_ema``: the target
    network's EMA of the student (LCM: 0.95); 0 is iCT's choice, the student itself under stop-gradient.
    ``distance``: iCT's pseudo-Huber (c = 0.00054 sqrt(d)), the squared L2, or LPIPS (pixel teachers).
    ``solver``: the teacher's ODE step, DDIM (one teacher pass) or DPM-Solver++(2S) through the interval's
    midpoint (two passes, second order). ``guidance_scale``: the teacher's fixed classifier-free guidance inside its
    ODE step (conditional teachers). ``guidance``: a w range instead (LCM's w-conditioning): the teacher's step is
    guided at a w drawn per sample and the student and its target network are told that w through a guidance
    embedding (``diffkd.guidance_embedding``); exclusive with a fixed ``guidance_scale``.
    ``guidance_steps``: a guidance round of that many steps first (guided teachers only): the student's x
    prediction regresses onto the guided teacher's at the same input and w, on the grid's timesteps (Meng et al.
    2023, stage 1, as progressive's guidance round), so the consistency round starts from a student that already
    follows w rather than from the teacher's unguided function.
    ``num_inference_steps``: the step count the model card and the evaluation name as the student's own; the
    exported LCMScheduler samples any k from 1 to 8 (and up to teacher_grid).
    ``sampler``: the scheduler class the student is exported with, or "auto": on an unconditional teacher the run
    scores its consistency scheduler and the alternatives its noise path offers (DDIM on a VP path) at its end and
    exports the clearly best (``diffkd.sampler_choice``); otherwise the consistency scheduler.
    ``student_prediction_type``: "auto" (the default: the noise path's ``few_step_prediction_type``, the teacher's
    own but on an epsilon teacher whose top timestep makes x0 = (z - sigma eps) / alpha amplify the student's error
    more than 50 times, as DDPM's and LDM's betas do: v_prediction there; a LoRA student keeps the teacher's, since
    its adapters load onto the teacher's pipeline), "teacher", or a parameterisation.
    ``reparameterisation_steps``: where the student's parameterisation is not the teacher's, a round of that many
    steps first regresses the student's epsilon onto the teacher's (the DDPM loss, which weights x0 errors by
    alpha^2 / sigma^2 and so ignores the top timesteps, where the teacher's x0 is its error times 150), so the
    consistency round starts from the teacher's function in the new parameterisation instead of re-learning it
    (digits-eps-16, a velocity student at 2 / 4 steps: 2.89x / 1.40x the teacher's DDIM-64 FD without the round,
    1.24x / 1.09x with 400 steps of it; eval/RESULTS.md, "A velocity student by default").
    """

    name: str = "consistency"
    num_steps: int = 2000
    guidance_steps: int = 0
    teacher_grid: int = 50
    skip: int = 1
    target_ema: float = 0.95
    distance: str = "pseudo_huber"
    solver: str = "ddim"
    guidance_scale: float = 1.0
    guidance: GuidanceRange | None = None
    timestep_scaling: float = 10.0
    num_inference_steps: int = 4
    sampler: str = "auto"
    student_prediction_type: str = "auto"
    reparameterisation_steps: int = 400

    def __post_init__(self):
        check(self.num_steps >= 1, f"method.num_steps must be >= 1; got {self.num_steps}")
        check_choice("method.student_prediction_type", self.student_prediction_type,
                     PREDICTION_TYPES + ("teacher", "auto"))
        check(self.reparameterisation_steps >= 0,
              f"method.reparameterisation_steps must be >= 0 (0 = none); got {self.reparameterisation_steps}")
        check(self.teacher_grid >= 2, f"method.teacher_grid must be >= 2 points; got {self.teacher_grid}")
        check(self.skip >= 1 and self.teacher_grid % self.skip == 0,
              f"method.skip={self.skip} must be >= 1 and divide method.teacher_grid={self.teacher_grid} (so a chain "
              f"of teacher steps from the top lands on the boundary); try skip=1")
        check(0 <= self.target_ema < 1, f"method.target_ema must be in [0, 1) (0 = the student itself under "
                                        f"stop-gradient, LCM uses 0.95); got {self.target_ema}")
        check_choice("method.distance", self.distance, CONSISTENCY_DISTANCES)
        check_choice("method.solver", self.solver, CONSISTENCY_SOLVERS)
        check(self.guidance_scale >= 1, f"method.guidance_scale must be >= 1 (1 = no guidance); "
                                        f"got {self.guidance_scale}")
        check(self.guidance is None or self.guidance_scale == 1,
              "method.guidance (a w range, embedded in the student) and a fixed method.guidance_scale exclude each "
              "other: drop one")
        check(self.guidance_steps >= 0, f"method.guidance_steps must be >= 0; got {self.guidance_steps}")
        check(not self.guidance_steps or self.guidance is not None or self.guidance_scale > 1,
              "method.guidance_steps trains a guidance round, which needs a guided teacher: set method.guidance "
              "(a w range) or method.guidance_scale > 1, or drop method.guidance_steps")
        check(self.timestep_scaling > 0, f"method.timestep_scaling must be > 0 (LCM uses 10); "
                                         f"got {self.timestep_scaling}")
        check(1 <= self.num_inference_steps <= self.teacher_grid,
              f"method.num_inference_steps must be in [1, method.teacher_grid={self.teacher_grid}]; "
              f"got {self.num_inference_steps}")


@dataclass
class DenoiseConfig(MethodConfig):
    """A small UNet2DModel and its noise schedule: in pixel space, or with ``components`` (the folder the ``vq``
    method exports) on that autoencoder's latents, exported as an LDMPipeline; sample_size and channels are then
    unused: the autoencoder's images and latents set the data's and the UNet's."""

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
    shift: float = 1.0  # rectified flow only (prediction_type: flow): FlowMatchEulerDiscreteScheduler's shift
    components: str = ""

    def __post_init__(self):
        check(self.num_steps >= 1, f"method.num_steps must be >= 1; got {self.num_steps}")
        check(self.sample_size >= 4, f"method.sample_size must be >= 4; got {self.sample_size}")
        check(not self.components or self.prediction_type != "flow",
              "method.components makes an LDMPipeline, whose loop samples VP schedulers only: use prediction_type "
              "epsilon or v_prediction")
        check(not self.components or not self.clip_sample,
              "method.clip_sample clips x0 to [-1, 1], which latents are not: set it false with method.components")
        check(len(self.block_out_channels) >= 1, "method.block_out_channels needs at least one entry")
        check_choice("method.prediction_type", self.prediction_type, PREDICTION_TYPES)
        check_choice("method.beta_schedule", self.beta_schedule, ("linear", "scaled_linear", "squaredcos_cap_v2"))
        check(self.shift > 0, f"method.shift must be > 0; got {self.shift}")


@dataclass
class DmdConfig(MethodConfig):
    """DMD2 (Yin et al. 2024): a ``student_steps``-step generator trained by distribution matching against a fake
    score network that ``fake_updates`` denoising updates per generator step keep on the generator's samples.

    fake_learning_rate: the fake score network's LR (0 = train.learning_rate); adam_betas: both networks' Adam
    betas (DMD2 uses (0, 0.999)). timestep_range: the fractions of the teacher's T between which the
    distribution-matching gradient noises the generator's samples (DMD2: 0.02 to 0.98). guidance_scale: the real
    score's classifier-free guidance (conditional teachers). gan / gan_classifier: weights of the generator's
    non-saturating GAN loss and of the classifier head's loss on the fake score network's mid-block features
    (0 = no GAN term; needs the data set's real images). regression: weight of the x-space MSE to the teacher's
    sample from the same noise (DMD's regression loss); warm_start_steps: a first round of regression alone. Both
    use the teacher-sample cache of ``generator`` (num_samples, teacher_sampler, teacher_steps, sample_seed, cache).
    multistep: how a k-step generator moves between its grid steps, in training and in the exported scheduler:
    "consistency" re-noises each step's x0 with fresh noise (DMD2's backward simulation, sampled by LCMScheduler),
    "ddim" takes a deterministic DDIM step with the x0's implied noise (DDIMScheduler). backward_simulation: which
    output of a k-step generator is trained: "random_step" (DMD2's: a random step's, reached without gradient) or
    "unrolled" (the final sample's, with the gradient through every step). fake_score_lora_rank: train the fake
    score as rank-r LoRA adapters (scale 1) on a frozen copy of the teacher instead of a whole copy (0): no gradients
    or Adam moments for its weights (``diffkd plan`` shows the saving); LoRA usually wants a larger
    fake_learning_rate than a whole network.
    """

    name: str = "dmd"
    num_steps: int = 2000
    student_steps: int = 1
    fake_updates: int = 5
    fake_learning_rate: float = 0.0
    adam_betas: tuple[float, float] = (0.0, 0.999)
    timestep_range: tuple[float, float] = (0.02, 0.98)
    guidance_scale: float = 1.0
    gan: float = 0.0
    gan_classifier: float = 0.01
    regression: float = 0.0
    warm_start_steps: int = 0
    num_samples: int = 6000
    teacher_sampler: str = "ddim"
    teacher_steps: int = 32
    sample_seed: int = 0
    cache: str = ""
    cache_batch_size: int = 250
    cache_shard_size: int = 1000
    multistep: str = "ddim"
    backward_simulation: str = "random_step"
    fake_score_lora_rank: int = 0

    @property
    def uses_cache(self) -> bool:
        return self.regression > 0 or self.warm_start_steps > 0

    def __post_init__(self):
        check(self.num_steps >= 1, f"method.num_steps must be >= 1; got {self.num_steps}")
        check(self.student_steps >= 1, f"method.student_steps must be >= 1; got {self.student_steps}")
        check(self.fake_score_lora_rank >= 0, f"method.fake_score_lora_rank must be >= 0 (0 = a whole copy of the "
                                              f"teacher as the fake score); got {self.fake_score_lora_rank}")
        check(self.fake_updates >= 1, f"method.fake_updates must be >= 1 (fake-score updates per generator update; "
                                      f"DMD2 uses 5); got {self.fake_updates}")
        check(0 <= self.timestep_range[0] < self.timestep_range[1] <= 1,
              f"method.timestep_range must be [low, high] with 0 <= low < high <= 1 (fractions of the teacher's "
              f"timesteps; DMD2 uses [0.02, 0.98]); got {list(self.timestep_range)}")
        check(all(0 <= b < 1 for b in self.adam_betas),
              f"method.adam_betas must be two numbers in [0, 1), e.g. [0.0, 0.999]; got {list(self.adam_betas)}")
        check(min(self.fake_learning_rate, self.gan, self.gan_classifier, self.regression) >= 0
              and self.warm_start_steps >= 0,
              "method.fake_learning_rate, gan, gan_classifier, regression and warm_start_steps must be >= 0")
        check(self.guidance_scale >= 1, f"method.guidance_scale must be >= 1 (1 = no guidance); "
                                        f"got {self.guidance_scale}")
        check_choice("method.teacher_sampler", self.teacher_sampler, SAMPLERS)
        check_choice("method.multistep", self.multistep, DMD_MULTISTEP)
        check_choice("method.backward_simulation", self.backward_simulation, DMD_BACKWARD_SIMULATIONS)
        check(self.num_samples >= 1 and self.teacher_steps >= 1 and self.sample_seed >= 0
              and self.cache_batch_size >= 1 and self.cache_shard_size >= 1,
              "method.num_samples, teacher_steps, cache_batch_size and cache_shard_size must be >= 1, "
              "sample_seed >= 0")


@dataclass
class VaeConfig(MethodConfig):
    """The first parts of a small Stable-Diffusion-shaped pipeline: an AutoencoderKL trained here (L1
    reconstruction + kl_weight x KL, the LDM autoencoder's loss without its perceptual and GAN terms), and a CLIP
    text encoder and tokenizer made from the glyphs caption words, the encoder at its seeded initialisation (the
    text-denoise stage trains it).

    init_from: a pipeline folder (this method's export) whose VAE training continues, its architecture options
    then ignored. decoder_only (with init_from): train the decoder alone, so the latents, and any UNet trained on
    them, stay valid (as Stable Diffusion's ft-MSE VAE was made). The exported pipeline holds them beside a placeholder UNet; ``text-denoise`` trains the real one on top.
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
    decoder_only: bool = False

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
        check(not self.decoder_only or bool(self.init_from),
              "method.decoder_only needs method.init_from: the VAE whose encoder (and latent space) it keeps")


@dataclass
class TextDenoiseConfig(MethodConfig):
    """A UNet2DConditionModel trained on the latents of ``components`` (a pipeline folder with a VAE, text encoder
    and tokenizer, such as the ``vae`` method's export), conditioned on each image's caption.

    cross_attention: per level, whether the UNet cross-attends to the text there. text_time_embedding: the pooled
    caption is also added to the timestep embedding (diffusers' addition_embed_type="text"). text_encoder: a CLIP
    folder or hub id (a ``CLIPModel`` such as ``python -m diffkd.evaluation.glyphs_clip`` saves, or
    ``openai/clip-vit-large-patch14``) whose text tower and tokenizer replace those of ``components``, frozen as
    Stable Diffusion's; without it the text encoder of ``components`` is trained with the UNet.
    noise_offset: the std of a per-image, per-channel constant added to the training noise (Guttenberg 2023;
    diffusers' --noise_offset). Stable Diffusion's schedule leaves the latents' mean in the noisiest input
    (alpha_T = 0.068), so without it the model reads a flat image's colour off the starting noise instead of the
    prompt.
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
    text_time_embedding: bool = True
    text_encoder: str | None = None
    noise_offset: float = 0.0
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
        check(self.noise_offset >= 0, f"method.noise_offset must be >= 0; got {self.noise_offset}")
        check_choice("method.prediction_type", self.prediction_type, PREDICTION_TYPES)
        check_choice("method.beta_schedule", self.beta_schedule, ("linear", "scaled_linear", "squaredcos_cap_v2"))
        check(0 < self.beta_start < self.beta_end < 1,
              f"method.beta_start and beta_end must satisfy 0 < start < end < 1; got {self.beta_start}, "
              f"{self.beta_end}")


@dataclass
class VqConfig(MethodConfig):
    """The first stage of an unconditional latent teacher: a VQModel trained on the data (VQGAN's loss without its
    perceptual and GAN terms: L1 reconstruction plus the codebook and commitment terms of the quantiser), exported in
    an LDMPipeline beside a placeholder UNet; ``denoise`` with ``method.components`` trains the real one. Each level
    of ``block_out_channels`` but the last halves the side (16 px, two levels -> 8x8 latents)."""

    name: str = "vq"
    num_steps: int = 2000
    sample_size: int = 16
    channels: int = 3
    block_out_channels: list[int] = field(default_factory=lambda: [32, 64])
    layers_per_block: int = 1
    latent_channels: int = 3
    num_vq_embeddings: int = 256

    def __post_init__(self):
        check(self.num_steps >= 1, f"method.num_steps must be >= 1; got {self.num_steps}")
        check(len(self.block_out_channels) >= 1, "method.block_out_channels needs at least one entry")
        levels = len(self.block_out_channels)
        check(self.sample_size % 2 ** (levels - 1) == 0,
              f"method.sample_size ({self.sample_size}) must be divisible by 2^{levels - 1}, the VQModel's "
              "downsampling")
        check(self.num_vq_embeddings >= 2, f"method.num_vq_embeddings must be >= 2; got {self.num_vq_embeddings}")


@dataclass(frozen=True)
class RegisteredMethod:
    """A method's options class and where its implementation lives ("module:Class", imported on first use)."""

    options: type[MethodConfig]
    implementation: str


METHODS: dict[str, RegisteredMethod] = {
    "progressive": RegisteredMethod(ProgressiveConfig, "diffkd.methods.progressive:ProgressiveDistillation"),
    "generator": RegisteredMethod(GeneratorConfig, "diffkd.methods.generator:GeneratorDistillation"),
    "denoise": RegisteredMethod(DenoiseConfig, "diffkd.methods.denoise:DenoisingTraining"),
    "consistency": RegisteredMethod(ConsistencyConfig, "diffkd.methods.consistency:ConsistencyDistillation"),
    "dmd": RegisteredMethod(DmdConfig, "diffkd.methods.dmd:DistributionMatching"),
    "vae": RegisteredMethod(VaeConfig, "diffkd.methods.vae:VaeTraining"),
    "vq": RegisteredMethod(VqConfig, "diffkd.methods.vq:VqTraining"),
    "text-denoise": RegisteredMethod(TextDenoiseConfig, "diffkd.methods.text_denoise:TextDenoisingTraining"),
}
