"""Text-to-image metrics for glyphs-32: the shipped attribute classifier and CLIP meet their held-out accuracies,
prompt accuracy and CLIP score agree with hand-made cases, and the guidance sweep counts its UNet passes."""

import numpy
import pytest
import torch
from PIL import Image

from diffkd import glyphs
from diffkd.errors import DiffkdError
from diffkd.eval_options import EvalConfig
from diffkd.evaluation import clip as clip_module
from diffkd.evaluation import evaluate
from diffkd.evaluation.clip import auto_clip_model, clip_score_metric, locate_clip
from diffkd.evaluation.glyphs_classifier import accuracy, load_glyphs_classifier, read_attributes
from diffkd.evaluation.glyphs_clip import caption_words, glyphs_tokenizer, retrieval_accuracy
from diffkd.evaluation.plan import plan_metrics
from diffkd.evaluation.prompt_accuracy import prompt_accuracy

# The accuracies the shipped networks are held to, on glyphs of held-out combinations (fresh seeds).
CLASSIFIER_TARGET = {"character": 0.95, "foreground": 0.99, "background": 0.99}
CLIP_RETRIEVAL_TARGET = 0.6  # top-1 among 100 held-out pairs; chance is about 0.01


def caption(combination: tuple[str, str, str]) -> str:
    character, foreground, background = combination
    return f"a {foreground} letter {character} on a {background} background"


HELDOUT = min(c for c in glyphs.heldout_combinations() if c[0].isalpha())
TRAIN = next(c for c in [("K", "red", "blue"), ("B", "white", "black")] if c not in glyphs.heldout_combinations())


def test_shipped_classifier_reads_heldout_combinations():
    classifier, details = load_glyphs_classifier()
    measured = accuracy(classifier, 300, seed=7, split="heldout")
    for name, target in CLASSIFIER_TARGET.items():
        assert measured[name] >= target, (name, measured)
        assert details["heldout_accuracy"][name] >= target


def test_shipped_clip_retrieves_heldout_pairs():
    from transformers import CLIPModel, CLIPTokenizer

    folder = locate_clip("glyphs-clip")
    model, tokenizer = CLIPModel.from_pretrained(folder).eval(), CLIPTokenizer.from_pretrained(folder)
    measured = retrieval_accuracy(model, tokenizer, 300, seed=7)
    assert measured["image_to_text"] >= CLIP_RETRIEVAL_TARGET and measured["text_to_image"] >= CLIP_RETRIEVAL_TARGET


def test_every_caption_word_is_one_token():
    tokenizer = glyphs_tokenizer()
    for word in caption_words():
        assert len(tokenizer(word)["input_ids"]) == 3, word  # start, the word, end
    assert tokenizer("K in red on blue")["input_ids"] == tokenizer("k in red on blue")["input_ids"]


def test_clip_score_prefers_the_right_caption_for_the_same_image():
    data = glyphs.glyph_set(8, seed=5, split="heldout")
    images = ((data.images + 1) * 127.5).round().to(torch.uint8)
    wrong = []
    for text in data.captions:
        _character, foreground, background = glyphs.caption_attributes(text)
        other = next(c for c in glyphs.COLOUR_NAMES if c not in (foreground, background))
        wrong.append(text.replace(foreground, other, 1))
    right_score, wrong_score = clip_score_metric("glyphs-clip"), clip_score_metric("glyphs-clip")
    right_score.update(images, data.captions)
    wrong_score.update(images, wrong)
    assert float(right_score.compute()) > float(wrong_score.compute()) + 20  # measured: 83.6 vs 30.1


def test_prompt_accuracy_of_a_hand_made_table():
    prompts = [caption(TRAIN), caption(TRAIN), caption(HELDOUT), caption(HELDOUT), caption(TRAIN)]
    asked = [TRAIN, TRAIN, HELDOUT, HELDOUT, TRAIN]
    shown = [asked[0],                                   # train: all right
             (asked[1][0], asked[1][2], asked[1][2]),     # train: foreground wrong
             asked[2],                                    # held out: all right
             ("Z" if asked[3][0] != "Z" else "Y", *asked[3][1:]),  # held out: character wrong
             ("0", "black" if asked[4][1] != "black" else "white", asked[4][2])]  # train: character and fg wrong
    read = {"character": torch.tensor([glyphs.CHARACTERS.index(s[0]) for s in shown]),
            "foreground": torch.tensor([glyphs.COLOUR_NAMES.index(s[1]) for s in shown]),
            "background": torch.tensor([glyphs.COLOUR_NAMES.index(s[2]) for s in shown])}
    result = prompt_accuracy(read, prompts)
    assert result["train"] == {"count": 3, "character": 2 / 3, "foreground": 1 / 3, "background": 1.0, "all": 1 / 3}
    assert result["heldout"] == {"count": 2, "character": 0.5, "foreground": 1.0, "background": 1.0, "all": 0.5}
    assert prompt_accuracy(read, [caption(TRAIN)] * 5)["heldout"] is None


