"""Tiny random pipelines of each layout, built in code as diffusers' own pipeline tests build them (nothing is
downloaded): CLIP tokenizers over a 54-token vocabulary, one-layer encoders, 8 px images through a 2x VAE."""

import json
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    FlowMatchEulerDiscreteScheduler,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

LETTERS = "abcdefghijklmnopqrstuvwxyz"


def clip_tokenizer(folder: Path) -> CLIPTokenizer:
    folder.mkdir(parents=True, exist_ok=True)
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1, **{c: 2 + i for i, c in enumerate(LETTERS)},
             **{c + "</w>": 28 + i for i, c in enumerate(LETTERS)}}
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=8)


def clip_config(hidden: int, projection: int | None = None) -> CLIPTextConfig:
    return CLIPTextConfig(vocab_size=54, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=1,
                          num_attention_heads=2, max_position_embeddings=8, bos_token_id=0, eos_token_id=1,
                          pad_token_id=1, projection_dim=projection or hidden)


def tiny_vae(latent_channels: int = 4, shift_factor: float | None = None) -> AutoencoderKL:
    return AutoencoderKL(in_channels=3, out_channels=3, block_out_channels=(8, 8), latent_channels=latent_channels,
                         down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                         norm_num_groups=4, sample_size=8, shift_factor=shift_factor)


def make_tiny_sdxl_pipeline(folder) -> str:
    """SDXL's layout: two CLIP encoders (the second with a projection, whose pooled output is ``text_embeds``), a
    UNet with ``addition_embed_type='text_time'`` (6 time ids x 4 features + 16 pooled = 40), Euler on SDXL's
    scaled-linear schedule."""
    folder = Path(folder)
    torch.manual_seed(0)
    tokenizer = clip_tokenizer(folder.parent / f"{folder.name}-vocab")
    unet = UNet2DConditionModel(sample_size=4, in_channels=4, out_channels=4, block_out_channels=(8, 16),
                                layers_per_block=1, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=32,
                                norm_num_groups=4, attention_head_dim=2, use_linear_projection=True,
                                addition_embed_type="text_time", addition_time_embed_dim=4,
                                projection_class_embeddings_input_dim=40)
    scheduler = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1, timestep_spacing="leading")
    pipe = StableDiffusionXLPipeline(vae=tiny_vae(), text_encoder=CLIPTextModel(clip_config(16)),
                                     text_encoder_2=CLIPTextModelWithProjection(clip_config(16)), tokenizer=tokenizer,
                                     tokenizer_2=tokenizer, unet=unet, scheduler=scheduler, add_watermarker=False)
    pipe.save_pretrained(folder)
    return str(folder)


def make_tiny_sd3_pipeline(folder) -> str:
    """SD3's layout: an MMDiT over 4x4 latents, two CLIP encoders with projections (pooled 8 + 8 = 16), no T5
    (``text_encoder_3=None``: the pipeline pads with zeros), FlowMatch Euler with SD3's shift 3, a shifted VAE."""
    folder = Path(folder)
    torch.manual_seed(0)
    tokenizer = clip_tokenizer(folder.parent / f"{folder.name}-vocab")
    transformer = SD3Transformer2DModel(sample_size=4, patch_size=1, in_channels=4, out_channels=4, num_layers=1,
                                        attention_head_dim=4, num_attention_heads=2, joint_attention_dim=16,
                                        caption_projection_dim=8, pooled_projection_dim=16, pos_embed_max_size=8)
    pipe = StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=tiny_vae(shift_factor=0.1), text_encoder=CLIPTextModelWithProjection(clip_config(8)),
        text_encoder_2=CLIPTextModelWithProjection(clip_config(8)), tokenizer=tokenizer, tokenizer_2=tokenizer,
        text_encoder_3=None, tokenizer_3=None)
    pipe.save_pretrained(folder)
    return str(folder)


