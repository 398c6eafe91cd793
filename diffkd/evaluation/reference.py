"""The real image set as features and Gaussian statistics, computed once and cached.

The cache key is the data set (for a folder: its files' names, sizes and times), the feature network (by its
weights' hash) and the image size and channels, so a changed folder or network never reuses stale statistics.
A cache file is also a valid ``reference``: it holds mu and sigma (float64) and the features (for KID).
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from diffkd.data import DIGITS_SIZES, check_fit, load_images
from diffkd.errors import DiffkdError
from diffkd.evaluation.features import FeatureNetwork, to_uint8
from diffkd.evaluation.frechet import frechet_distance, gaussian_stats
from diffkd.glyphs import HELDOUT_FRACTION, glyph_set

log = logging.getLogger(__name__)

GLYPHS_REFERENCE = 5000  # real glyphs: train and held-out splits in their true proportions, seed 0


@dataclass
class RealSet:
    """Features (None for a statistics-only file) and their float64 mean and covariance."""

    source: str
    num_images: int
    mu: torch.Tensor
    sigma: torch.Tensor
    features: torch.Tensor | None
    cache_file: str

    def frechet_distance(self, generated: torch.Tensor) -> float:
        """FD between generated images' features and this set."""
        return frechet_distance(*gaussian_stats(generated), self.mu, self.sigma)


def auto_feature(reference: str) -> str:
    """The feature network 'auto' means: the shipped classifier for digits or glyphs, the one a statistics file
    was made with, Inception otherwise."""
    if reference == "digits":
        return "digits-classifier"
    if reference == "glyphs":
        return "glyphs-classifier"
    if reference.endswith(".safetensors") and Path(reference).expanduser().is_file():
        with safe_open(str(Path(reference).expanduser()), "pt") as handle:
            return (handle.metadata() or {}).get("feature", "inception")
    return "inception"


REFERENCE_FIX = ("pass --reference (eval.reference) with real images like the pipeline's (a folder, or a statistics "
                 "file made from one) and --feature inception or a TorchScript network")


def check_reference(reference: str, feature: str, size: int, channels: int) -> None:
    """The real set exists and fits the pipeline's images, and so does the feature network: checked before any
    weights are looked for, so a missing folder is named as such, and digits never score 32 px RGB images."""
    if feature == "digits-classifier" and (channels != 1 or size > max(DIGITS_SIZES)):
        raise DiffkdError(f"the digits classifier (eval.feature) scores grey digits of at most {max(DIGITS_SIZES)} px, "
                          f"but the pipeline makes {size}x{size} {'RGB' if channels == 3 else f'{channels}-channel'} "
                          f"images: {REFERENCE_FIX}")
    if reference == "glyphs":
        if (size, channels) != (32, 3):
            raise DiffkdError(f"eval.reference 'glyphs' holds 32x32 RGB images but the pipeline makes {size}x{size} "
                              f"{'RGB' if channels == 3 else f'{channels}-channel'} images: {REFERENCE_FIX}")
        return
    if reference.endswith(".safetensors"):
        path = Path(reference).expanduser()
        if not path.is_file():
            raise DiffkdError(f"eval.reference {reference!r}: statistics file not found")
        with safe_open(str(path), "pt") as handle:
            meta = handle.metadata() or {}
        made = (meta.get("size"), meta.get("channels"))
        if None not in made and made != (str(size), str(channels)):
            raise DiffkdError(f"eval.reference {reference!r} holds statistics of {made[0]} px {made[1]}-channel "
                              f"images but the pipeline makes {size} px {channels}-channel ones: {REFERENCE_FIX}")
        return
    if reference != "digits" and not Path(reference).expanduser().exists():
        raise DiffkdError(f"eval.reference {reference!r} does not exist: pass 'digits', a folder of real images or a "
                          "statistics .safetensors file")
    check_fit(reference, size, channels, False, False, "eval.reference", REFERENCE_FIX)


def default_cache_dir() -> Path:
    return Path("~/.cache/diffkd").expanduser()


def _dataset_id(reference: str) -> str:
    if reference == "digits":
        return "digits (scikit-learn, bilinear-resized)"
    if reference == "glyphs":
        return f"glyphs-32 (diffkd.glyphs, {GLYPHS_REFERENCE} images, seed 0)"
    folder = Path(reference).expanduser().resolve()
    if not folder.is_dir():
        raise DiffkdError(f"eval.reference {reference!r} is not 'digits', an image folder or a .safetensors file")
    listing = sorted((str(p.relative_to(folder)), p.stat().st_size, p.stat().st_mtime_ns)
                     for p in folder.rglob("*") if p.is_file())
    return f"{folder} #{hashlib.sha256(json.dumps(listing).encode()).hexdigest()[:16]}"


def cache_path(reference: str, feature: FeatureNetwork, size: int, channels: int, cache_dir: Path) -> Path:
    """Where the statistics of ``reference`` under ``feature`` at ``size`` x ``size`` x ``channels`` are cached."""
    key = json.dumps([_dataset_id(reference), feature.name, feature.weights_sha256, size, channels])
    slug = re.sub(r"[^A-Za-z0-9]+", "-", f"{Path(reference).name}-{Path(feature.name).stem}").strip("-")
    return cache_dir / "stats" / f"{slug}-{size}px-{channels}c-{hashlib.sha256(key.encode()).hexdigest()[:12]}.safetensors"


def load_real_set(reference: str, feature: FeatureNetwork, size: int, channels: int, cache_dir: Path,
                  batch_size: int = 500, resize: bool = False, convert: bool = False) -> RealSet:
    """Features and statistics of the real set, from the cache when present; ``resize`` / ``convert`` adapt a set of
    another size or colour as data.resize / data.convert do (a set that fits is read the same either way)."""
    if reference.endswith(".safetensors"):
        return _from_file(Path(reference).expanduser(), feature, reference)
    path = cache_path(reference, feature, size, channels, cache_dir)
    if path.is_file():
        log.info("real-set statistics from cache %s", path)
        return _from_file(path, feature, reference)
    images = glyphs_reference() if reference == "glyphs" else load_images(reference, size, channels, resize,
                                                                               convert)
    features = torch.cat([feature(to_uint8(batch).to(_device(feature))) for batch in images.split(batch_size)])
    mu, sigma = gaussian_stats(features)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({"mu": mu, "sigma": sigma, "features": features.float()}, str(path), metadata={
        "reference": reference, "feature": feature.name, "feature_sha256": feature.weights_sha256,
        "size": str(size), "channels": str(channels)})
    log.info("cached real-set statistics of %d images in %s", len(features), path)
    return RealSet(reference, len(features), mu, sigma, features, str(path))


def glyphs_reference() -> torch.Tensor:
    """Real glyphs as generation from every combination would give them: a tenth from the held-out split."""
    heldout = round(HELDOUT_FRACTION * GLYPHS_REFERENCE)
    return torch.cat([glyph_set(GLYPHS_REFERENCE - heldout, 0, "train").images,
                      glyph_set(heldout, 0, "heldout").images])


def _device(feature: FeatureNetwork) -> torch.device:
    return next(iter(feature.module.parameters()), torch.empty(0)).device


def _from_file(path: Path, feature: FeatureNetwork, reference: str) -> RealSet:
    if not path.is_file():
        raise DiffkdError(f"eval.reference {reference!r}: statistics file not found")
    with safe_open(str(path), "pt") as handle:
        meta = handle.metadata() or {}
    if meta.get("feature_sha256", feature.weights_sha256) != feature.weights_sha256:
        raise DiffkdError(f"eval.reference {reference!r} holds statistics of feature network {meta.get('feature')!r}, "
                          f"not of {feature.name!r}: set eval.feature to match or use the image set")
    tensors = load_file(str(path))
    if "mu" not in tensors or "sigma" not in tensors:
        raise DiffkdError(f"eval.reference {reference!r} has no 'mu'/'sigma' tensors: pass a statistics file "
                          "written by diffkd eval (in its cache folder)")
    features = tensors["features"].double() if "features" in tensors else None
    num = len(features) if features is not None else int(meta.get("num_images", 0))
    return RealSet(meta.get("reference", reference), num, tensors["mu"].double(), tensors["sigma"].double(),
                   features, str(path))
