"""The whole manifest: :class:`Manifest`, read part by part and cross-checked, and written in the current format."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lcm_export.runtime.manifest.checks import check_conditioning, read_components, unlisted
from lcm_export.runtime.manifest.control import ControlNetInfo
from lcm_export.runtime.manifest.model import (
    Component,
    Conditioning,
    FileEntry,
    PipelineInfo,
    TokenizerInfo,
)
from lcm_export.runtime.manifest.tables import SchedulerInfo
from lcm_export.runtime.manifest.upgrade import upgrade_format_1
from lcm_export.runtime.manifest.vocabulary import (
    BROWSER_BACKENDS,
    EXPORT_PRECISIONS,
    FORMAT_NAME,
    FORMAT_VERSION,
    MANIFEST_NAME,
    PRECISIONS,
    READABLE_VERSIONS,
    SHA256_HEX,
    TARGETS,
)
from lcm_export.runtime.specs import Fields, ManifestFieldError, as_str, describe


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
    format_version: int = FORMAT_VERSION  # as read (a format-1 bundle reads as 1, upgraded in memory)
    conditioning: Conditioning | None = None  # None: SD's (Conditioning.of_sd)
    # JavaScript backend -> the precisions its ``auto`` tries, in order (optional; the Python runtime's ``auto``
    # ignores it: its backends are not these)
    backend_variants: dict[str, tuple[str, ...]] = field(default_factory=dict)
    controlnet: ControlNetInfo | None = None  # the ControlNets and the U-Net taking their residuals (optional)

    def __post_init__(self) -> None:
        if self.conditioning is None:
            object.__setattr__(self, "conditioning", Conditioning.of_sd(self.pipeline))

    def to_json(self) -> dict[str, Any]:
        """Always the current format (a bundle read as format 1 is written back as format 2)."""
        written = {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "target": self.target,
            "precision": self.precision,
            "pipeline": self.pipeline.to_json(),
            "conditioning": self.conditioning.to_json(),
            "scheduler": self.scheduler.to_json(),
            "tokenizers": [t.to_json() for t in self.tokenizers],
            "components": {name: c.to_json() for name, c in self.components.items()},
            "loras": list(self.loras),
            "provenance": self.provenance,
            "files": [f.to_json() for f in self.files],
        }
        if self.backend_variants:  # optional: bundles without it are written as before
            written["backend_variants"] = {backend: list(order) for backend, order in self.backend_variants.items()}
        if self.controlnet is not None:  # optional: bundles without ControlNet are written as before
            written["controlnet"] = self.controlnet.to_json()
        return written

    @classmethod
    def from_json(cls, data: Any) -> Manifest:
        """Read and validate a whole manifest (see the module docstring); raises :class:`ManifestFieldError`.

        What needs the bundle folder (symlinks, the files inside folder artifacts) is :func:`check_bundle_paths`.
        """
        top = Fields.of(data, "")
        top.string("format", choices=(FORMAT_NAME,))
        format_version = top.integer("format_version", minimum=min(READABLE_VERSIONS), maximum=FORMAT_VERSION)
        if format_version == 1:
            if top.has("conditioning"):
                raise ManifestFieldError(
                    top.path("format_version"), "is 1, but the manifest has format 2's conditioning: say 2"
                )
            top = Fields.of(upgrade_format_1(top.data), "")
        target = top.string("target", choices=TARGETS)
        precision = top.string("precision", choices=EXPORT_PRECISIONS)
        pipeline = PipelineInfo.from_json(top.get("pipeline"), top.path("pipeline"))
        conditioning = Conditioning.from_json(top.get("conditioning"), top.path("conditioning"))
        scheduler = SchedulerInfo.from_json(top.get("scheduler"), top.path("scheduler"))
        files = _read_files(top)
        listed = {entry.path for entry in files}
        tokenizers = _read_tokenizers(top, listed)
        check_conditioning(conditioning, pipeline, tokenizers, top.path("conditioning"))
        control = None
        if top.has("controlnet"):
            control = ControlNetInfo.from_json(top.get("controlnet"), top.path("controlnet"))
        components = read_components(top, pipeline, conditioning, target, listed, control)
        loras = tuple(_read_lora(item, at).data for at, item in top.array("loras")) if top.has("loras") else ()
        backend_variants = _read_backend_variants(top, components) if top.has("backend_variants") else {}
        return cls(
            target=target,
            precision=precision,
            pipeline=pipeline,
            scheduler=scheduler,
            tokenizers=tokenizers,
            components=components,
            files=files,
            provenance=top.object("provenance", default={}).data,
            loras=loras,
            format_version=format_version,
            conditioning=conditioning,
            backend_variants=backend_variants,
            controlnet=control,
        )

    def write(self, bundle_dir: Path) -> None:
        (bundle_dir / MANIFEST_NAME).write_text(json.dumps(self.to_json(), indent=2) + "\n")


def _read_files(top: Fields) -> tuple[FileEntry, ...]:
    files: list[FileEntry] = []
    first: dict[str, str] = {}  # path -> field of its first entry
    for at, item in top.array("files", min_length=1):
        entry = FileEntry.from_json(item, at)
        if entry.path in first:
            raise ManifestFieldError(f"{at}.path", f"repeats {first[entry.path]} ({describe(entry.path)})")
        first[entry.path] = f"{at}.path"
        files.append(entry)
    return tuple(files)


def _read_tokenizers(top: Fields, listed: set[str]) -> tuple[TokenizerInfo, ...]:
    tokenizers: list[TokenizerInfo] = []
    for at, item in top.array("tokenizers", min_length=1):
        tokenizer = TokenizerInfo.from_json(item, at)
        if tokenizer.name in {other.name for other in tokenizers}:
            raise ManifestFieldError(f"{at}.name", f"repeats the tokenizer name {describe(tokenizer.name)}")
        if tokenizer.path not in listed:
            raise ManifestFieldError(f"{at}.path", unlisted(tokenizer.path))
        tokenizers.append(tokenizer)
    return tuple(tokenizers)


def _read_lora(item: Any, where: str) -> Fields:
    """A LoRA record (provenance: what was fused, with which weight, from which file)."""
    fields = Fields.of(item, where)
    fields.string("source")
    fields.number("weight")
    if fields.has("sha256"):
        fields.string("sha256", pattern=SHA256_HEX, meaning="64 lowercase hexadecimal digits")
    return fields


def _read_backend_variants(top: Fields, components: dict[str, Component]) -> dict[str, tuple[str, ...]]:
    """``backend_variants``: a JavaScript backend -> the precisions its ``auto`` tries, in order, each one some ONNX
    variant has (rule X15: a preference nothing meets would silently run the bundle's default)."""
    fields = top.object("backend_variants")
    have = sorted(
        {variant.precision for c in components.values() for variant in c.variants if variant.format == "onnx"}
    )
    preferences: dict[str, tuple[str, ...]] = {}
    for backend in fields.data:
        if backend not in BROWSER_BACKENDS:
            raise ManifestFieldError(fields.path(backend), f"is not a backend: pick from {', '.join(BROWSER_BACKENDS)}")
        order: list[str] = []
        for at, item in fields.array(backend, min_length=1):
            precision = as_str(item, at, choices=PRECISIONS)
            if precision in order:
                raise ManifestFieldError(at, f"repeats {describe(precision)}")
            if precision not in have:
                raise ManifestFieldError(
                    at, f"is {describe(precision)}, which no onnx variant has (they have {', '.join(have)})"
                )
            order.append(precision)
        preferences[backend] = tuple(order)
    return preferences
