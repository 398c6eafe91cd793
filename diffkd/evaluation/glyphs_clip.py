"""A small CLIP for glyphs-32 (Radford et al. 2021): image and text towers trained contrastively on glyphs captions.

The real ViT-L/14 cannot be downloaded here and knows nothing of 32 px glyphs, so CLIP score for glyphs pipelines
comes from this one: its own weights, trained by ``python -m diffkd.evaluation.glyphs_clip`` on the training split
only (independent of any teacher's text encoder), shipped as a transformers ``CLIPModel`` folder in
``diffkd/assets/glyphs-clip`` that the CLIP score code loads like any real CLIP. Its tokenizer is word-level BPE
over the caption vocabulary: merges learnt here until every caption word is one token.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import re
import time
from collections import Counter
from pathlib import Path

import torch
import torch.nn.functional as F

from diffkd.glyphs import CHARACTERS, COLOUR_NAMES, FAMILIES, STYLES, TEMPLATES, caption_attributes, glyph_set

log = logging.getLogger(__name__)

GLYPHS_CLIP = Path(__file__).resolve().parent.parent / "assets" / "glyphs-clip"
COMMAND = "python -m diffkd.evaluation.glyphs_clip"
MAX_TOKENS = 24  # the longest caption is 13 words + start and end
BOS, EOS = "<|startoftext|>", "<|endoftext|>"


def caption_words() -> list[str]:
    """Every word a glyphs caption can hold, lower-cased and split as CLIP's pre-tokenizer splits them."""
    text = " ".join([*TEMPLATES, "letter digit", *COLOUR_NAMES, *FAMILIES, *STYLES, *CHARACTERS])
    return sorted(set(re.findall(r"[a-z]+|[0-9]|[^\sa-z0-9{}]", re.sub(r"\{\w+\}", " ", text.lower()))))


def learn_merges(words: list[str]) -> list[tuple[str, str]]:
    """Byte-pair merges (Sennrich et al. 2016), most frequent pair first, until each word is one token."""
    pieces = {w: [*w[:-1], w[-1] + "</w>"] for w in words}
    merges = []
    while True:
        pairs = Counter(pair for split in pieces.values() for pair in itertools.pairwise(split))
        if not pairs:
            return merges
        best = min(pairs, key=lambda pair: (-pairs[pair], pair))
        merges.append(best)
        for word, split in pieces.items():
            merged, i = [], 0
            while i < len(split):
                if split[i:i + 2] == list(best):
                    merged.append(split[i] + split[i + 1])
                    i += 2
                else:
                    merged.append(split[i])
                    i += 1
            pieces[word] = merged


def glyphs_tokenizer():
    """A ``CLIPTokenizer`` whose vocabulary is the characters, the merges and the two special tokens."""
    from transformers import CLIPTokenizer

    words = caption_words()
    merges = learn_merges(words)
    letters = sorted({c for w in words for c in w})
    tokens = [BOS, EOS, *letters, *[c + "</w>" for c in letters], *[a + b for a, b in merges]]
    vocab = {token: i for i, token in enumerate(dict.fromkeys(tokens))}
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=MAX_TOKENS)


def glyphs_clip_model(vocab_size: int):
    """Towers of width 64: a 3-layer ViT on 4 px patches of 32 px images, a 2-layer text transformer."""
    from transformers import CLIPConfig, CLIPModel

    return CLIPModel(CLIPConfig(
        text_config={"vocab_size": vocab_size, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                     "num_attention_heads": 4, "max_position_embeddings": MAX_TOKENS, "bos_token_id": 0,
                     "eos_token_id": 1, "pad_token_id": 1},
        vision_config={"image_size": 32, "patch_size": 4, "hidden_size": 64, "intermediate_size": 128,
                       "num_hidden_layers": 3, "num_attention_heads": 4},
        projection_dim=64))


def image_processor():
    """32 px, pixels scaled to [-1, 1] (mean = std = 0.5): the same input the towers were trained on."""
    from transformers import CLIPImageProcessor

    return CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32},
                              image_mean=[0.5] * 3, image_std=[0.5] * 3)


