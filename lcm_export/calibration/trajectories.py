"""Calibration data from real LCM trajectories: the U-Net's inputs at exactly the steps a bundle runs, and the VAE
decoder's input at the end of each.

The float bundle runs its own loop (the runtime's ``Pipeline`` with a step observer) on each calibration prompt,
at the bundle's timesteps, guidance and size; every U-Net call's feeds are recorded as they were run, so a CFG
bundle contributes both halves of its batch, and the last step's denoised latents are recorded as the decoder's
feeds. Samples are written to a cache folder keyed by the U-Net variant's hashes and the settings, one ``.npz``
per call, and read back one at a time: a second export with the same model and settings reuses them, and the
quantiser's data reader never holds more than one sample in memory.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from lcm_export.runtime.cache import cache_root
from lcm_export.runtime.pipeline import Pipeline, StepEvent


@dataclass(frozen=True)
class TrajectorySettings:
    """What the recorded trajectories run: the prompts, steps, guidance and size the bundle will be used at."""

    prompts: tuple[str, ...]
    steps: int
    guidance_scale: float
    height: int
    width: int
    seed: int = 0

    def key(self, unet_identity: str) -> str:
        text = json.dumps([unet_identity, asdict(self)], sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:24]


def unet_identity(pipe: Pipeline) -> str:
    """The recorded inputs depend on every component before the U-Net and on the U-Net itself (later steps)."""
    hashes = {entry.path: entry.sha256 for entry in pipe.manifest.files}
    parts = [hashes.get(path, path) for choice in pipe.variants.values() for path in choice.artifact.files]
    return hashlib.sha256("".join(parts).encode()).hexdigest()


@dataclass(frozen=True)
class Trajectories:
    """The recorded samples, in order: one per U-Net call, and one VAE decoder input per prompt."""

    unet: list[Path]
    vae_decoder: list[Path]


def record_trajectories(
    pipe: Pipeline,
    settings: TrajectorySettings,
    folder: Path | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> Trajectories:
    """Run the loop on every prompt and save each U-Net call's feeds and the decoder's feeds at the end.

    ``folder`` defaults to the user cache (``calibration/<key>``); complete sets found there are reused as they are.
    """
    folder = folder or cache_root() / "calibration" / settings.key(unet_identity(pipe))
    done = folder / "complete.json"
    if done.is_file():
        names = json.loads(done.read_text())
        if isinstance(names, dict) and all((folder / name).is_file() for group in names.values() for name in group):
            return _listed(folder, names)
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    names: dict[str, list[str]] = {"unet": [], "vae_decoder": []}

    def save(group: str, feeds: dict[str, np.ndarray]) -> None:
        name = f"{'sample' if group == 'unet' else 'decoder'}-{len(names[group]):05d}.npz"
        np.savez(folder / name, **{key: np.asarray(value) for key, value in feeds.items()})
        names[group].append(name)

    def record(event: StepEvent) -> None:
        save("unet", event.feeds)
        if event.index == settings.steps - 1:  # the last step's denoised latents are what the decoder reads
            save("vae_decoder", pipe.denoiser.decoder_feeds(event.denoised))

    for index, prompt in enumerate(settings.prompts):
        pipe(
            prompt,
            num_inference_steps=settings.steps,
            guidance_scale=settings.guidance_scale,
            height=settings.height,
            width=settings.width,
            seed=settings.seed + index,
            observer=record,
        )
        if progress is not None:
            progress(index + 1, len(settings.prompts))
    done.write_text(json.dumps(names))
    return _listed(folder, names)


def _listed(folder: Path, names: dict[str, list[str]]) -> Trajectories:
    """The sample files of ``folder`` by group, as ``complete.json`` names them."""
    return Trajectories(*([folder / name for name in names[group]] for group in ("unet", "vae_decoder")))


def load_sample(path: Path) -> dict[str, np.ndarray]:
    """One recorded sample's feeds (a U-Net call's, the scalar timestep of older bundles as its 0-d array; or the
    decoder's)."""
    with np.load(path) as data:
        return {key: data[key] for key in data.files}
