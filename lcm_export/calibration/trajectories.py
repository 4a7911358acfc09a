"""Calibration data from real LCM trajectories: the U-Net's inputs at exactly the steps a bundle runs, and the VAE
decoder's input at the end of each.

The float bundle runs its own loop (the runtime's ``Pipeline`` with a step observer) on each calibration prompt,
at the bundle's timesteps, guidance and size; every U-Net call's feeds are recorded as they were run, so a CFG
bundle contributes both halves of its batch, and the last step's denoised latents are recorded as the decoder's
feeds. A ControlNet bundle's trajectories run with synthetic control images (:mod:`.control_images`: edge-like and
smooth, alternating by prompt), so the U-Net calls recorded hold the residuals a controlled run adds, and each
ControlNet's own calls are recorded too (its feeds: the U-Net's, and the control image for each row). Samples are
written to a cache folder keyed by the U-Net variant's hashes and the settings, one ``.npz``
per call, and read back one at a time: a second export with the same model and settings reuses them, and the
quantiser's data reader never holds more than one sample in memory.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from lcm_export.calibration.control_images import control_images
from lcm_export.runtime.cache import cache_root
from lcm_export.runtime.control import as_model_input
from lcm_export.runtime.pipeline import Pipeline, StepEvent
from lcm_export.runtime.specs import CONTROL_IMAGE_INPUT


@dataclass(frozen=True)
class TrajectorySettings:
    """What the recorded trajectories run: the prompts, steps, guidance and size the bundle will be used at."""

    prompts: tuple[str, ...]
    steps: int
    guidance_scale: float
    height: int
    width: int
    seed: int = 0
    controlnets: int = 0  # a ControlNet bundle's count: the runs take control_images(prompt index, ..)

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
    """The recorded samples, in order: one per U-Net call, one VAE decoder input per prompt, and (ControlNet
    bundles) one per ControlNet call, by ControlNet component."""

    unet: list[Path]
    vae_decoder: list[Path]
    controlnets: dict[str, list[Path]] = field(default_factory=dict)

    def __add__(self, other: Trajectories) -> Trajectories:
        names = dict.fromkeys([*self.controlnets, *other.controlnets])
        controlnets = {name: self.controlnets.get(name, []) + other.controlnets.get(name, []) for name in names}
        return Trajectories(self.unet + other.unet, self.vae_decoder + other.vae_decoder, controlnets)


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
    info = pipe.manifest.controlnet
    controlnets = info.components if info is not None else ()
    if len(controlnets) != settings.controlnets:
        raise ValueError(
            f"the settings are for {settings.controlnets} ControlNet(s), the bundle has {len(controlnets)}"
        )
    names: dict[str, list[str]] = {"unet": [], "vae_decoder": [], **{name: [] for name in controlnets}}
    prefixes = {"unet": "sample", "vae_decoder": "decoder"}
    controlnet_inputs = {name: pipe.manifest.components[name].spec.input_names for name in controlnets}
    images: list[np.ndarray] = []  # the current run's control images, one per ControlNet

    def save(group: str, feeds: dict[str, np.ndarray]) -> None:
        name = f"{prefixes.get(group, group)}-{len(names[group]):05d}.npz"
        np.savez(folder / name, **{key: np.asarray(value) for key, value in feeds.items()})
        names[group].append(name)

    def record(event: StepEvent) -> None:
        save("unet", event.feeds)
        rows = event.feeds["sample"].shape[0]  # the CFG batch included: the ControlNet ran on both halves
        for name, image in zip(controlnets, images, strict=True):
            feeds = {key: event.feeds[key] for key in controlnet_inputs[name] if key != CONTROL_IMAGE_INPUT}
            save(name, {**feeds, CONTROL_IMAGE_INPUT: np.repeat(as_model_input(image), rows, axis=0)})
        if event.index == settings.steps - 1:  # the last step's denoised latents are what the decoder reads
            save("vae_decoder", pipe.denoiser.decoder_feeds(event.denoised))

    for index, prompt in enumerate(settings.prompts):
        images[:] = control_images(index, len(controlnets), settings.height, settings.width)
        control = {"control_image": list(images)} if controlnets else {}
        pipe(
            prompt,
            num_inference_steps=settings.steps,
            guidance_scale=settings.guidance_scale,
            height=settings.height,
            width=settings.width,
            seed=settings.seed + index,
            observer=record,
            **control,
        )
        if progress is not None:
            progress(index + 1, len(settings.prompts))
    done.write_text(json.dumps(names))
    return _listed(folder, names)


def _listed(folder: Path, names: dict[str, list[str]]) -> Trajectories:
    """The sample files of ``folder`` by group, as ``complete.json`` names them."""
    paths = {group: [folder / name for name in files] for group, files in names.items()}
    controlnets = {group: files for group, files in paths.items() if group not in ("unet", "vae_decoder")}
    return Trajectories(paths["unet"], paths["vae_decoder"], controlnets)


def load_sample(path: Path) -> dict[str, np.ndarray]:
    """One recorded sample's feeds (a U-Net call's, the scalar timestep of older bundles as its 0-d array; or the
    decoder's)."""
    with np.load(path) as data:
        return {key: data[key] for key in data.files}