def embed(model, tokenizer, images: torch.Tensor, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Unit-norm image and text embeddings; ``images`` in [-1, 1] at 32 px (what the image processor yields)."""
    tokens = tokenizer(captions, padding="max_length", max_length=MAX_TOKENS, truncation=True, return_tensors="pt")
    image = model.visual_projection(model.vision_model(pixel_values=images).pooler_output)
    text = model.text_projection(model.text_model(**tokens).pooler_output)
    return F.normalize(image, dim=-1), F.normalize(text, dim=-1)


def contrastive_loss(image: torch.Tensor, text: torch.Tensor, scale: torch.Tensor, same: torch.Tensor
                     ) -> torch.Tensor:
    """CLIP's symmetric cross-entropy over the batch's similarity matrix, with every caption of the same
    (character, colour, background) as a positive: captions often repeat in a batch and are not negatives."""
    logits = scale * image @ text.T
    target = same.float() / same.sum(1, keepdim=True)
    return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2


def attribute_rows(captions: list[str]) -> torch.Tensor:
    """Each caption's (character, foreground, background) as one integer, for equality tests."""
    index = {c: i for i, c in enumerate(sorted({caption_attributes(c) for c in captions}))}
    return torch.tensor([index[caption_attributes(c)] for c in captions])


@torch.no_grad()
def retrieval_accuracy(model, tokenizer, count: int, seed: int, split: str = "heldout", group: int = 100
                       ) -> dict[str, float]:
    """Top-1 retrieval in groups of ``group`` fresh pairs: image -> caption and caption -> image, a hit when the
    retrieved one names the same character and colours (chance is about 1/group)."""
    data = glyph_set(count, seed, split)
    hits = {"image_to_text": [], "text_to_image": []}
    for start in range(0, count - group + 1, group):
        captions = data.captions[start:start + group]
        image, text = embed(model, tokenizer, data.images[start:start + group], captions)
        same = attribute_rows(captions)
        similarity = image @ text.T
        hits["image_to_text"].append(same[similarity.argmax(1)] == same)
        hits["text_to_image"].append(same[similarity.argmax(0)] == same)
    return {name: round(float(torch.cat(h).float().mean()), 4) for name, h in hits.items()}


def train_glyphs_clip(seed: int = 0, num_train: int = 20_000, epochs: int = 8, batch_size: int = 256,
                      num_heldout: int = 2000):
    """Train both towers from scratch; returns the model, its tokenizer and the details to record."""
    started = time.perf_counter()
    torch.manual_seed(seed)
    tokenizer = glyphs_tokenizer()
    model = glyphs_clip_model(len(tokenizer))
    data = glyph_set(num_train, seed, "train")
    images = ((data.images + 1) * 127.5).round() / 127.5 - 1  # uint8-quantised, as generated images will be
    combos = attribute_rows(data.captions)
    log.info("rendered %d training pairs in %.0f s", num_train, time.perf_counter() - started)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)
    steps = epochs * (num_train // batch_size)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=1e-3, total_steps=steps, pct_start=0.1)
    model.train()
    for epoch in range(epochs):
        for batch in torch.randperm(num_train)[:steps // epochs * batch_size].split(batch_size):
            x = images[batch] + 0.05 * torch.randn_like(images[batch])
            image, text = embed(model, tokenizer, x, [data.captions[i] for i in batch])
            loss = contrastive_loss(image, text, model.logit_scale.exp().clamp(max=100),
                                    combos[batch, None] == combos[None, batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
        log.info("epoch %d: last loss %.4f", epoch + 1, loss.item())
    model.eval()
    details = {"heldout_retrieval": retrieval_accuracy(model, tokenizer, num_heldout, seed + 1),
               "retrieval_group": 100, "num_train": num_train, "num_heldout": num_heldout, "seed": seed,
               "epochs": epochs, "train_seconds": round(time.perf_counter() - started), "command": COMMAND,
               "parameters": sum(p.numel() for p in model.parameters())}
    return model, tokenizer, details


def save_glyphs_clip(model, tokenizer, details: dict, folder: Path) -> None:
    """A CLIP folder that ``CLIPModel`` / ``CLIPProcessor.from_pretrained`` load offline, with its details."""
    from transformers import CLIPProcessor

    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    CLIPProcessor(image_processor=image_processor(), tokenizer=tokenizer).save_pretrained(folder)
    (folder / "details.json").write_text(json.dumps(details, indent=2) + "\n")


def main(argv: list[str] | None = None) -> int:
    """``python -m diffkd.evaluation.glyphs_clip [--output DIR] [--seed N]``: train and save the glyphs CLIP."""
    parser = argparse.ArgumentParser(prog=COMMAND, description="train the glyphs CLIP and save it")
    parser.add_argument("--output", default=str(GLYPHS_CLIP))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num-train", type=int, default=20_000)
    parser.add_argument("--epochs", type=int, default=8)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    model, tokenizer, details = train_glyphs_clip(args.seed, args.num_train, args.epochs)
    save_glyphs_clip(model, tokenizer, details, Path(args.output))
    log.info("saved %s: held-out retrieval %s", args.output, details["heldout_retrieval"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
