"""A cache of (noise, teacher sample) pairs for generator distillation (Luhman & Luhman 2021, "synthetic data").

Generating the teacher's many-step samples is the expensive half of generator distillation, so it is done once and
kept: sharded safetensors files plus a JSON manifest, each rewritten atomically (temp file + rename, shard before
manifest), so a killed generation loses at most the shard in flight and continues where it stopped.

The noise of pair i is a pure function of (seed, i), shards always start at multiples of the shard size and are
sampled in the same batches, so a resumed or extended cache holds exactly what an uninterrupted run would. The
manifest's key (teacher, its weights' fingerprint, sampler, steps, seed, shape, prompts, guidance) decides whether a
folder can be reused by another run; a mismatch is an error, never a silent mix.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import json
import logging
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from diffkd.conditioning import batch_conditioning, encode_rows, read_prompts
from diffkd.errors import DiffkdError
from diffkd.io import LoadedPipeline, check_device, load_pipeline
from diffkd.models import Conditioning
from diffkd.sampling import SAMPLERS, teacher_sample

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
FORMAT = 1


@dataclass(frozen=True)
class CacheKey:
    """Everything that determines the pairs; two runs with equal keys can share a cache."""

    teacher: str
    fingerprint: str
    sampler: str
    steps: int
    seed: int
    shape: tuple[int, ...]
    guidance_scale: float = 1.0
    prompts: tuple[str, ...] = field(default_factory=tuple)

    def as_json(self) -> dict:
        return json.loads(json.dumps(asdict(self)))

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(self.as_json(), sort_keys=True).encode()).hexdigest()[:16]


def teacher_key(teacher: LoadedPipeline, sampler: str, steps: int, seed: int, guidance_scale: float = 1.0,
                prompts: tuple[str, ...] = ()) -> CacheKey:
    if sampler not in SAMPLERS:
        raise DiffkdError(f"teacher sampler must be one of {', '.join(SAMPLERS)}; got {sampler!r}")
    if not 1 <= steps <= teacher.denoiser.num_train_timesteps:
        raise DiffkdError(f"teacher steps must be in [1, {teacher.denoiser.num_train_timesteps}]; got {steps}")
    if teacher.text_conditioned and not prompts:
        raise DiffkdError("the teacher is text-conditioned: give prompts (data.prompts / --prompts-file)")
    return CacheKey(teacher.source, fingerprint(teacher.unet), sampler, steps, seed,
                    teacher.latent_shape, float(guidance_scale) if prompts else 1.0,
                    tuple(prompts))


def fingerprint(module: torch.nn.Module) -> str:
    """A cheap identity of a network's weights: names, shapes and the first values of every tensor."""
    digest = hashlib.sha256()
    for name, tensor in module.state_dict().items():
        head = tensor.detach().flatten()[:256].float().cpu().contiguous()
        digest.update(f"{name}{tuple(tensor.shape)}".encode())
        digest.update(head.numpy().tobytes())
    return digest.hexdigest()[:16]


def pair_noise(seed: int, start: int, count: int, shape: tuple[int, ...]) -> torch.Tensor:
    """The noise of pairs start..start+count-1; pair i's noise depends on (seed, i) only.

    numpy's SeedSequence takes (seed, i) as entropy whole; torch's CPU generator keeps only 32 bits of its seed,
    so any packing of (seed, i) into one torch seed would make different seeds collide."""
    return torch.stack([torch.from_numpy(np.random.default_rng([seed, i]).standard_normal(shape, dtype=np.float32))
                        for i in range(start, start + count)])