def t5_tokenizer(max_length: int = 16):
    """A T5 tokenizer over single letters, built in code (a Unigram model; what T5's sentencepiece file holds)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import T5TokenizerFast

    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)] + [(c, -1.0) for c in LETTERS + "\u2581"]
    tokenizer = Tokenizer(models.Unigram(vocab, unk_id=2, byte_fallback=False))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
    tokenizer.decoder = decoders.Metaspace()
    return T5TokenizerFast(tokenizer_object=tokenizer, eos_token="</s>", pad_token="<pad>", unk_token="<unk>",
                           extra_ids=0, model_max_length=max_length)


def make_tiny_flux_pipeline(folder, guidance_embeds: bool = True) -> str:
    """Flux's layout: an MMDiT over 2x2-packed latents (4 channels -> 16 packed) with rotary ids, CLIP's pooled
    embedding and a one-layer T5, a guidance embedding (Flux-dev; ``guidance_embeds=False`` is schnell-like), a
    shifted VAE and FlowMatch Euler with Flux's dynamic shifting. Sample it at 8 px (``height=width=8``)."""
    from diffusers import FluxPipeline, FluxTransformer2DModel
    from transformers import T5Config, T5EncoderModel

    folder = Path(folder)
    torch.manual_seed(0)
    tokenizer = clip_tokenizer(folder.parent / f"{folder.name}-vocab")
    transformer = FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1,
                                         attention_head_dim=8, num_attention_heads=2, joint_attention_dim=16,
                                         pooled_projection_dim=16, guidance_embeds=guidance_embeds,
                                         axes_dims_rope=(2, 2, 4))
    t5 = T5EncoderModel(T5Config(vocab_size=32, d_model=16, d_ff=32, d_kv=8, num_layers=1, num_heads=2,
                                 relative_attention_num_buckets=8, decoder_start_token_id=0))
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                                base_image_seq_len=256, max_image_seq_len=4096)
    pipe = FluxPipeline(scheduler=scheduler, vae=tiny_vae(shift_factor=0.1), text_encoder=CLIPTextModel(clip_config(16)),
                        tokenizer=tokenizer, text_encoder_2=t5, tokenizer_2=t5_tokenizer(), transformer=transformer)
    pipe.save_pretrained(folder)
    return str(folder)


def make_tiny_dit_pipeline(folder) -> str:
    """A class-conditional DiT pipeline: a transformer of a family diffkd has no layout for."""
    from diffusers import DiTPipeline, DiTTransformer2DModel

    torch.manual_seed(0)
    transformer = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=4, in_channels=4, out_channels=4,
                                        num_layers=1, sample_size=4, patch_size=2, num_embeds_ada_norm=10,
                                        norm_num_groups=4)
    pipe = DiTPipeline(transformer=transformer, vae=tiny_vae(), scheduler=DDIMScheduler())
    pipe.save_pretrained(folder)
    return str(folder)


