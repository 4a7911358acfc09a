"""Calibration data from real LCM trajectories: the U-Net's inputs at exactly the steps a bundle runs.

The float bundle runs its own loop (the runtime's ``Pipeline`` with a step observer) on each calibration prompt,
at the bundle's timesteps, guidance and size; every U-Net call's feeds are recorded as they were run, so a CFG
bundle contributes both halves of its batch. Samples are written to a cache folder keyed by the U-Net variant's
hashes and the settings, one ``.npz`` per call, and read back one at a time: a second export with the same model
and settings reuses them, and the quantiser's data reader never holds more than one sample in memory.
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
    parts = [hashes.get(path, path) for variant in pipe.variants.values() for path in variant.files]
    return hashlib.sha256("".join(parts).encode()).hexdigest()


def record_trajectories(
    pipe: Pipeline,
    settings: TrajectorySettings,
    folder: Path | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> list[Path]:
    """Run the loop on every prompt and save each U-Net call's feeds; returns the sample files, in order.

    ``folder`` defaults to the user cache (``calibration/<key>``); complete sets found there are reused as they are.
    """
    folder = folder or cache_root() / "calibration" / settings.key(unet_identity(pipe))
    done = folder / "complete.json"
    if done.is_file():
        names = json.loads(done.read_text())
        if all((folder / name).is_file() for name in names):
            return [folder / name for name in names]
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    names: list[str] = []

    def record(event: StepEvent) -> None:
        name = f"sample-{len(names):05d}.npz"
        np.savez(folder / name, **{key: np.asarray(value) for key, value in event.feeds.items()})
        names.append(name)

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
    return [folder / name for name in names]


def load_sample(path: Path) -> dict[str, np.ndarray]:
    """One recorded U-Net call's feeds (the scalar timestep as its 0-d array)."""
    with np.load(path) as data:
        return {key: data[key] for key in data.files}
