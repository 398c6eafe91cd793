"""Feature networks for Fréchet/kernel distances: uint8 images N x C x H x W in, N x D float features out.

Inception (FID's network, via torchmetrics) means little on 16x16 grey digits, so the embedded digits set gets its
own small classifier, trained by ``python -m diffkd.evaluation.features train-digits-classifier`` and shipped in
``diffkd/assets``; its distance is reported as "FD (digits classifier)", never as FID.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from diffkd.data import load_digits
from diffkd.errors import DiffkdError
from diffkd.eval_options import unknown_feature
from diffkd.evaluation.glyphs_classifier import GLYPHS_CLASSIFIER, GlyphsFeatures, load_glyphs_classifier
from diffkd.evaluation.random_features import RANDOM_CONV_SEED, LatentRandomConvFeatures, RandomConvFeatures
from diffkd.weights import INCEPTION, file_sha256, locate_checkpoint

log = logging.getLogger(__name__)

DIGITS_CLASSIFIER = Path(__file__).resolve().parent.parent / "assets" / "digits-classifier.safetensors"
DIGITS_SIZE = 16
LATENT_RANDOM_CONV = "latent-random-conv"  # in-run validation only: the evaluation scores decoded images


@dataclass
class FeatureNetwork:
    """A feature extractor and the facts the report's protocol needs about it."""

    name: str
    label: str  # how the distance is named in reports: "FID" only for Inception
    module: nn.Module
    weights_sha256: str
    resize: str
    details: dict = field(default_factory=dict)
    latents: bool = False  # reads a latent teacher's latents, not decoded uint8 images

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """Features of uint8 images (of latents where ``latents``), float64 on the CPU."""
        return self.module(images).double().cpu()


class DigitsClassifier(nn.Module):
    """A small CNN for 16x16 digits: two conv stages, a 64-d feature layer, ten logits."""

    def __init__(self, feature_dim: int = 64):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
            nn.Linear(64 * 4 * 4, feature_dim), nn.ReLU())
        self.head = nn.Linear(feature_dim, 10)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


class DigitsFeatures(nn.Module):
    """uint8 images -> grey in [-1, 1] at 16x16 (bilinear, antialiased) -> the classifier's feature layer."""

    def __init__(self, classifier: DigitsClassifier):
        super().__init__()
        self.classifier = classifier.eval()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.float() / 127.5 - 1
        if x.shape[1] != 1:
            x = x.mean(1, keepdim=True)
        if x.shape[-2:] != (DIGITS_SIZE, DIGITS_SIZE):
            x = F.interpolate(x, size=(DIGITS_SIZE, DIGITS_SIZE), mode="bilinear", antialias=True,
                              align_corners=False)
        return self.classifier.features(x)


class InceptionFeatures(nn.Module):
    """torchmetrics' FID Inception (2048-d pool features); grey images are repeated to three channels."""

    def __init__(self, weights: str):
        super().__init__()
        from torchmetrics.image.fid import NoTrainInceptionV3

        self.inception = NoTrainInceptionV3(name="inception-v3-compat", features_list=["2048"],
                                            feature_extractor_weights_path=weights)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.shape[1] == 1:
            images = images.repeat(1, 3, 1, 1)
        return self.inception(images)


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """Images in [-1, 1] to uint8, rounded (not truncated) as FID implementations expect."""
    return ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def load_feature_network(name: str, device: str | torch.device = "cpu",
                         inception_weights: str | None = None) -> FeatureNetwork:
    """The network called ``name``: 'digits-classifier', 'glyphs-classifier', 'random-conv', 'inception' or a
    TorchScript file."""
    if name == "digits-classifier":
        return _digits(device)
    if name == "glyphs-classifier":
        return _glyphs(device)
    if name == "random-conv":
        return _random_conv(device)
    if name == "inception":
        filename, url = INCEPTION
        path = locate_checkpoint(filename, url, inception_weights, "FID (Inception)",
                                 "--feature-weights (eval.feature_weights)")
        return FeatureNetwork("inception", "FID", InceptionFeatures(str(path)).to(device).eval(),
                              file_sha256(str(path)), "bilinear antialiased to 299x299 (torchmetrics)")
    path = Path(name).expanduser()
    if not path.is_file():
        raise unknown_feature(name)
    module = torch.jit.load(str(path), map_location=device).eval()
    return FeatureNetwork(str(path), f"FD ({path.stem})", module, file_sha256(str(path)), "done by the module")


def _digits(device: str | torch.device) -> FeatureNetwork:
    from safetensors.torch import load_file, safe_open

    if not DIGITS_CLASSIFIER.is_file():
        raise DiffkdError(f"the digits classifier {DIGITS_CLASSIFIER} is missing: run `python -m "
                          "diffkd.evaluation.features train-digits-classifier` to make it")
    classifier = DigitsClassifier()
    classifier.load_state_dict(load_file(str(DIGITS_CLASSIFIER)))
    with safe_open(str(DIGITS_CLASSIFIER), "pt") as handle:
        details = json.loads(handle.metadata()["details"])
    return FeatureNetwork("digits-classifier", "FD (digits classifier)", DigitsFeatures(classifier).to(device).eval(),
                          file_sha256(str(DIGITS_CLASSIFIER)), "grey, bilinear antialiased to 16x16", details)


def _random_conv(device: str | torch.device) -> FeatureNetwork:
    module = RandomConvFeatures().to(device).eval()
    return FeatureNetwork("random-conv", "FD (random conv)", module, _parameters_sha256(module),
                          "RGB (grey repeated), bilinear antialiased to 16x16", {"seed": RANDOM_CONV_SEED})


def latent_random_conv(channels: int, device: str | torch.device = "cpu") -> FeatureNetwork:
    """The seeded random network on ``channels``-channel latents (``LatentRandomConvFeatures``)."""
    module = LatentRandomConvFeatures(channels).to(device).eval()
    return FeatureNetwork(LATENT_RANDOM_CONV, "FD (random conv on latents)", module, _parameters_sha256(module),
                          "latents as they are, bilinear antialiased to 16x16", {"seed": RANDOM_CONV_SEED,
                                                                                  "channels": channels}, latents=True)


def _parameters_sha256(module: nn.Module) -> str:
    """A seeded network's identity: the hash of its weights (it has no file)."""
    return hashlib.sha256(b"".join(p.detach().cpu().numpy().tobytes() for p in module.parameters())).hexdigest()


def _glyphs(device: str | torch.device) -> FeatureNetwork:
    classifier, details = load_glyphs_classifier(device)
    return FeatureNetwork("glyphs-classifier", "FD (glyphs classifier)", GlyphsFeatures(classifier).eval(),
                          file_sha256(str(GLYPHS_CLASSIFIER)), "RGB, bilinear antialiased to 32x32", details)


def train_digits_classifier(seed: int = 0, epochs: int = 30, test_fraction: float = 0.2
                            ) -> tuple[DigitsClassifier, dict]:
    """Train on a seeded split of the 16x16 digits, quantised to uint8 as generated images will be.

    Random one-pixel shifts keep the features from keying on exact positions. Returns the model and its
    details (test accuracy on the held-out split, the recipe).
    """
    from sklearn.datasets import load_digits as sklearn_digits

    torch.manual_seed(seed)
    images = to_uint8(load_digits(DIGITS_SIZE)).float() / 127.5 - 1
    labels = torch.tensor(sklearn_digits().target)
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))
    num_test = round(test_fraction * len(images))
    test, train = order[:num_test], order[num_test:]
    model = DigitsClassifier()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    for _ in range(epochs):
        model.train()
        for batch in train[torch.randperm(len(train))].split(64):
            shift = torch.randint(-1, 2, (2,)).tolist()
            x = torch.roll(images[batch], shifts=shift, dims=(2, 3))
            loss = F.cross_entropy(model(x), labels[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    model.eval()
    with torch.no_grad():
        accuracy = (model(images[test]).argmax(1) == labels[test]).float().mean().item()
    details = {"test_accuracy": round(accuracy, 4), "num_train": len(train), "num_test": num_test, "seed": seed,
               "epochs": epochs, "image_size": DIGITS_SIZE,
               "command": "python -m diffkd.evaluation.features train-digits-classifier"}
    return model, details


def main(argv: list[str] | None = None) -> int:
    """``python -m diffkd.evaluation.features train-digits-classifier [--output FILE]``."""
    from safetensors.torch import save_file

    parser = argparse.ArgumentParser(prog="python -m diffkd.evaluation.features")
    commands = parser.add_subparsers(dest="command", required=True)
    train = commands.add_parser("train-digits-classifier", help="train the digits feature network and save it")
    train.add_argument("--output", default=str(DIGITS_CLASSIFIER))
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--epochs", type=int, default=30)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    model, details = train_digits_classifier(args.seed, args.epochs)
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    save_file(model.state_dict(), args.output, metadata={"details": json.dumps(details)})
    log.info("saved %s (test accuracy %.4f)", args.output, details["test_accuracy"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