class SampleCache:
    """One cache folder: its key, shard size and batch size (fixed at creation) and the shards written so far."""

    def __init__(self, folder: str | Path, key: CacheKey, shard_size: int = 1000, batch_size: int = 250):
        if shard_size < 1 or batch_size < 1:
            raise DiffkdError(f"shard size and batch size must be >= 1; got {shard_size}, {batch_size}")
        self.folder = Path(folder).expanduser()
        self.key = key
        self.shards: list[dict] = []
        self.shard_size, self.batch_size = shard_size, batch_size
        manifest = self.folder / MANIFEST
        if manifest.is_file():
            self._read(manifest)

    def _read(self, path: Path) -> None:
        try:
            data = json.loads(path.read_text())
            stored, shards = data["key"], data["shards"]
            self.shard_size, self.batch_size = int(data["shard_size"]), int(data["batch_size"])
        except (ValueError, KeyError, TypeError) as error:
            raise DiffkdError(f"{str(path)!r} is not a diffkd sample-cache manifest ({error}): delete the folder "
                              "or choose another cache folder") from None
        if stored != self.key.as_json():
            changed = sorted(k for k in set(stored) | set(self.key.as_json()) if stored.get(k) != self.key.as_json()
                             .get(k))
            raise DiffkdError(f"sample cache {str(self.folder)!r} holds pairs made with different {', '.join(changed)}: "
                              "choose another cache folder or delete this one")
        self.shards = [s for s in shards if (self.folder / s["file"]).is_file()]

    @property
    def count(self) -> int:
        """Pairs in complete, contiguous shards."""
        total = 0
        for shard in self.shards:
            if shard["start"] != total:
                break
            total += shard["count"]
        return total

    def generate(self, teacher: LoadedPipeline, num_samples: int, progress: bool = True) -> SampleCache:
        """Add pairs until ``num_samples`` exist; a partial last shard is redone whole, so shards stay aligned."""
        if self.count >= num_samples:
            return self
        self.folder.mkdir(parents=True, exist_ok=True)
        kept = [s for s in self.shards if s["count"] == self.shard_size and s["start"] + s["count"] <= self.count]
        self.shards = kept
        cond_rows = self._conditioning(teacher)
        bar = tqdm(total=num_samples, initial=self.count, desc="teacher samples", unit="pair", disable=not progress,
                   dynamic_ncols=True)
        while self.count < num_samples:
            start = self.count
            count = min(self.shard_size, num_samples - start)
            tensors = self._sample_shard(teacher, start, count, cond_rows, bar)
            name = f"shard-{start // self.shard_size:05d}.safetensors"
            _atomic(self.folder / name, lambda tmp, t=tensors: save_file(t, str(tmp)))
            self.shards.append({"file": name, "start": start, "count": count})
            self._write_manifest()
        bar.close()
        log.info("sample cache %s: %d pairs", self.folder, self.count)
        return self

    def _sample_shard(self, teacher: LoadedPipeline, start: int, count: int, cond_rows: dict, bar) -> dict:
        device = teacher.unet.device
        noise, samples = [], []
        for offset in range(0, count, self.batch_size):
            first, size = start + offset, min(self.batch_size, count - offset)
            z = pair_noise(self.key.seed, first, size, self.key.shape)
            cond = self._batch_conditioning(cond_rows, first, size, device)
            samples.append(teacher_sample(teacher, z.to(device), self.key.sampler, self.key.steps, cond).float().cpu())
            noise.append(z)
            bar.update(size)
        tensors = {"noise": torch.cat(noise), "sample": torch.cat(samples),
                   "index": torch.arange(start, start + count, dtype=torch.int64)}
        if self.key.prompts:
            tensors["prompt_index"] = tensors["index"] % len(self.key.prompts)
        return tensors

    def _conditioning(self, teacher: LoadedPipeline) -> dict[str, torch.Tensor]:
        if not self.key.prompts:
            return {}
        return encode_rows(teacher, self.key.prompts, len(self.key.prompts))

    def _batch_conditioning(self, rows: dict, first: int, size: int, device) -> Conditioning | None:
        if not rows:
            return None
        index = torch.arange(first, first + size) % len(self.key.prompts)
        return batch_conditioning({k: v[index].to(device) for k, v in rows.items()}, self.key.guidance_scale)

    def _write_manifest(self) -> None:
        data = {"format": FORMAT, "key": self.key.as_json(), "shard_size": self.shard_size,
                "batch_size": self.batch_size, "count": self.count, "shards": self.shards}
        _atomic(self.folder / MANIFEST, lambda tmp: tmp.write_text(json.dumps(data, indent=1)))

    def load(self, num_samples: int | None = None) -> dict[str, torch.Tensor]:
        """The first ``num_samples`` pairs (all by default) as tensors: noise, sample, index[, prompt_index]."""
        wanted = self.count if num_samples is None else num_samples
        if wanted > self.count:
            raise DiffkdError(f"sample cache {str(self.folder)!r} has {self.count} pairs, {wanted} wanted: generate "
                              "more (`diffkd teacher-samples ... --num-samples N`)")
        parts, total = [], 0
        for shard in self.shards:
            if total >= wanted:
                break
            parts.append(load_file(str(self.folder / shard["file"])))
            total += shard["count"]
        return {k: torch.cat([p[k] for p in parts])[:wanted] for k in parts[0]} if parts else {}