def gemma_tokenizer():
    """A Gemma tokenizer over single letters, built in code (Gemma's is a sentencepiece Unigram model too)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import GemmaTokenizerFast

    specials = ["<pad>", "<eos>", "<bos>", "<unk>"]
    vocab = [(token, 0.0) for token in specials] + [(c, -1.0) for c in LETTERS + "\u2581"]
    tokenizer = Tokenizer(models.Unigram(vocab, unk_id=3, byte_fallback=False))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
    tokenizer.decoder = decoders.Metaspace()
    return GemmaTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", eos_token="<eos>", bos_token="<bos>",
                              unk_token="<unk>")


def make_tiny_sana_pipeline(folder) -> str:
    """SANA's layout: a linear-attention DiT with a learned variance (8 output channels over 4 latent ones), a
    one-layer Gemma-2 encoder, a four-stage deep-compression autoencoder (8x) and the DPM-Solver on flow sigmas
    SANA ships (flow_shift 3). SanaPipeline takes sides divisible by 32: sample it at 32 px (4x4 latents, as the
    other tiny layouts' 8 px) with ``use_resolution_binning=False``."""
    from diffusers import AutoencoderDC, DPMSolverMultistepScheduler, SanaPipeline, SanaTransformer2DModel
    from transformers import Gemma2Config, Gemma2Model

    torch.manual_seed(0)
    transformer = SanaTransformer2DModel(patch_size=1, in_channels=4, out_channels=8, num_layers=1,
                                         num_attention_heads=2, attention_head_dim=4, num_cross_attention_heads=2,
                                         cross_attention_head_dim=4, cross_attention_dim=8, caption_channels=8,
                                         sample_size=4)
    stages = ("ResBlock",) * 3 + ("EfficientViTBlock",)
    vae = AutoencoderDC(in_channels=3, latent_channels=4, attention_head_dim=2, encoder_block_types=stages,
                        decoder_block_types=stages, encoder_block_out_channels=(8,) * 4,
                        decoder_block_out_channels=(8,) * 4, encoder_qkv_multiscales=((), (), (), (5,)),
                        decoder_qkv_multiscales=((), (), (), (5,)), encoder_layers_per_block=(1,) * 4,
                        decoder_layers_per_block=(1,) * 4, downsample_block_type="conv",
                        upsample_block_type="interpolate", decoder_norm_types="rms_norm", decoder_act_fns="silu",
                        scaling_factor=0.41407)
    encoder = Gemma2Model(Gemma2Config(head_dim=4, hidden_size=8, intermediate_size=16, num_attention_heads=2,
                                       num_hidden_layers=1, num_key_value_heads=2, vocab_size=40,
                                       max_position_embeddings=4096, attn_implementation="eager"))
    scheduler = DPMSolverMultistepScheduler(flow_shift=3.0, use_flow_sigmas=True, prediction_type="flow_prediction")
    pipe = SanaPipeline(tokenizer=gemma_tokenizer(), text_encoder=encoder, vae=vae, transformer=transformer,
                        scheduler=scheduler)
    pipe.save_pretrained(folder)
    return str(folder)


def make_tiny_pixart_pipeline(folder) -> str:
    """PixArt-Sigma's layout: a DiT with a learned variance (8 output channels over 4 latent ones) on 4x4 latents,
    a one-layer T5 under its attention mask, a 2x VAE and the DPM-Solver++ on a VP schedule it ships. Sample it at
    8 px with ``use_resolution_binning=False``."""
    from diffusers import DPMSolverMultistepScheduler, PixArtSigmaPipeline, PixArtTransformer2DModel
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(0)
    transformer = PixArtTransformer2DModel(sample_size=4, num_layers=1, patch_size=2, attention_head_dim=4,
                                           num_attention_heads=2, caption_channels=16, in_channels=4,
                                           cross_attention_dim=8, out_channels=8, attention_bias=True,
                                           activation_fn="gelu-approximate", num_embeds_ada_norm=1000,
                                           norm_type="ada_norm_single", norm_elementwise_affine=False, norm_eps=1e-6)
    encoder = T5EncoderModel(T5Config(vocab_size=32, d_model=16, d_ff=32, d_kv=8, num_layers=1, num_heads=2,
                                      relative_attention_num_buckets=8, decoder_start_token_id=0))
    scheduler = DPMSolverMultistepScheduler(beta_start=0.0001, beta_end=0.02, beta_schedule="linear")
    pipe = PixArtSigmaPipeline(tokenizer=t5_tokenizer(), text_encoder=encoder, vae=tiny_vae(),
                               transformer=transformer, scheduler=scheduler)
    pipe.save_pretrained(folder)
    return str(folder)


def make_tiny_ldm_pipeline(folder) -> str:
    """Unconditional latent diffusion as CompVis/ldm-celebahq-256 ships it: a UNet2DModel on the latents of a
    VQModel (8 px through 2x, 32 codes of 3 channels), DDIM on LDM's scaled-linear schedule."""
    from diffusers import LDMPipeline, UNet2DModel, VQModel

    torch.manual_seed(0)
    vqvae = VQModel(in_channels=3, out_channels=3, block_out_channels=(8, 8), latent_channels=3,
                    down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                    norm_num_groups=4, num_vq_embeddings=32, sample_size=8, scaling_factor=0.5)
    unet = UNet2DModel(sample_size=4, in_channels=3, out_channels=3, block_out_channels=(8, 16), layers_per_block=1,
                       down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                       up_block_types=("AttnUpBlock2D", "UpBlock2D"), norm_num_groups=4)
    scheduler = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.0015, beta_end=0.0195, clip_sample=False)
    LDMPipeline(vqvae=vqvae, unet=unet, scheduler=scheduler).save_pretrained(folder)
    return str(folder)
