"""The glyphs attribute classifier: character, foreground and background read off a 32 px RGB image.

It is the text teacher's counterpart of the digits classifier twice over: its 128-d feature layer gives "FD (glyphs
classifier)" (Inception means little on 32 px glyphs), and its three heads give prompt accuracy, the fraction of
images that show what their prompt asks (an interpretable, GenEval-style twin of CLIP score; Ghosh et al. 2023).
Trained by ``python -m diffkd.evaluation.glyphs_classifier`` on the training split only and shipped in
``diffkd/assets``; its accuracy is measured on held-out combinations it never saw.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from diffkd.errors import DiffkdError
from diffkd.glyphs import CHARACTERS, COLOUR_NAMES, glyph_set

log = logging.getLogger(__name__)

GLYPHS_CLASSIFIER = Path(__file__).resolve().parent.parent / "assets" / "glyphs-classifier.safetensors"
GLYPHS_SIZE = 32
ATTRIBUTES = {"character": len(CHARACTERS), "foreground": len(COLOUR_NAMES), "background": len(COLOUR_NAMES)}
COMMAND = "python -m diffkd.evaluation.glyphs_classifier"


class GlyphsClassifier(nn.Module):
    """Three conv stages (conv, batch norm, pool) to a 128-d feature layer, then one linear head per attribute."""

    def __init__(self, feature_dim: int = 128):
        super().__init__()

        def stage(inputs: int, outputs: int) -> list[nn.Module]:
            return [nn.Conv2d(inputs, outputs, 3, padding=1), nn.BatchNorm2d(outputs), nn.ReLU(), nn.MaxPool2d(2)]

        self.body = nn.Sequential(*stage(3, 32), *stage(32, 64), *stage(64, 128), nn.Flatten(),
                                  nn.Linear(128 * 4 * 4, feature_dim), nn.ReLU())
        self.heads = nn.ModuleDict({name: nn.Linear(feature_dim, n) for name, n in ATTRIBUTES.items()})

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        hidden = self.body(x)
        return {name: head(hidden) for name, head in self.heads.items()}


def prepare(images: torch.Tensor) -> torch.Tensor:
    """uint8 N x C x H x W -> RGB in [-1, 1] at 32 px (bilinear, antialiased), what the classifier was trained on."""
    x = images.float() / 127.5 - 1
    if x.shape[1] == 1:
        x = x.repeat(1, 3, 1, 1)
    if x.shape[-2:] != (GLYPHS_SIZE, GLYPHS_SIZE):
        x = F.interpolate(x, size=(GLYPHS_SIZE, GLYPHS_SIZE), mode="bilinear", antialias=True, align_corners=False)
    return x


class GlyphsFeatures(nn.Module):
    """uint8 images -> the classifier's feature layer (the FD feature network)."""

    def __init__(self, classifier: GlyphsClassifier):
        super().__init__()
        self.classifier = classifier.eval()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.classifier.features(prepare(images))


@torch.no_grad()
def read_attributes(classifier: GlyphsClassifier, images: torch.Tensor, batch_size: int = 500
                    ) -> dict[str, torch.Tensor]:
    """The attribute indices (into CHARACTERS / COLOUR_NAMES) the classifier reads off uint8 images."""
    device = next(classifier.parameters()).device
    parts = [classifier(prepare(batch.to(device))) for batch in images.split(batch_size)]
    return {name: torch.cat([p[name] for p in parts]).argmax(1).cpu() for name in ATTRIBUTES}


def missing_classifier() -> str:
    return f"the glyphs classifier {GLYPHS_CLASSIFIER} is missing: run `{COMMAND}` to make it there"


def load_glyphs_classifier(device: str | torch.device = "cpu") -> tuple[GlyphsClassifier, dict]:
    """The shipped classifier (eval mode) and the details recorded when it was trained."""
    from safetensors.torch import load_file, safe_open

    if not GLYPHS_CLASSIFIER.is_file():
        raise DiffkdError(missing_classifier())
    classifier = GlyphsClassifier()
    classifier.load_state_dict(load_file(str(GLYPHS_CLASSIFIER)))
    with safe_open(str(GLYPHS_CLASSIFIER), "pt") as handle:
        details = json.loads(handle.metadata()["details"])
    return classifier.to(device).eval(), details


def uint8_images(images: torch.Tensor) -> torch.Tensor:
    return ((images + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)


def accuracy(classifier: GlyphsClassifier, count: int, seed: int, split: str) -> dict[str, float]:
    """Per-attribute accuracy (and all three at once) on ``count`` fresh glyphs of ``split``."""
    data = glyph_set(count, seed, split)
    predicted = read_attributes(classifier, uint8_images(data.images))
    hits = {name: predicted[name] == data.labels[name] for name in ATTRIBUTES}
    result = {name: round(float(hit.float().mean()), 4) for name, hit in hits.items()}
    result["all"] = round(float(torch.stack(list(hits.values())).all(0).float().mean()), 4)
    return result


def train_glyphs_classifier(seed: int = 0, num_train: int = 30_000, epochs: int = 7, batch_size: int = 128,
                            num_heldout: int = 2000) -> tuple[GlyphsClassifier, dict]:
    """Train on ``num_train`` training-split glyphs (uint8-quantised, as generated images will be, with a little
    Gaussian noise so that slightly noisy samples still read); measure on held-out combinations."""
    started = time.perf_counter()
    torch.manual_seed(seed)
    data = glyph_set(num_train, seed, "train")
    images = uint8_images(data.images).float() / 127.5 - 1
    log.info("rendered %d training glyphs in %.0f s", num_train, time.perf_counter() - started)
    model = GlyphsClassifier()
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    steps = epochs * -(-num_train // batch_size)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=2e-3, total_steps=steps)
    for epoch in range(epochs):
        model.train()
        for batch in torch.randperm(num_train).split(batch_size):
            x = images[batch] + 0.05 * torch.randn_like(images[batch])
            logits = model(x)
            loss = sum(F.cross_entropy(logits[name], data.labels[name][batch]) for name in ATTRIBUTES)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
        log.info("epoch %d: last loss %.4f", epoch + 1, loss.item())
    model.eval()
    details = {"heldout_accuracy": accuracy(model, num_heldout, seed + 1, "heldout"),
               "num_train": num_train, "num_heldout": num_heldout, "seed": seed, "epochs": epochs,
               "image_size": GLYPHS_SIZE, "train_seconds": round(time.perf_counter() - started),
               "command": COMMAND}
    return model, details


def main(argv: list[str] | None = None) -> int:
    """``python -m diffkd.evaluation.glyphs_classifier [--output FILE] [--seed N]``: train and save."""
    from safetensors.torch import save_file

    parser = argparse.ArgumentParser(prog=COMMAND, description="train the glyphs attribute classifier and save it")
    parser.add_argument("--output", default=str(GLYPHS_CLASSIFIER))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num-train", type=int, default=30_000)
    parser.add_argument("--epochs", type=int, default=7)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    model, details = train_glyphs_classifier(args.seed, args.num_train, args.epochs)
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    save_file(model.state_dict(), args.output, metadata={"details": json.dumps(details)})
    log.info("saved %s: held-out accuracy %s", args.output, details["heldout_accuracy"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
