"""Which stored variant of each component a pipeline runs: the one place that decides, and says why.

A bundle may hold several variants of a component (``fp32``, ``fp16``, ``int8-qdq``; per artifact format), listed
in the exporter's order of preference. Two separate choices meet at load:

- the **variant** the caller asks for (``variant=``): which stored weights run. ``"auto"`` takes each component's
  preferred variant; a precision (``"fp32"``, ``"fp16"``, ``"int8"``) takes that precision where a component has
  it and otherwise the closest *more* precise one it has (an INT8 bundle keeps its text encoders float, an fp16
  bundle its VAE fp32), never a less precise one. A request no component can meet, or that one component can
  only meet with less precision than asked, is an error naming what the bundle has.
- the **compute precision** (``precision=``): how the backend computes a float graph (OpenVINO runs f32 graphs in
  bf16 on CPUs with AVX-512 BF16 unless told ``"fp32"``). Each backend lists what it honours
  (``COMPUTE_PRECISIONS``); that is checked in :mod:`lcm_export.runtime.backends`, not here.

The rules are written down for other runtimes in ``docs/bundle-format.md`` ("Variant rules").
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from lcm_export.errors import BundleError, UserError
from lcm_export.runtime.manifest import Artifact, Component

# What ``variant=`` takes: "auto" or a stored precision, least to most precise.
VARIANT_PRECISIONS = ("int8", "fp16", "fp32")
VARIANT_CHOICES = ("auto", *VARIANT_PRECISIONS)


@dataclass(frozen=True)
class VariantChoice:
    """The variant one component runs, and why (shown by ``lcm-run`` and ``Pipeline.variants``)."""

    component: str
    artifact: Artifact
    reason: str

    @property
    def name(self) -> str:
        return self.artifact.name

    @property
    def precision(self) -> str:
        return self.artifact.precision

    def __str__(self) -> str:
        return f"{self.component} {self.artifact.name} ({self.reason})"


def check_variant(variant: object) -> str:
    """``variant`` as one of :data:`VARIANT_CHOICES` (a variant's own name, e.g. ``int8-qdq``, is refused: it
    depends on the format; ask for its precision)."""
    if not isinstance(variant, str) or variant not in VARIANT_CHOICES:
        raise UserError(f"variant={variant!r}: pick one of {', '.join(VARIANT_CHOICES)}")
    return variant


def _rank(precision: str) -> int:
    return VARIANT_PRECISIONS.index(precision) if precision in VARIANT_PRECISIONS else len(VARIANT_PRECISIONS)


def choose_variant(component: Component, artifact_format: str, variant: str) -> VariantChoice:
    """The variant of ``component`` a backend running ``artifact_format`` runs for the ``variant`` request."""
    name = component.spec.name
    of_format = [artifact for artifact in component.variants if artifact.format == artifact_format]
    if not of_format:
        formats = ", ".join(sorted({artifact.format for artifact in component.variants}))
        raise BundleError(
            f"component '{name}' has no {artifact_format} variant in this bundle (it has: {formats}): pick a "
            "backend for those, or re-export"
        )
    if variant == "auto":
        preferred = of_format[0]
        reason = "the bundle's preferred" if len(of_format) > 1 else "the only one"
        return VariantChoice(name, preferred, reason)
    exact = [artifact for artifact in of_format if artifact.precision == variant]
    if exact:
        return VariantChoice(name, exact[0], f"{variant} as asked")
    wider = sorted(
        (artifact for artifact in of_format if _rank(artifact.precision) > _rank(variant)),
        key=lambda artifact: _rank(artifact.precision),
    )
    if wider:
        return VariantChoice(name, wider[0], f"no {variant} variant: the closest more precise one")
    have = ", ".join(artifact.name for artifact in of_format)
    hint = "re-export with --keep-fp32" if variant == "fp32" else "re-export"
    raise UserError(
        f"variant '{variant}': component '{name}' has no {variant} variant or a more precise one (it has {have}): "
        f"ask for one of those, or {hint}"
    )


def choose_variants(
    components: Mapping[str, Component],
    names: Iterable[str],
    artifact_format: str,
    variant: str,
    bundle_dir: object,
) -> dict[str, VariantChoice]:
    """One :class:`VariantChoice` per component in ``names``; a precision request met by none of them is an
    error naming the precisions the bundle has (it would otherwise run as ``auto`` without a word)."""
    variant = check_variant(variant)
    choices = {name: choose_variant(components[name], artifact_format, variant) for name in names}
    if variant != "auto" and not any(choice.precision == variant for choice in choices.values()):
        have = sorted({artifact.precision for component in components.values() for artifact in component.variants})
        raise UserError(
            f"variant '{variant}': BUNDLE '{bundle_dir}' has no {variant} variant (it has {', '.join(have)}): pick "
            f"one of those, or re-export with --precision {variant}"
        )
    return choices
