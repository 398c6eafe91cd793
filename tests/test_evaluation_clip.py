"""CLIPScore for a text-conditioned pipeline, on a tiny CLIP built here (the real ViT-L/14 is not obtainable)."""

import json

import numpy
import pytest
import torch
from PIL import Image
from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

from diffkd.errors import DiffkdError
from diffkd.evaluation import EvalConfig, evaluate

PROMPTS = ["a cat", "a dog", "a red box"]


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory) -> str:
    folder = tmp_path_factory.mktemp("tiny-clip")
    letters = "abcdefghijklmnopqrstuvwxyz"
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1, **{c: 2 + i for i, c in enumerate(letters)},
             **{c + "</w>": 28 + i for i, c in enumerate(letters)}}
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=16)
    images = CLIPImageProcessor(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16})
    torch.manual_seed(0)
    model = CLIPModel(CLIPConfig(
        text_config={"vocab_size": len(vocab), "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
                     "num_attention_heads": 2, "max_position_embeddings": 16, "bos_token_id": 0, "eos_token_id": 1,
                     "pad_token_id": 1},
        vision_config={"image_size": 16, "patch_size": 8, "hidden_size": 16, "intermediate_size": 32,
                       "num_hidden_layers": 1, "num_attention_heads": 2},
        projection_dim=8))
    model.save_pretrained(folder)
    CLIPProcessor(image_processor=images, tokenizer=tokenizer).save_pretrained(folder)
    return str(folder)


class PixelFeatures(torch.nn.Module):
    """uint8 N x 3 x 8 x 8 -> a random 4-d projection of the pixels."""

    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(192, 4)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.linear(images.float().flatten(1) / 255)


@pytest.fixture(scope="module")
def rgb_real(tmp_path_factory) -> dict:
    """8 px RGB real images like the tiny SD pipeline's, and a TorchScript feature network for them (the digits
    classifier is refused for RGB images)."""
    folder = tmp_path_factory.mktemp("rgb-real")
    for index in range(6):
        Image.new("RGB", (8, 8), color=(40 * index, 64, 200 - 30 * index)).save(folder / f"{index}.png")
    torch.manual_seed(0)
    network = torch.jit.script(PixelFeatures())
    network.save(str(folder.parent / "features.pt"))
    return {"reference": str(folder), "feature": str(folder.parent / "features.pt")}


def clip_score_by_hand(folder: str, images: torch.Tensor, prompts: list[str]) -> float:
    """max(100 * mean cosine(image embedding, text embedding), 0), as Hessel et al. define CLIPScore."""
    model, processor = CLIPModel.from_pretrained(folder), CLIPProcessor.from_pretrained(folder)
    with torch.no_grad():
        pixels = processor(images=list(images), return_tensors="pt")["pixel_values"]
        image = model.visual_projection(model.vision_model(pixel_values=pixels).pooler_output)
        tokens = processor(text=prompts, return_tensors="pt", padding=True)
        text = model.text_projection(model.text_model(**tokens).pooler_output)
    cosine = torch.nn.functional.cosine_similarity(image, text, dim=-1)
    return max(float(100 * cosine.mean()), 0.0)


def test_clip_score_of_a_text_pipeline_equals_the_definition_on_its_samples(tiny_sd, tiny_clip, rgb_real,
                                                                             tmp_path):
    config = EvalConfig(pipelines=[tiny_sd], steps=[1], samplers=["ddim"], reference_steps=2, num_samples=4,
                        batch_size=4, grid_size=4, prompts=PROMPTS, guidance_scale=2.0, clip_model=tiny_clip,
                        lpips=False, cache_dir=str(tmp_path / "cache"), kid_subsets=2, output=str(tmp_path / "out"),
                        **rgb_real)
    results = evaluate(config)
    assert results.protocol["clip_score"].startswith("on:") and results.protocol["guidance_scale"] == 2.0
    assert len(results.rows) == 2
    for row in results.rows:
        # num_samples == grid_size: the grid strip (8 px tiles upscaled x8, nearest) holds every sample
        strip = torch.from_numpy(numpy.array(Image.open(tmp_path / "out" / row["grid"])))
        samples = strip.permute(2, 0, 1).reshape(3, 64, 4, 64).permute(2, 0, 1, 3)[:, :, ::8, ::8].contiguous()
        score = clip_score_by_hand(tiny_clip, samples, [PROMPTS[i % 3] for i in range(4)])
        assert score > 0  # not clamped to zero: the comparison means something
        assert row["clip_score"] == pytest.approx(score, rel=1e-4)


def test_text_pipeline_without_prompts_or_clip_is_one_line(tiny_sd, rgb_real, tmp_path):
    with pytest.raises(DiffkdError, match="no prompts were given"):
        evaluate(EvalConfig(pipelines=[tiny_sd], steps=[1], samplers=["ddim"], num_samples=2,
                            cache_dir=str(tmp_path), **rgb_real))
    with pytest.raises(DiffkdError, match="'nobody/clip'.*hf download nobody/clip"):
        evaluate(EvalConfig(pipelines=[tiny_sd], steps=[1], samplers=["ddim"], num_samples=2, prompts=["a cat"],
                            clip_model="nobody/clip", cache_dir=str(tmp_path), **rgb_real))
