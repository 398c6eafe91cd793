"""The glyphs-32 text-to-image teacher: a tokenizer that knows every caption word, the two train-teacher stages (VAE
and a seeded text encoder; then the caption-conditioned UNet trained with that text encoder, or beside a frozen
pretrained one) exporting a StableDiffusionPipeline, their losses against hand computations, captions paired with
their own images, and the shipped teachers/glyphs-32 sampling offline."""

import copy
from pathlib import Path

import pytest
import torch
from diffusers import StableDiffusionPipeline
from transformers import CLIPModel, CLIPTokenizer

from diffkd import glyphs, text_pipeline
from diffkd.api import distill
from diffkd.config import parse_config
from diffkd.data import load_training_set
from diffkd.evaluation import glyphs_clip
from diffkd.io import load_pipeline
from diffkd.methods.text_denoise import TextDenoisingTraining
from diffkd.methods.vae import VaeTraining

ROOT = Path(__file__).resolve().parent.parent
SHIPPED = ROOT / "teachers" / "glyphs-32"
TINY_GLYPHS = {"source": "glyphs", "num_glyphs": 6, "resize": True}  # rendered at the tiny pipelines' 8 px


@pytest.fixture(autouse=True)
def glyph_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("DIFFKD_CACHE", str(tmp_path / "cache"))


def test_word_vocabulary_makes_each_word_one_token_by_hand():
    vocab, merges = text_pipeline.word_vocabulary(["ab", "abc", "b", "ba"])
    # "ab" needs (a, b</w>); "abc" then (a, b) and (ab, c</w>); "b" is whole; "ba" needs (b, a</w>)
    assert merges == [("a", "b</w>"), ("a", "b"), ("ab", "c</w>"), ("b", "a</w>")]
    tokenizer = CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=8)
    ids = tokenizer("ab abc b ba").input_ids
    assert tokenizer.convert_ids_to_tokens(ids) == ["<|startoftext|>", "ab</w>", "abc</w>", "b</w>", "ba</w>",
                                                    "<|endoftext|>"]


def test_every_caption_word_is_one_known_token_and_survives_saving(tmp_path):
    tokenizer = text_pipeline.build_tokenizer(text_pipeline.caption_words(), 20)
    tokenizer.save_pretrained(tmp_path / "tokenizer")
    reloaded = CLIPTokenizer.from_pretrained(tmp_path / "tokenizer")
    captions = [g.caption for g in glyphs.glyphs(600, seed=5) + glyphs.glyphs(200, seed=5, split="heldout")]
    for caption in captions:
        ids = tokenizer(caption).input_ids
        words = tokenizer.backend_tokenizer.pre_tokenizer.pre_tokenize_str(caption.lower())
        assert len(ids) == len(words) + 2 <= 20, caption
        assert tokenizer.unk_token_id not in ids[1:-1], caption
        assert reloaded(caption).input_ids == ids


def _method(kind, teacher, **options):
    config = parse_config({"method": {"name": kind.name, **options}, "data": TINY_GLYPHS})
    return kind(config, teacher, copy.deepcopy(teacher.unet).requires_grad_(True))


def test_text_denoise_loss_is_the_epsilon_mse_with_captions_dropped_by_hand(tiny_sd):
    teacher = load_pipeline(tiny_sd)
    method = _method(TextDenoisingTraining, teacher, caption_dropout=0.5)
    torch.manual_seed(0)
    vocabulary = teacher.pipeline.tokenizer.vocab_size
    batch = {"x0": torch.randn(6, 4, 4, 4), "input_ids": torch.randint(0, vocabulary, (6, 8)),
             "uncond_input_ids": torch.randint(0, vocabulary, (1, 8)).expand(6, -1)}
    loss = method.loss("student", batch, torch.Generator().manual_seed(3)).total

    draws = torch.Generator().manual_seed(3)
    t = torch.randint(0, 1000, (6,), generator=draws)
    eps = torch.randn(6, 4, 4, 4, generator=draws)
    dropped = torch.rand(6, generator=draws) < 0.5
    assert 0 < dropped.sum() < 6  # both kinds of row occur, so the check below sees the dropout
    ids = torch.stack([batch["uncond_input_ids" if d else "input_ids"][i] for i, d in enumerate(dropped)])
    hidden = teacher.pipeline.text_encoder(ids)[0]
    alpha_bar = teacher.scheduler.alphas_cumprod[t].view(-1, 1, 1, 1)
    z = alpha_bar.sqrt() * batch["x0"] + (1 - alpha_bar).sqrt() * eps
    expected = (method.student(z, t, encoder_hidden_states=hidden).sample - eps).pow(2).mean()
    torch.testing.assert_close(loss, expected)
    loss.backward()  # the text encoder is trained with the UNet
    assert method.text_encoder.get_input_embeddings().weight.grad.abs().sum() > 0
    assert set(method.networks()) == {"student", "text_encoder"}


def _small_clip(folder: Path) -> Path:
    """A random glyphs CLIP saved as the glyphs_clip module saves its trained one."""
    tokenizer = glyphs_clip.glyphs_tokenizer()
    torch.manual_seed(0)
    glyphs_clip.save_glyphs_clip(glyphs_clip.glyphs_clip_model(len(tokenizer)), tokenizer, {}, folder)
    return folder


def test_a_pretrained_text_encoder_is_frozen_and_shipped_with_its_own_tokenizer(tiny_sd, tmp_path):
    clip = _small_clip(tmp_path / "clip")
    options = {"name": "text-denoise", "components": tiny_sd, "text_encoder": str(clip), "num_steps": 2,
               "block_out_channels": [8, 16], "attention_head_dim": 2}
    config = parse_config({"method": options, "data": TINY_GLYPHS, "train": {"batch_size": 4, "device": "cpu"}})
    template = TextDenoisingTraining.template(config)
    method = TextDenoisingTraining(config, template, template.unet.requires_grad_(True))
    assert set(method.networks()) == {"student"}
    tokens = method._token_ids(["a red letter K on a blue background"])
    method.loss("student", {"x0": torch.randn(1, 4, 4, 4), "input_ids": tokens,
                            "uncond_input_ids": method._token_ids([""])}, torch.Generator()).total.backward()
    assert all(p.grad is None for p in method.text_encoder.parameters())

    pipe = StableDiffusionPipeline.from_pretrained(distill(config, tmp_path / "teacher"))
    clip_weights = CLIPModel.from_pretrained(clip).state_dict()
    for name, weight in pipe.text_encoder.state_dict().items():
        assert torch.equal(weight, clip_weights[f"text_model.{name}"]), name
    assert pipe.tokenizer.get_vocab() == CLIPTokenizer.from_pretrained(clip).get_vocab()
    assert pipe.unet.config.cross_attention_dim == 64
    images = pipe("a red letter K on a blue background", num_inference_steps=2, output_type="np").images
    assert images.shape == (1, 8, 8, 3)


def test_the_pooled_caption_reaches_the_timestep_embedding():
    unet = text_pipeline.build_unet(4, 4, [8, 16], 1, 16, 2, [False, True], text_time_embedding=True)
    assert unet.config.addition_embed_type == "text"
    torch.manual_seed(0)
    z, t = torch.randn(1, 4, 4, 4), torch.tensor([500])
    text = torch.randn(1, 6, 16)
    with torch.no_grad():
        plain = unet.get_time_embed(z, t)
        embedded = unet.time_embedding(plain) + unet.add_embedding(text)
        hooked = []
        handle = unet.down_blocks[0].resnets[0].time_emb_proj.register_forward_hook(
            lambda module, inputs, output: hooked.append(inputs[0]))
        unet(z, t, encoder_hidden_states=text)
        handle.remove()
    torch.testing.assert_close(hooked[0], torch.nn.functional.silu(embedded))


def test_vae_loss_is_l1_plus_weighted_kl_by_hand(tiny_sd):
    method = _method(VaeTraining, load_pipeline(tiny_sd), kl_weight=0.25)
    x = torch.rand(3, 3, 8, 8) * 2 - 1
    terms = method.loss("vae", {"x0": x}, torch.Generator().manual_seed(1))

    posterior = method.vae.encode(x).latent_dist
    mean, logvar = posterior.mean, posterior.logvar
    noise = torch.randn(mean.shape, generator=torch.Generator().manual_seed(1))
    reconstruction = method.vae.decode(mean + torch.exp(0.5 * logvar) * noise).sample
    kl = 0.5 * (mean.pow(2) + logvar.exp() - 1 - logvar).sum(dim=(1, 2, 3)).mean()
    torch.testing.assert_close(terms.total, (reconstruction - x).abs().mean() + 0.25 * kl)


def test_a_fresh_vae_starts_with_a_narrow_posterior_in_every_channel():
    vae = text_pipeline.build_vae(8, [4, 8], 4, 1)
    with torch.no_grad():
        posterior = vae.encode(torch.rand(16, 3, 8, 8) * 2 - 1).latent_dist
    per_channel = posterior.logvar.mean(dim=(0, 2, 3))
    torch.testing.assert_close(per_channel, torch.full((4,), text_pipeline.INITIAL_LOG_VARIANCE), atol=0.5, rtol=0)


def test_decoder_only_training_keeps_the_encoder_and_its_latents(tmp_path):
    stage1 = parse_config({"method": {"name": "vae", "num_steps": 1, "sample_size": 8, "block_out_channels": [4, 8],
                                      "text_hidden_size": 16, "text_layers": 1, "text_heads": 2, "max_tokens": 16},
                           "data": TINY_GLYPHS, "train": {"batch_size": 4, "device": "cpu"}})
    first = distill(stage1, tmp_path / "vae")
    decoder = parse_config({"method": {"name": "vae", "init_from": str(first), "decoder_only": True, "num_steps": 2,
                                       "sample_size": 8, "text_hidden_size": 16, "text_layers": 1, "text_heads": 2,
                                       "max_tokens": 16},
                            "data": TINY_GLYPHS, "train": {"batch_size": 4, "device": "cpu", "learning_rate": 1e-2}})
    tuned = distill(decoder, tmp_path / "decoder")
    before = StableDiffusionPipeline.from_pretrained(first).vae
    after = StableDiffusionPipeline.from_pretrained(tuned).vae
    for part in ("encoder", "quant_conv"):
        for a, b in zip(getattr(before, part).parameters(), getattr(after, part).parameters(), strict=True):
            assert torch.equal(a, b)
    assert not all(torch.equal(a, b) for a, b in zip(before.decoder.parameters(), after.decoder.parameters()))
    assert after.config.scaling_factor == before.config.scaling_factor  # the same latents, the same scale


def test_decoder_only_without_a_vae_to_keep_is_refused():
    with pytest.raises(Exception, match="decoder_only needs method.init_from"):
        parse_config({"method": {"name": "vae", "decoder_only": True}})


def test_vae_export_sets_the_scaling_factor_to_unit_latent_variance(tiny_sd, monkeypatch):
    method = _method(VaeTraining, load_pipeline(tiny_sd))
    images = torch.rand(10, 3, 8, 8) * 2 - 1
    monkeypatch.setattr(method, "_images", lambda: images)
    spec = method.export_spec()
    with torch.no_grad():
        latents = method.vae.encode(images).latent_dist.mean
    assert spec.component == "vae"
    assert method.vae.config.scaling_factor == pytest.approx(1 / latents.std().item(), rel=1e-5)
    scaled = latents * method.vae.config.scaling_factor
    assert scaled.std().item() == pytest.approx(1.0, rel=1e-5)


def test_each_caption_reaches_the_batch_beside_its_own_image(tiny_sd, tmp_path, monkeypatch):
    seen = []
    original = TextDenoisingTraining.loss

    def spy(self, phase, batch, generator):
        seen.append({k: v.clone() for k, v in batch.items()})
        return original(self, phase, batch, generator)

    monkeypatch.setattr(TextDenoisingTraining, "loss", spy)
    config = parse_config({"method": {"name": "text-denoise", "components": tiny_sd, "num_steps": 2,
                                      "block_out_channels": [8, 16], "attention_head_dim": 2},
                           "data": TINY_GLYPHS, "train": {"batch_size": 4, "device": "cpu"}, "run_eval": False})
    distill(config, tmp_path / "run")

    parts = load_pipeline(tiny_sd)
    images, captions = load_training_set(config.data, 8, 3)
    assert len(set(captions)) == len(captions)
    tokenizer = parts.pipeline.tokenizer
    with torch.no_grad():
        latents = parts.denoiser.encode(images)
    ids = tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids
    empty = tokenizer("", padding="max_length", max_length=tokenizer.model_max_length, return_tensors="pt").input_ids
    rows = 0
    for batch in seen:
        assert (batch["uncond_input_ids"] == empty).all()
        for x0, row_ids in zip(batch["x0"], batch["input_ids"]):
            index = next(i for i in range(len(latents)) if torch.allclose(latents[i], x0, atol=1e-5))
            assert torch.equal(row_ids, ids[index]), captions[index]
            rows += 1
    assert rows == 8


@pytest.mark.slow
def test_the_two_stages_make_a_pipeline_that_samples_from_a_prompt(tmp_path):
    stage1 = parse_config({"method": {"name": "vae", "num_steps": 2, "sample_size": 8, "block_out_channels": [4, 8],
                                      "text_hidden_size": 16, "text_layers": 1, "text_heads": 2, "max_tokens": 16},
                           "data": TINY_GLYPHS, "train": {"batch_size": 4, "device": "cpu"}})
    parts = distill(stage1, tmp_path / "vae")
    more = parse_config({"method": {"name": "vae", "init_from": str(parts), "num_steps": 1, "sample_size": 8,
                                    "text_hidden_size": 16, "text_layers": 1, "text_heads": 2, "max_tokens": 16},
                         "data": TINY_GLYPHS, "train": {"batch_size": 4, "device": "cpu", "learning_rate": 1e-9}})
    continued = StableDiffusionPipeline.from_pretrained(distill(more, tmp_path / "vae-more"))
    stage2 = parse_config({"method": {"name": "text-denoise", "components": str(parts), "num_steps": 2,
                                      "block_out_channels": [8, 16], "attention_head_dim": 2},
                           "data": TINY_GLYPHS, "train": {"batch_size": 4, "device": "cpu"}})
    folder = distill(stage2, tmp_path / "teacher")

    first = StableDiffusionPipeline.from_pretrained(parts)
    pipe = StableDiffusionPipeline.from_pretrained(folder)
    assert pipe.safety_checker is None and pipe.vae.config.scaling_factor != 1.0
    assert pipe.unet.config.sample_size == 4 and pipe.vae_scale_factor == 2
    assert pipe.scheduler.config.prediction_type == "epsilon" and not pipe.scheduler.config.clip_sample
    assert pipe.scheduler.config.beta_schedule == "scaled_linear"
    for a, b in zip(first.vae.parameters(), continued.vae.parameters(), strict=True):  # init_from: a near-zero
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)  # step away from stage 1's VAE, not a fresh one
    for a, b in zip(first.text_encoder.parameters(), continued.text_encoder.parameters(), strict=True):
        assert torch.equal(a, b)  # the seeded text encoder is remade from the same seed
    for a, b in zip(first.vae.parameters(), pipe.vae.parameters(), strict=True):  # stage 2 keeps the VAE
        assert torch.equal(a, b)
    assert not torch.equal(first.text_encoder.get_input_embeddings().weight,  # and trains the
                           pipe.text_encoder.get_input_embeddings().weight)  # text encoder
    assert pipe.unet.config.addition_embed_type == "text"
    images = pipe("a red letter K on a blue background", num_inference_steps=2, guidance_scale=3.0,
                  output_type="np").images
    assert images.shape == (1, 8, 8, 3)


def test_the_shipped_teacher_loads_and_samples_offline_with_a_prompt():
    pipe = StableDiffusionPipeline.from_pretrained(SHIPPED, local_files_only=True)
    assert set(pipe.tokenizer.get_vocab()) >= {w + "</w>" for w in text_pipeline.caption_words()}
    generator = torch.Generator().manual_seed(0)
    images = pipe("a red letter K on a blue background", num_inference_steps=2, guidance_scale=3.0,
                  generator=generator, output_type="np").images
    assert images.shape == (1, 32, 32, 3) and images.min() >= 0 and images.max() <= 1
    size = sum(f.stat().st_size for f in SHIPPED.rglob("*") if f.is_file())
    assert size < 20 * 2**20


def test_offset_noise_adds_one_draw_per_image_and_channel_by_hand(tiny_sd):
    teacher = load_pipeline(tiny_sd)
    method = _method(TextDenoisingTraining, teacher, caption_dropout=0.0, noise_offset=0.3)
    ids = torch.randint(0, teacher.pipeline.tokenizer.vocab_size, (4, 8))
    batch = {"x0": torch.randn(4, 4, 4, 4), "input_ids": ids, "uncond_input_ids": ids}
    loss = method.loss("student", batch, torch.Generator().manual_seed(2)).total

    draws = torch.Generator().manual_seed(2)
    t = torch.randint(0, 1000, (4,), generator=draws)
    eps = torch.randn(4, 4, 4, 4, generator=draws) + 0.3 * torch.randn(4, 4, 1, 1, generator=draws)
    alpha_bar = teacher.scheduler.alphas_cumprod[t].view(-1, 1, 1, 1)
    z = alpha_bar.sqrt() * batch["x0"] + (1 - alpha_bar).sqrt() * eps
    hidden = teacher.pipeline.text_encoder(ids)[0]
    expected = (method.student(z, t, encoder_hidden_states=hidden).sample - eps).pow(2).mean()
    torch.testing.assert_close(loss, expected)
