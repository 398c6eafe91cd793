"""The one place that finds pretrained weight files, and never downloads them.

Libraries (torchvision, torch-fidelity, transformers) fetch missing weights on construction: offline that is a
traceback wall, on a slow network a hang. So every caller asks here first: an explicit path, else the torch hub
cache (``~/.cache/torch/hub/checkpoints/``) or the Hugging Face cache. A missing file is one DiffkdError line naming
the file, where to put it and where to get it.
"""

from __future__ import annotations

import hashlib
from functools import lru_cache
from pathlib import Path

import torch

from diffkd.errors import DiffkdError

# File names are the libraries' own, so a file placed in the hub cache is also what they would load.
_FIDELITY_RELEASE = "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/"
INCEPTION = ("weights-inception-2015-12-05-6726825d.pth", _FIDELITY_RELEASE + "weights-inception-2015-12-05-6726825d.pth")
TORCHVISION = {
    "alex": ("alexnet-owt-7be5be79.pth", "https://download.pytorch.org/models/alexnet-owt-7be5be79.pth"),
    "vgg": ("vgg16-397923af.pth", "https://download.pytorch.org/models/vgg16-397923af.pth"),
    "squeeze": ("squeezenet1_1-b8a52dc0.pth", "https://download.pytorch.org/models/squeezenet1_1-b8a52dc0.pth"),
}


def hub_checkpoints_dir() -> Path:
    """Where torch.hub (and so torchvision and torch-fidelity) keeps downloaded checkpoints."""
    return Path(torch.hub.get_dir()) / "checkpoints"


def locate_checkpoint(filename: str, url: str, explicit: str | None, purpose: str, option: str) -> Path:
    """``explicit`` if given (it must exist), else ``filename`` in the torch hub cache; else one-line DiffkdError.

    ``purpose`` says what needs the file ("LPIPS (alex)"), ``option`` how to pass a path ("--lpips-backbone-weights").
    """
    if explicit:
        path = Path(explicit).expanduser()
        if not path.is_file():
            raise DiffkdError(f"{purpose}: weights file {explicit!r} ({option}) does not exist; expected {filename} "
                              f"from {url}")
        return path
    path = hub_checkpoints_dir() / filename
    if path.is_file():
        return path
    raise DiffkdError(f"{purpose} needs {filename}, which is not in {hub_checkpoints_dir()}/: download {url} there "
                      f"(or pass its path with {option})")


def locate_hf_model(name_or_path: str, purpose: str, option: str) -> str:
    """A local folder as is, else the cached snapshot folder of hub id ``name_or_path``; never downloads."""
    folder = Path(name_or_path).expanduser()
    if folder.is_dir():
        return str(folder)
    from huggingface_hub import try_to_load_from_cache
    from huggingface_hub.errors import HFValidationError

    try:
        config = try_to_load_from_cache(name_or_path, "config.json")
    except HFValidationError:  # a path that does not exist, not a hub id
        config = None
    if isinstance(config, str):
        return str(Path(config).parent)
    raise DiffkdError(f"{purpose} needs the model {name_or_path!r}, which is neither a folder nor in the Hugging Face "
                      f"cache: run `hf download {name_or_path}` where there is network, or pass a local folder with "
                      f"{option}")


@lru_cache(maxsize=32)
def file_sha256(path: str) -> str:
    """The SHA-256 of a weights file (the report's protocol names weights by it)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
