"""The parts of a small Stable-Diffusion-shaped text-to-image pipeline, built from scratch for the glyphs teacher.

Stable Diffusion (Rombach et al. 2022) is a VAE, a CLIP text encoder with its BPE tokenizer, a UNet that
cross-attends to the text, and a scaled-linear DDPM schedule; ``StableDiffusionPipeline`` runs any such set. Here
each part is sized for 32 px glyphs and 2 CPU cores: a VAE to 16x16x4 latents, a tokenizer whose vocabulary is the
caption words (every word one token, so no prompt of the glyphs grammar meets an unknown token), a small CLIP text
encoder, and a UNet2DConditionModel.
"""

from __future__ import annotations

import itertools
import math
import re
import string

import torch
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from diffkd import glyphs

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
END_OF_WORD = "</w>"


def caption_words() -> list[str]:
    """Every word (lower-cased, as CLIP's tokenizer sees it) and punctuation mark a glyphs caption can contain."""
    values = [*glyphs.CHARACTERS, *glyphs.COLOUR_NAMES, *glyphs.FAMILIES, *glyphs.STYLES, "letter", "digit"]
    literal = [re.sub(r"\{\w+\}", " ", template) for template in glyphs.TEMPLATES]
    words = set()
    for text in [*values, *literal]:
        words.update(re.findall(rf"\w+|[{re.escape(string.punctuation)}]", text.lower()))
    return sorted(words)


def _bpe(word: str, ranks: dict[tuple[str, str], int]) -> list[str]:
    """CLIP's byte-pair encoding of one word: merge the lowest-ranked adjacent pair until none is known."""
    parts = [*word[:-1], word[-1] + END_OF_WORD]
    while len(parts) > 1:
        rank = min(ranks.get(pair, len(ranks)) for pair in itertools.pairwise(parts))
        if rank == len(ranks):
            break
        merged, i = [], 0
        while i < len(parts):
            if i + 1 < len(parts) and ranks.get((parts[i], parts[i + 1])) == rank:
                merged.append(parts[i] + parts[i + 1])
                i += 2
            else:
                merged.append(parts[i])
                i += 1
        parts = merged
    return parts


def word_vocabulary(words: list[str]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """A CLIP vocabulary and merge list under which each of ``words`` is a single token.

    Merges are added word by word, each new one ranked last: a word already whole uses only lower-ranked merges,
    so the later ones never change how it splits.
    """
    ranks: dict[tuple[str, str], int] = {}
    tokens = {EOS, BOS}
    for word in words:
        tokens.update([*word[:-1], word[-1] + END_OF_WORD])
        parts = _bpe(word, ranks)
        while len(parts) > 1:
            ranks[(parts[0], parts[1])] = len(ranks)
            tokens.add(parts[0] + parts[1])
            parts = _bpe(word, ranks)
    ordered = sorted(tokens - {BOS, EOS}) + [BOS, EOS]
    merges = [pair for pair, _ in sorted(ranks.items(), key=lambda item: item[1])]
    return {token: index for index, token in enumerate(ordered)}, merges


def build_tokenizer(words: list[str], max_length: int) -> CLIPTokenizer:
    vocab, merges = word_vocabulary(words)
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=max_length)


def build_text_encoder(tokenizer: CLIPTokenizer, hidden_size: int, layers: int, heads: int) -> CLIPTextModel:
    """A small CLIP text transformer (causal, learned positions), as Stable Diffusion's but narrow."""
    config = CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                            num_hidden_layers=layers, num_attention_heads=heads,
                            max_position_embeddings=tokenizer.model_max_length,
                            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                            pad_token_id=tokenizer.pad_token_id)
    return CLIPTextModel(config)


INITIAL_LOG_VARIANCE = -6.0  # the posterior starts at std exp(-3) = 0.05, not 1


def build_vae(sample_size: int, block_out_channels: list[int], latent_channels: int,
              layers_per_block: int) -> AutoencoderKL:
    """An AutoencoderKL that downsamples by 2 at each level but the last (32 px, two levels -> 16x16 latents).

    Its posterior starts narrow: at the default initialisation (std 1 in every channel, means near 0) the decoder
    learns to ignore the channels whose means grow slowest, and with a small KL weight they never recover; the first
    glyphs VAE used 2 of its 4 latent channels (posterior std 0.99 in the other two after 3,000 steps)."""
    levels = len(block_out_channels)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * levels,
                        up_block_types=("UpDecoderBlock2D",) * levels, block_out_channels=tuple(block_out_channels),
                        layers_per_block=layers_per_block, latent_channels=latent_channels,
                        norm_num_groups=math.gcd(32, *block_out_channels), sample_size=sample_size)
    with torch.no_grad():  # quant_conv's outputs are the means, then the log-variances
        vae.quant_conv.weight[latent_channels:] = 0
        vae.quant_conv.bias[latent_channels:] = INITIAL_LOG_VARIANCE
    return vae


def build_unet(sample_size: int, latent_channels: int, block_out_channels: list[int], layers_per_block: int,
               cross_attention_dim: int, attention_head_dim: int, cross_attention: list[bool],
               text_time_embedding: bool = False) -> UNet2DConditionModel:
    """A UNet2DConditionModel that cross-attends to the text at the levels ``cross_attention`` marks (attention
    costs the square of the tokens at a level, so the highest resolution may go without).

    ``text_time_embedding``: the caption, attention-pooled, is also added to the timestep embedding that every
    residual block reads (diffusers' addition_embed_type="text", DeepFloyd IF's global text path): a whole-image
    attribute such as a colour then reaches every block directly, not only through cross-attention."""
    down = tuple("CrossAttnDownBlock2D" if attend else "DownBlock2D" for attend in cross_attention)
    up = tuple("CrossAttnUpBlock2D" if attend else "UpBlock2D" for attend in reversed(cross_attention))
    return UNet2DConditionModel(
        sample_size=sample_size, in_channels=latent_channels, out_channels=latent_channels,
        down_block_types=down, up_block_types=up, block_out_channels=tuple(block_out_channels),
        layers_per_block=layers_per_block, cross_attention_dim=cross_attention_dim,
        attention_head_dim=attention_head_dim, norm_num_groups=math.gcd(32, *block_out_channels),
        addition_embed_type="text" if text_time_embedding else None,
        addition_embed_type_num_heads=max(1, cross_attention_dim // attention_head_dim))


def build_scheduler(beta_start: float, beta_end: float, beta_schedule: str, prediction_type: str,
                    num_train_timesteps: int) -> DDIMScheduler:
    """Stable Diffusion's schedule (scaled-linear betas 0.00085..0.012 by default), sampled by DDIM; no clipping:
    latents are not bounded like pixels."""
    return DDIMScheduler(num_train_timesteps=num_train_timesteps, beta_start=beta_start, beta_end=beta_end,
                         beta_schedule=beta_schedule, prediction_type=prediction_type, clip_sample=False,
                         set_alpha_to_one=False, steps_offset=1, timestep_spacing="trailing")


def assemble(vae: AutoencoderKL, text_encoder: CLIPTextModel, tokenizer: CLIPTokenizer,
             unet: UNet2DConditionModel, scheduler: DDIMScheduler) -> StableDiffusionPipeline:
    """The parts as a StableDiffusionPipeline with no safety checker (nothing here to check)."""
    pipeline = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder.requires_grad_(False).eval(),
                                       tokenizer=tokenizer, unet=unet, scheduler=scheduler, safety_checker=None,
                                       feature_extractor=None, requires_safety_checker=False)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline

