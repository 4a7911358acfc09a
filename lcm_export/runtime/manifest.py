"""The bundle contract: ``manifest.json`` is the only thing the exporter and the runtime share.

A bundle folder holds the artifacts (ONNX files, engines, mlpackages), the tokenizer, the scheduler config, an
optimum-style ``model_index.json`` and ``manifest.json``. The manifest carries a format version, every component's
I/O (names, dtypes, symbolic shapes), its artifacts per format, precision and target, the LCM scheduler tables
computed at export, the tokenizer settings, the VAE factors read from the model, provenance, and every file's size
and sha256. :func:`load_manifest` validates all of it and verifies the hashes before anything is run.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lcm_export.errors import BundleError
from lcm_export.runtime.specs import ComponentSpec

FORMAT_NAME = "lcm-export-bundle"
FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
HASH_CHUNK = 8 * 1024 * 1024


@dataclass(frozen=True)
class FileEntry:
    path: str  # relative to the bundle, POSIX separators
    size: int
    sha256: str

    def to_json(self) -> dict[str, Any]:
        return {"path": self.path, "size": self.size, "sha256": self.sha256}


@dataclass(frozen=True)
class Artifact:
    """One runnable form of a component: ``format`` is "onnx", "tensorrt" or "mlpackage"."""

    format: str
    path: str
    precision: str
    details: dict[str, Any] = field(default_factory=dict)  # target-specific: engine flavour, profiles, ...

    def to_json(self) -> dict[str, Any]:
        return {"format": self.format, "path": self.path, "precision": self.precision, **self.details}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Artifact:
        details = {k: v for k, v in data.items() if k not in ("format", "path", "precision")}
        return cls(str(data["format"]), str(data["path"]), str(data["precision"]), details)


@dataclass(frozen=True)
class Component:
    spec: ComponentSpec
    artifacts: dict[str, Artifact]  # format -> artifact
    validation: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            **self.spec.to_json(),
            "artifacts": {fmt: artifact.to_json() for fmt, artifact in self.artifacts.items()},
            "validation": self.validation,
        }


@dataclass(frozen=True)
class StepTable:
    """Everything one N-step LCM run needs, per step, computed by diffusers' LCMScheduler at export."""

    timesteps: tuple[int, ...]
    c_skip: tuple[float, ...]
    c_out: tuple[float, ...]
    sqrt_alpha_prod: tuple[float, ...]  # sqrt(alpha_bar_t)
    sqrt_beta_prod: tuple[float, ...]  # sqrt(1 - alpha_bar_t)
    sqrt_alpha_prod_next: tuple[float, ...]  # sqrt(alpha_bar) of the next timestep (this one's at the last step)
    sqrt_beta_prod_next: tuple[float, ...]

    def to_json(self) -> dict[str, list]:
        return {name: list(getattr(self, name)) for name in self.__dataclass_fields__}

    @classmethod
    def from_json(cls, data: dict[str, list]) -> StepTable:
        table = cls(**{name: tuple(data[name]) for name in cls.__dataclass_fields__})
        lengths = {len(getattr(table, name)) for name in cls.__dataclass_fields__}
        if len(lengths) != 1:
            raise ValueError("step table columns differ in length")
        return table


@dataclass(frozen=True)
class SchedulerInfo:
    prediction_type: str  # "epsilon", "v_prediction" or "sample"
    tables: dict[int, StepTable]  # number of steps -> table
    init_noise_sigma: float = 1.0
    clip_sample: bool = False
    clip_sample_range: float = 1.0
    thresholding: bool = False
    dynamic_thresholding_ratio: float = 0.995
    sample_max_value: float = 1.0
    config: dict[str, Any] = field(default_factory=dict)  # the LCMScheduler config, for provenance

    def to_json(self) -> dict[str, Any]:
        data = {name: getattr(self, name) for name in self.__dataclass_fields__ if name != "tables"}
        data["tables"] = {str(steps): table.to_json() for steps, table in sorted(self.tables.items())}
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> SchedulerInfo:
        values = {name: data[name] for name in cls.__dataclass_fields__ if name in data and name != "tables"}
        tables = {int(steps): StepTable.from_json(table) for steps, table in data["tables"].items()}
        return cls(tables=tables, **values)


@dataclass(frozen=True)
class TokenizerInfo:
    name: str  # "tokenizer" (SDXL adds "tokenizer_2")
    path: str  # tokenizer.json inside the bundle
    max_length: int
    pad_id: int

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "path": self.path, "max_length": self.max_length, "pad_id": self.pad_id}


@dataclass(frozen=True)
class PipelineInfo:
    family: str  # "sd"
    guidance: str  # "embedding" (LCM w-embedding as timestep_cond) or "cfg" (classifier-free guidance)
    time_cond_proj_dim: int | None
    latent_channels: int
    vae: str  # "autoencoder_kl" or "autoencoder_tiny"
    vae_scale_factor: int
    vae_scaling_factor: float
    vae_shift_factor: float | None
    spatial_multiple: int
    default_height: int
    default_width: int

    def to_json(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self.__dataclass_fields__}


@dataclass(frozen=True)
class Manifest:
    target: str
    precision: str
    pipeline: PipelineInfo
    scheduler: SchedulerInfo
    tokenizers: tuple[TokenizerInfo, ...]
    components: dict[str, Component]
    files: tuple[FileEntry, ...]
    provenance: dict[str, Any] = field(default_factory=dict)
    loras: tuple[dict[str, Any], ...] = ()
    format_version: int = FORMAT_VERSION

    def to_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT_NAME,
            "format_version": self.format_version,
            "target": self.target,
            "precision": self.precision,
            "pipeline": self.pipeline.to_json(),
            "scheduler": self.scheduler.to_json(),
            "tokenizers": [t.to_json() for t in self.tokenizers],
            "components": {name: c.to_json() for name, c in self.components.items()},
            "loras": list(self.loras),
            "provenance": self.provenance,
            "files": [f.to_json() for f in self.files],
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Manifest:
        components = {
            name: Component(
                spec=ComponentSpec.from_json(name, entry),
                artifacts={fmt: Artifact.from_json(a) for fmt, a in entry["artifacts"].items()},
                validation=entry.get("validation", {}),
            )
            for name, entry in data["components"].items()
        }
        pipeline = data["pipeline"]
        return cls(
            target=str(data["target"]),
            precision=str(data["precision"]),
            pipeline=PipelineInfo(**{name: pipeline[name] for name in PipelineInfo.__dataclass_fields__}),
            scheduler=SchedulerInfo.from_json(data["scheduler"]),
            tokenizers=tuple(TokenizerInfo(**t) for t in data["tokenizers"]),
            components=components,
            files=tuple(FileEntry(**f) for f in data["files"]),
            provenance=dict(data.get("provenance", {})),
            loras=tuple(data.get("loras", ())),
            format_version=int(data["format_version"]),
        )

    def write(self, bundle_dir: Path) -> None:
        (bundle_dir / MANIFEST_NAME).write_text(json.dumps(self.to_json(), indent=2) + "\n")


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def file_entry(bundle_dir: Path, path: Path) -> FileEntry:
    return FileEntry(path.relative_to(bundle_dir).as_posix(), path.stat().st_size, sha256_file(path))


