"""Tiny models built in the tests: nothing is downloaded."""

import os

import pytest
import torch
from diffusers import DDIMScheduler, UNet2DModel

from tests.faults import TEACHER_CONFIG

# Tiny models gain nothing from more threads, and oversubscribed threads crawl on a shared 2-core machine.
torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))


def make_tiny_unet(sample_size: int = 8, channels: int = 1, seed: int = 0) -> UNet2DModel:
    torch.manual_seed(seed)
    return UNet2DModel(sample_size=sample_size, in_channels=channels, out_channels=channels,
                       block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4,
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"))


def make_scheduler(prediction_type: str = "v_prediction", clip_sample: bool = False) -> DDIMScheduler:
    return DDIMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", prediction_type=prediction_type,
                         clip_sample=clip_sample, timestep_spacing="trailing", set_alpha_to_one=True)


@pytest.fixture
def tiny_unet() -> UNet2DModel:
    return make_tiny_unet()


@pytest.fixture(scope="session")
def tiny_teacher(tmp_path_factory) -> str:
    """A 8x8 digits teacher trained for a few seconds by the project's own denoise method."""
    from diffkd.api import distill
    from diffkd.config import parse_config

    output = tmp_path_factory.mktemp("tiny-teacher")
    return str(distill(parse_config(TEACHER_CONFIG), output))


@pytest.fixture(scope="session")
def trained_eps_teacher(tmp_path_factory) -> str:
    """A tiny 8x8 digits teacher trained for a few seconds the google/ddpm way (epsilon, linear betas, no clip)."""
    from diffkd.api import distill
    from diffkd.config import parse_config

    method = {**TEACHER_CONFIG["method"], "prediction_type": "epsilon", "beta_schedule": "linear",
              "clip_sample": False}
    return str(distill(parse_config({**TEACHER_CONFIG, "method": method}), tmp_path_factory.mktemp("eps-teacher")))


def make_tiny_sd_pipeline(folder) -> str:
    """A random Stable-Diffusion-shaped pipeline (VAE, CLIP text encoder with a 54-token vocabulary, cross-attention
    UNet, SD's scaled-linear epsilon schedule) small enough to train on a CPU in seconds."""
    import json
    from pathlib import Path

    from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    folder = Path(folder)
    vocab_dir = folder.parent / f"{folder.name}-vocab"
    vocab_dir.mkdir(parents=True, exist_ok=True)
    letters = "abcdefghijklmnopqrstuvwxyz"
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1, **{c: 2 + i for i, c in enumerate(letters)},
             **{c + "</w>": 28 + i for i, c in enumerate(letters)}}
    (vocab_dir / "vocab.json").write_text(json.dumps(vocab))
    (vocab_dir / "merges.txt").write_text("#version: 0.2\n")
    torch.manual_seed(0)
    tokenizer = CLIPTokenizer(str(vocab_dir / "vocab.json"), str(vocab_dir / "merges.txt"), model_max_length=8)
    text_encoder = CLIPTextModel(CLIPTextConfig(vocab_size=len(vocab), hidden_size=16, intermediate_size=32,
                                                num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=8,
                                                bos_token_id=0, eos_token_id=1, pad_token_id=1))
    unet = UNet2DConditionModel(sample_size=4, in_channels=4, out_channels=4, block_out_channels=(8, 16),
                                layers_per_block=1, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=16,
                                norm_num_groups=4, attention_head_dim=2)
    vae = AutoencoderKL(in_channels=3, out_channels=3, block_out_channels=(8, 8), latent_channels=4,
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        norm_num_groups=4, sample_size=8)
    scheduler = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="session")
def tiny_sd(tmp_path_factory) -> str:
    return make_tiny_sd_pipeline(tmp_path_factory.mktemp("tiny-sd") / "pipeline")


@pytest.fixture(scope="session")
def tiny_ldm(tmp_path_factory) -> str:
    from tests.tiny_layouts import make_tiny_ldm_pipeline

    return make_tiny_ldm_pipeline(tmp_path_factory.mktemp("tiny-ldm") / "pipeline")


@pytest.fixture(scope="session")
def tiny_sdxl(tmp_path_factory) -> str:
    from tests.tiny_layouts import make_tiny_sdxl_pipeline

    return make_tiny_sdxl_pipeline(tmp_path_factory.mktemp("tiny-sdxl") / "pipeline")


@pytest.fixture(scope="session")
def tiny_sd3(tmp_path_factory) -> str:
    from tests.tiny_layouts import make_tiny_sd3_pipeline

    return make_tiny_sd3_pipeline(tmp_path_factory.mktemp("tiny-sd3") / "pipeline")


@pytest.fixture(scope="session")
def tiny_sana(tmp_path_factory) -> str:
    from tests.tiny_layouts import make_tiny_sana_pipeline

    return make_tiny_sana_pipeline(tmp_path_factory.mktemp("tiny-sana") / "pipeline")


@pytest.fixture(scope="session")
def tiny_pixart(tmp_path_factory) -> str:
    from tests.tiny_layouts import make_tiny_pixart_pipeline

    return make_tiny_pixart_pipeline(tmp_path_factory.mktemp("tiny-pixart") / "pipeline")


@pytest.fixture(scope="session")
def tiny_flux(tmp_path_factory) -> str:
    from tests.tiny_layouts import make_tiny_flux_pipeline

    return make_tiny_flux_pipeline(tmp_path_factory.mktemp("tiny-flux") / "pipeline")