def test_plan_reads_glyphs_prompts_and_picks_the_shipped_clip():
    glyph_prompts = [caption(TRAIN)]
    plan = plan_metrics(EvalConfig(reference="glyphs"), True, True, True, glyph_prompts)
    assert plan.prompt_accuracy and plan.clip_model == "glyphs-clip" and plan.feature == "glyphs-classifier"
    plan = plan_metrics(EvalConfig(), True, True, True, ["a cat"])
    assert not plan.prompt_accuracy and plan.prompt_accuracy_off == "off (not every prompt names a character and two " \
                                                                    "colours)"
    assert plan.clip_model == "openai/clip-vit-large-patch14" == auto_clip_model("auto", "digits")
    with pytest.raises(DiffkdError, match="eval.prompt_accuracy=true but there is not every prompt names"):
        plan_metrics(EvalConfig(prompt_accuracy=True), True, True, True, ["a cat"])


def test_missing_glyphs_clip_is_one_line_naming_the_command(monkeypatch, tmp_path):
    monkeypatch.setattr(clip_module, "GLYPHS_CLIP", tmp_path / "glyphs-clip")
    with pytest.raises(DiffkdError, match=r"missing from .*glyphs-clip: run `python -m diffkd.evaluation.glyphs_clip`"):
        locate_clip("glyphs-clip")


def grid_samples(path, count: int) -> torch.Tensor:
    """The tiny pipeline's 8 px samples back from a grid strip (tiles upscaled x8, nearest)."""
    strip = torch.from_numpy(numpy.array(Image.open(path)))
    return strip.permute(2, 0, 1).reshape(3, 64, count, 64).permute(2, 0, 1, 3)[:, :, ::8, ::8].contiguous()


def test_guidance_sweep_counts_unet_passes_and_scores_prompts(tiny_sd, tmp_path):
    real = tmp_path / "real"
    real.mkdir()
    for index in range(4):
        Image.new("RGB", (8, 8), color=(60 * index, 90, 30)).save(real / f"{index}.png")
    prompts = [caption(TRAIN), caption(HELDOUT)]
    config = EvalConfig(pipelines=[tiny_sd], steps=[1, 2], samplers=["ddim"], reference_steps=3, num_samples=4,
                        batch_size=4, grid_size=4, prompts=prompts, guidance_scale=2.0, guidance_scales=[1.0, 2.0],
                        reference=str(real), feature="glyphs-classifier", clip_model="glyphs-clip", lpips=False,
                        kid_subsets=2, cache_dir=str(tmp_path / "cache"), output=str(tmp_path / "out"))
    results = evaluate(config)
    passes = {(r["steps"], r["guidance_scale"], r["is_reference"]): r["unet_passes"] for r in results.rows}
    assert passes == {(3, 2.0, True): 6, (1, 1.0, False): 1, (1, 2.0, False): 2, (2, 1.0, False): 2,
                      (2, 2.0, False): 4}
    classifier, _ = load_glyphs_classifier()
    for row in results.rows:
        samples = grid_samples(tmp_path / "out" / row["grid"], 4)
        expected = prompt_accuracy(read_attributes(classifier, samples), [prompts[i % 2] for i in range(4)])
        assert row["prompt_accuracy"] == expected and row["clip_score"] is not None
    markdown = (tmp_path / "out" / "report.md").read_text()
    assert "## Text-to-image: prompt accuracy and CLIP score" in markdown and "| ddim | 2 | 2 | 4 |" in markdown
    assert (tmp_path / "out" / "fd_vs_clip.png").is_file() and (tmp_path / "out" / "prompt_grid.png").is_file()