class _VerifiedCache:
    """Remembers files already hashed, keyed by (real path, size, mtime, inode), so a second load skips hashing.

    Any write to a file changes its mtime, so a modified file is always hashed again.
    """

    def __init__(self) -> None:
        root = os.environ.get("LCM_EXPORT_CACHE_DIR") or os.path.join(
            os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "lcm-export"
        )
        self.path = Path(root) / "verified-files.json"
        try:
            self.entries: dict[str, list] = json.loads(self.path.read_text())
        except (OSError, ValueError):
            self.entries = {}
        self.dirty = False

    @staticmethod
    def _key(path: Path) -> tuple[str, list]:
        stat = path.stat()
        return str(path.resolve()), [stat.st_size, stat.st_mtime_ns, stat.st_ino]

    def known(self, path: Path, sha256: str) -> bool:
        key, identity = self._key(path)
        return self.entries.get(key) == [*identity, sha256]

    def remember(self, path: Path, sha256: str) -> None:
        key, identity = self._key(path)
        self.entries[key] = [*identity, sha256]
        self.dirty = True

    def save(self) -> None:
        if not self.dirty:
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            temporary = self.path.with_suffix(f".{os.getpid()}.tmp")
            temporary.write_text(json.dumps(self.entries))
            temporary.replace(self.path)
        except OSError:
            pass  # a read-only home only costs a re-hash next time


def verify_files(bundle_dir: Path, files: tuple[FileEntry, ...], mode: str = "cached") -> None:
    """Check every listed file exists with its size and sha256.

    ``mode``: "full" hashes everything, "cached" skips files hashed before and unchanged since, "size" checks
    sizes only (for read-only media where hashing multi-GB files at every start is too slow).
    """
    if mode not in ("full", "cached", "size"):
        raise ValueError(f"unknown verify mode {mode!r}")
    cache = _VerifiedCache() if mode == "cached" else None
    for entry in files:
        path = bundle_dir / entry.path
        if not path.is_file():
            raise BundleError(
                f"BUNDLE '{bundle_dir}': file '{entry.path}' listed in manifest.json is missing: "
                "copy the whole bundle folder or re-export it"
            )
        if path.stat().st_size != entry.size or (
            mode != "size" and not (cache and cache.known(path, entry.sha256)) and sha256_file(path) != entry.sha256
        ):
            raise BundleError(
                f"BUNDLE '{bundle_dir}': file '{entry.path}' does not match its sha256 in manifest.json "
                "(modified or corrupted): re-export the bundle or copy it again"
            )
        if cache is not None:
            cache.remember(path, entry.sha256)
    if cache is not None:
        cache.save()


def load_manifest(bundle_dir: str | Path, verify: str = "cached") -> Manifest:
    """Read, validate and verify a bundle's manifest. Raises :class:`BundleError` with a one-line message."""
    bundle_dir = Path(bundle_dir)
    if not bundle_dir.is_dir():
        raise BundleError(f"BUNDLE '{bundle_dir}' is not a folder: pass the folder lcm-export wrote")
    manifest_path = bundle_dir / MANIFEST_NAME
    if not manifest_path.is_file():
        raise BundleError(
            f"BUNDLE '{bundle_dir}' has no manifest.json: it is not an lcm-export bundle, or its export did not "
            "finish; export it again"
        )
    try:
        data = json.loads(manifest_path.read_text())
    except (OSError, ValueError) as error:
        raise BundleError(f"BUNDLE '{bundle_dir}': manifest.json is not valid JSON ({error}): re-export it") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT_NAME:
        raise BundleError(f"BUNDLE '{bundle_dir}': manifest.json is not an lcm-export manifest: re-export the bundle")
    version = data.get("format_version")
    if version != FORMAT_VERSION:
        raise BundleError(
            f"BUNDLE '{bundle_dir}' has manifest format version {version}; this runtime reads version "
            f"{FORMAT_VERSION}: re-export the bundle with this lcm-export, or install the matching lcm-export"
        )
    try:
        manifest = Manifest.from_json(data)
    except (KeyError, TypeError, ValueError) as error:
        raise BundleError(
            f"BUNDLE '{bundle_dir}': manifest.json is incomplete ({type(error).__name__}: {error}): re-export it"
        ) from None
    verify_files(bundle_dir, manifest.files, verify)
    return manifest
