"""The torch-free runtime: numpy, ``tokenizers`` and one backend; imports nothing from the exporter or the targets.

The public API is :data:`__all__`: load a bundle with :meth:`Pipeline.load`, call it (text-to-image),
:meth:`Pipeline.img2img`, or :meth:`Pipeline.stream` (a :class:`FrameStream`); results are
:class:`PipelineOutput`; an ``observer`` sees a :class:`StepEvent` per step; :attr:`Pipeline.variants` holds a
:class:`VariantChoice` per component, :meth:`Pipeline.session_info` a :class:`SessionInfo`; ``Pipeline.options``
is the :class:`BackendOptions` it was loaded with, ``Pipeline.denoiser`` the :class:`Denoiser` core every mode
calls (a :class:`FrameStream` holds its :class:`GenerationRequest`). Every error caused by the caller's input or
the bundle is a :class:`UserError` (one line naming the input and what to do): :class:`BundleError` for a bundle
that is missing, incomplete, modified or of another format, :class:`NonFiniteError` for a stage that produced NaN
or inf.
:func:`profile_bundle` times every stage over repeated runs (what ``lcm-run --profile`` prints).
A ``Pipeline`` may be called from several threads at once; a ``FrameStream`` belongs to one thread.

Modules: ``manifest`` (the bundle contract, validated whole at load; written down in docs/bundle-format.md),
``variants`` (which stored variant runs), ``request`` and ``inputs`` (argument checks), ``draws`` (the random
tensors, one order for every mode), ``denoiser`` (the shared core: sessions and the stages of a run),
``pipeline`` (the modes), ``stream`` (the frame loop), ``scheduler`` (the numpy LCM step), ``conditioning`` (the
U-Net inputs from the manifest's declaration), ``specs`` (component I/O shared with the exporter and the
targets), ``backends`` (one module per engine), ``profile`` and ``cli`` (lcm-run).
"""

from __future__ import annotations

from lcm_export.errors import BundleError, NonFiniteError, UserError
from lcm_export.runtime.backends import BackendOptions
from lcm_export.runtime.denoiser import Denoiser
from lcm_export.runtime.manifest import FORMAT_VERSION, Manifest, load_manifest
from lcm_export.runtime.pipeline import Pipeline, PipelineOutput, SessionInfo, StepEvent
from lcm_export.runtime.profile import ProfileReport, profile_bundle
from lcm_export.runtime.request import GenerationRequest
from lcm_export.runtime.stream import FrameStream
from lcm_export.runtime.variants import VariantChoice

__all__ = [
    "FORMAT_VERSION",
    "BackendOptions",
    "BundleError",
    "Denoiser",
    "FrameStream",
    "GenerationRequest",
    "Manifest",
    "NonFiniteError",
    "Pipeline",
    "PipelineOutput",
    "ProfileReport",
    "SessionInfo",
    "StepEvent",
    "UserError",
    "VariantChoice",
    "load_manifest",
    "profile_bundle",
]