def _atomic(path: Path, write) -> None:
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)


@contextlib.contextmanager
def _locked(folder: Path):
    """One writer per cache folder (data-parallel ranks and concurrent runs wait for each other)."""
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / ".lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def default_folder(key: CacheKey) -> Path:
    """Where a cache lives when no folder is given: reused by every run with the same key."""
    root = Path(os.environ.get("DIFFKD_CACHE", "~/.cache/diffkd")).expanduser()
    return root / "teacher-samples" / key.digest()


def ensure(teacher: LoadedPipeline, num_samples: int, sampler: str = "ddim", steps: int = 32, seed: int = 0,
           folder: str | Path | None = None, batch_size: int = 250, shard_size: int = 1000,
           prompts: tuple[str, ...] = (), guidance_scale: float = 1.0, progress: bool = True) -> SampleCache:
    """The cache for this teacher and sampler with at least ``num_samples`` pairs, generating what is missing."""
    key = teacher_key(teacher, sampler, steps, seed, guidance_scale, tuple(prompts))
    folder = Path(folder).expanduser() if folder else default_folder(key)
    with _locked(folder):
        cache = SampleCache(folder, key, shard_size, batch_size)
        if cache.count < num_samples:
            log.info("generating %d teacher samples (%s, %d steps) into %s", num_samples - cache.count, sampler,
                     steps, folder)
        return cache.generate(teacher, num_samples, progress)


def run(args: argparse.Namespace) -> int:
    """The ``diffkd teacher-samples`` command (its options are in diffkd.cli)."""
    for option, value in (("--num-samples", args.num_samples), ("--steps", args.steps),
                          ("--batch-size", args.batch_size), ("--shard-size", args.shard_size)):
        if value < 1:
            raise DiffkdError(f"{option} must be >= 1; got {value}")
    if Path(args.output).is_file():
        raise DiffkdError(f"--output {args.output!r} is a file: pass a folder path")
    check_device(args.device, "--device")
    prompts = tuple(read_prompts((), args.prompts_file, "--prompts-file"))
    teacher = load_pipeline(args.teacher, device=args.device)
    teacher.unet.requires_grad_(False).eval()
    if not teacher.text_conditioned and (prompts or args.guidance_scale != 1):
        option = "--prompts-file" if prompts else "--guidance-scale"
        raise DiffkdError(f"{option} is for text-conditioned teachers; {args.teacher!r} is unconditional (no text "
                          f"encoder): drop {option}")
    cache = ensure(teacher, args.num_samples, args.sampler, args.steps, args.seed, args.output, args.batch_size,
                   args.shard_size, prompts, args.guidance_scale)
    print(f"{cache.count} pairs in {cache.folder}")
    return 0


def pair_rows(teacher: LoadedPipeline, options, prompts: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """The teacher's (noise, sample) pairs that ``options`` (a method's num_samples, teacher_sampler, teacher_steps,
    sample_seed, cache, cache_batch_size, cache_shard_size, guidance_scale) ask for, made or completed in the cache
    first, with each pair's prompt conditioning for a text teacher: the rows generator and DMD regress on."""
    o = options
    cache = ensure(teacher, o.num_samples, o.teacher_sampler, o.teacher_steps, o.sample_seed, o.cache or None,
                   o.cache_batch_size, o.cache_shard_size, prompts, o.guidance_scale)
    pairs = cache.load(o.num_samples)
    rows = {"noise": pairs["noise"], "sample": pairs["sample"]}
    if prompts:
        encoded = encode_rows(teacher, prompts, len(prompts))
        rows.update({k: v[pairs["prompt_index"]] for k, v in encoded.items()})
    return rows
