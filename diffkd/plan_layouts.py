"""Real-size network configs for the memory plan, written out so that nothing is downloaded.

Each layout is the denoiser's diffusers config as the hub's ``unet/config.json`` or ``transformer/config.json``
states it (SD 1.5, SDXL base 1.0, SD3-medium, FLUX.1-dev, SANA 1600M 1024 px), the inputs one pass takes, and the parameter counts of
the frozen parts that stay on the device but never run in a training step (VAE, text encoders): those are only
counted, at the frozen precision, since the conditioning is encoded once before training. ``LoRA_TARGETS`` are the
layers a LoRA student adapts: LCM-LoRA's for UNets, the attention projections for transformers.
"""

from __future__ import annotations

from dataclasses import dataclass, field

UNET_LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2",
                     "conv1", "conv2", "conv_shortcut", "downsamplers.0.conv", "upsamplers.0.conv", "time_emb_proj")
TRANSFORMER_LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj",
                            "to_add_out")


@dataclass(frozen=True)
class Layout:
    name: str
    family: str  # unet | unet2d | sd3 | flux | sana
    config: dict
    tokens: int  # text tokens of the conditioning
    frozen_parameters: dict = field(default_factory=dict)  # VAE and text encoders: counted, never run

    @property
    def lora_targets(self) -> tuple[str, ...]:
        return UNET_LORA_TARGETS if self.family in ("unet", "unet2d") else TRANSFORMER_LORA_TARGETS


SD15 = Layout("sd15", "unet", {
    "sample_size": 64, "in_channels": 4, "out_channels": 4, "cross_attention_dim": 768, "attention_head_dim": 8,
    "block_out_channels": [320, 640, 1280, 1280], "layers_per_block": 2}, 77,
    {"vae": 83_653_863, "text_encoder": 123_060_480})

SDXL = Layout("sdxl", "unet", {
    "sample_size": 128, "in_channels": 4, "out_channels": 4, "cross_attention_dim": 2048,
    "block_out_channels": [320, 640, 1280], "layers_per_block": 2, "attention_head_dim": [5, 10, 20],
    "transformer_layers_per_block": [1, 2, 10], "use_linear_projection": True,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "addition_embed_type": "text_time", "addition_time_embed_dim": 256,
    "projection_class_embeddings_input_dim": 2816}, 77,
    {"vae": 83_653_863, "text_encoder": 123_060_480, "text_encoder_2": 694_659_840})

SD3_MEDIUM = Layout("sd3-medium", "sd3", {
    "sample_size": 128, "patch_size": 2, "in_channels": 16, "out_channels": 16, "num_layers": 24,
    "attention_head_dim": 64, "num_attention_heads": 24, "joint_attention_dim": 4096, "caption_projection_dim": 1536,
    "pooled_projection_dim": 2048, "pos_embed_max_size": 192}, 333,
    {"vae": 83_819_683, "text_encoder": 123_650_304, "text_encoder_2": 694_659_840, "text_encoder_3": 4_762_310_656})

FLUX_DEV = Layout("flux-dev", "flux", {
    "patch_size": 1, "in_channels": 64, "num_layers": 19, "num_single_layers": 38, "attention_head_dim": 128,
    "num_attention_heads": 24, "joint_attention_dim": 4096, "pooled_projection_dim": 768, "guidance_embeds": True,
    "axes_dims_rope": [16, 56, 56]}, 512,
    {"vae": 83_819_683, "text_encoder": 123_060_480, "text_encoder_2": 4_762_310_656})

SANA_1600M = Layout("sana-1600m", "sana", {  # Sana_1600M_1024px: 20 linear-attention blocks, 32x32 DC-AE latents
    "in_channels": 32, "out_channels": 32, "num_attention_heads": 70, "attention_head_dim": 32, "num_layers": 20,
    "num_cross_attention_heads": 20, "cross_attention_head_dim": 112, "cross_attention_dim": 2240,
    "caption_channels": 2304, "mlp_ratio": 2.5, "sample_size": 32, "patch_size": 1}, 300,
    {"vae": 362_893_923, "text_encoder": 2_614_341_888})  # AutoencoderDC's default (SANA's f32c32), Gemma-2 2B

LAYOUTS = {layout.name: layout for layout in (SD15, SDXL, SD3_MEDIUM, FLUX_DEV, SANA_1600M)}
