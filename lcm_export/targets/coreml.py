"""Core ML target: one ML Program package (``<component>/model.mlpackage``) per component.

Each component's torch module (the one the ONNX file was exported from and checked against) is captured with
``torch.export`` and converted by coremltools: ``torch.jit.trace`` + ``ct.convert`` breaks on diffusers modules
with torch 2.13. Compute precision follows the exported spec: fp16 components compute in fp16, a VAE marked
``keep_fp32`` (its config sets ``force_upcast``: it overflows in fp16) in fp32; the I/O dtypes are the spec's,
except that Core ML has no int64 (``input_ids`` are int32) and no rank-0 inputs (``timestep`` is ``(1,)``). Both
are recorded in the artifact (``coreml_inputs`` / ``coreml_outputs``) and undone by the runtime backend.

Shapes come from the same spec and shape range (``BuildRequest.shape_range``) as the TensorRT profiles. Every dim
whose min and max agree is static (the default, and what Core ML runs fastest, on the Neural Engine too); every
other dim is a bounded ``RangeDim``, which Core ML may keep off the Neural Engine. A component fed the CFG batch
keeps a batch range of 1-2x even in a static export, because guidance <= 1 runs it at 1x. Multi-input
``EnumeratedShapes`` (the Neural-Engine-friendly alternative) need iOS 18 and are not used. A flexible model whose
conversion fails is a one-line :class:`ExportError` rather than a silent static fallback: a bundle must take the
shapes it was asked for. Flexible models capture GroupNorm through :func:`group_norm_decomposition`, which
coremltools can convert at a symbolic batch size.

After saving, each package's spec is read back and its I/O names, dtypes and shapes are checked against the
component spec, which is what Linux can check. On macOS each package also runs on sample inputs and is compared
with PyTorch fp32 under a PSNR gate (Apple's ml-stable-diffusion uses 35 dB); elsewhere the artifact records
``"validated": "spec-only (prediction needs macOS)"``.

Nothing here imports coremltools or torch at module level: ``--target coreml`` without coremltools fails before
the model is loaded (:func:`preflight`) with what to install.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import logging
import platform
import re
import shutil
import time
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lcm_export import DISTRIBUTION
from lcm_export.errors import ExportError
from lcm_export.runtime.backends.coreml import ARTIFACT_FORMAT, adapt_feeds, outputs_by_spec_name
from lcm_export.runtime.manifest import Artifact, Component, CoreMLPackageDetails, CoreMLTensor, PipelineInfo
from lcm_export.runtime.specs import ComponentSpec, ShapeRange, TensorSpec, sample_inputs
from lcm_export.targets import BuildRequest, Target

PIP_EXTRA = f"{DISTRIBUTION}[coreml]"
PACKAGE_NAME = "model.mlpackage"
# iOS 16 / macOS 13 is the first with fp16 model inputs and outputs; later targets add ops, never remove them.
DEPLOYMENT_TARGETS = {"iOS16": "macOS13", "iOS17": "macOS14", "iOS18": "macOS15"}
DEFAULT_DEPLOYMENT_TARGET = "iOS16"
COREML_DTYPES = {"float32": "float32", "float16": "float16", "int64": "int32", "int32": "int32"}
PSNR_GATE_DB = 35.0  # minimum PSNR of every output against PyTorch fp32 (macOS only)
SPEC_ONLY = "spec-only (prediction needs macOS)"
SYMBOL_STAGES = ("min", "opt", "max")


@dataclass(frozen=True)
class CoreMLBuildOptions:
    """The Core ML settings of one export, checked: built from ``ExportConfig.target_options``."""

    minimum_deployment_target: str = DEFAULT_DEPLOYMENT_TARGET  # "iOS16", "iOS17" or "iOS18" (or the macOS name)
    keep_onnx: bool = False

    @property
    def deployment_label(self) -> str:
        """E.g. "iOS16/macOS13": the two names of one Core ML specification version."""
        return f"{self.minimum_deployment_target}/{DEPLOYMENT_TARGETS[self.minimum_deployment_target]}"

    @classmethod
    def from_target_options(cls, options: dict[str, Any]) -> CoreMLBuildOptions:
        """Check ``target_options``; an unknown deployment target is a one-line :class:`ExportError`."""
        requested = str(options.get("minimum_deployment_target") or DEFAULT_DEPLOYMENT_TARGET)
        by_macos = {macos: ios for ios, macos in DEPLOYMENT_TARGETS.items()}
        target = requested if requested in DEPLOYMENT_TARGETS else by_macos.get(requested)
        if target is None:
            names = ", ".join(f"{ios} ({macos})" for ios, macos in DEPLOYMENT_TARGETS.items())
            raise ExportError(f"Core ML minimum deployment target '{requested}': pick one of {names}")
        return cls(minimum_deployment_target=target, keep_onnx=bool(options.get("keep_onnx", False)))


def preflight(target_options: Mapping[str, Any]) -> None:
    """Fail before the model is loaded when coremltools is missing or a Core ML option is wrong."""
    if importlib.util.find_spec("coremltools") is None:
        raise ExportError(f"--target coreml needs coremltools: pip install '{PIP_EXTRA}'")
    CoreMLBuildOptions.from_target_options(target_options)


# -- shapes ---------------------------------------------------------------------------------------------------


def stage_values(spec: ComponentSpec, shape_range: ShapeRange, vae_scale_factor: int) -> dict[str, dict[str, int]]:
    """Symbol values of one component at "min", "opt" and "max" (the CFG batch is 1x at min)."""
    return {stage: shape_range.symbol_values(stage, vae_scale_factor, spec.batch_multiplier) for stage in SYMBOL_STAGES}


def coreml_feature_names(names: list[str]) -> list[str]:
    """ML Program feature names for the spec's tensor names, in order, unique.

    An ML Program's inputs and outputs must match ``[A-Za-z_][A-Za-z0-9_]*``: every other character becomes ``_``
    (optimum's ``hidden_states.1`` is ``hidden_states_1``, as coremltools itself would rename it), and a name that
    would then repeat another gets ``_2``, ``_3``... The artifact records each spec name beside its feature name.
    """
    chosen: list[str] = []
    for name in names:
        base = re.sub(r"[^A-Za-z0-9_]", "_", name)
        base = base if re.match(r"[A-Za-z_]", base) else f"_{base}"
        candidate, suffix = base, 2
        while candidate in chosen or (candidate != name and candidate in names):
            candidate, suffix = f"{base}_{suffix}", suffix + 1
        chosen.append(candidate)
    return chosen


def coreml_tensor(tensor: TensorSpec, values: dict[str, dict[str, int]], feature_name: str = "") -> CoreMLTensor:
    """How ``tensor`` appears in the Core ML model: default (opt) shape, (min, max) bounds if any dim varies.

    A rank-0 tensor becomes ``(1,)`` and int64 becomes int32, which is all Core ML allows; ``feature_name`` (from
    :func:`coreml_feature_names`) is its name inside the model when the spec's name is not a valid one.
    """
    low, default, high = (tensor.concrete_shape(values[stage]) or (1,) for stage in SYMBOL_STAGES)
    bounds = tuple(zip(low, high, strict=True)) if low != high else None
    name = feature_name or tensor.name
    return CoreMLTensor(
        name=name,
        dtype=COREML_DTYPES[tensor.dtype],
        shape=default,
        bounds=bounds,
        spec_name=tensor.name if name != tensor.name else "",
    )


def coreml_io(
    spec: ComponentSpec, values: dict[str, dict[str, int]]
) -> tuple[tuple[CoreMLTensor, ...], tuple[CoreMLTensor, ...]]:
    """The Core ML inputs and outputs of ``spec`` (its exported dtypes) for the given stage values."""
    tensors = (*spec.inputs, *spec.outputs)
    features = dict(zip((t.name for t in tensors), coreml_feature_names([t.name for t in tensors]), strict=True))
    inputs = tuple(coreml_tensor(tensor, values, features[tensor.name]) for tensor in spec.inputs)
    outputs = tuple(coreml_tensor(tensor, values, features[tensor.name]) for tensor in spec.outputs)
    return inputs, outputs


def trace_values(values: dict[str, dict[str, int]], spatial_multiple: int, vae_scale_factor: int) -> dict[str, int]:
    """Symbol values to capture the module with: opt, but never 1 for a dim that varies.

    ``torch.export`` specialises a dynamic dim whose example size is 1, so such a dim is traced at 2 (in units of
    the spatial multiple for height and width).
    """
    chosen = dict(values["opt"])
    if values["min"]["batch"] != values["max"]["batch"] and chosen["batch"] == 1:
        chosen["batch"] = 2
    for axis in ("height", "width"):
        low, high = values["min"][f"image_{axis}"], values["max"][f"image_{axis}"]
        if low != high and chosen[f"image_{axis}"] == spatial_multiple and high >= 2 * spatial_multiple:
            chosen[f"image_{axis}"] = 2 * spatial_multiple
            chosen[f"latent_{axis}"] = 2 * spatial_multiple // vae_scale_factor
    return chosen


def export_dims(values: dict[str, dict[str, int]], spatial_multiple: int, vae_scale_factor: int) -> dict[str, Any]:
    """``torch.export`` dims for every symbol that varies between min and max.

    Height and width are multiples of the spatial multiple: one base dim counts those units, and the image and
    latent sizes derive from it, so the U-Net's and VAE's divisibility checks hold for every size in range.
    """
    from torch.export import Dim

    dims: dict[str, Any] = {}
    low, high = values["min"], values["max"]
    if low["batch"] != high["batch"]:
        dims["batch"] = Dim("batch", min=low["batch"], max=high["batch"])
    latent_units = spatial_multiple // vae_scale_factor
    for axis in ("height", "width"):
        if low[f"image_{axis}"] == high[f"image_{axis}"]:
            continue
        units = Dim(
            f"{axis}_units",
            min=low[f"image_{axis}"] // spatial_multiple,
            max=high[f"image_{axis}"] // spatial_multiple,
        )
        dims[f"image_{axis}"] = units * spatial_multiple
        dims[f"latent_{axis}"] = units * latent_units if latent_units != 1 else units
    return dims


def dynamic_shapes_for(spec: ComponentSpec, dims: dict[str, Any]) -> tuple[dict[int, Any] | None, ...] | None:
    """``torch.export``'s ``dynamic_shapes``: per input, axis -> dim for the symbols in ``dims``; None if static."""
    if not dims:
        return None
    shapes = []
    for tensor in spec.inputs:
        axes = {axis: dims[dim] for axis, dim in enumerate(tensor.shape) if isinstance(dim, str) and dim in dims}
        shapes.append(axes or None)
    return tuple(shapes)


# -- capture and conversion -----------------------------------------------------------------------------------


def group_norm_decomposition(
    input: Any, num_groups: int, weight: Any = None, bias: Any = None, eps: float = 1e-5, cudnn_enabled: bool = True
) -> Any:
    """GroupNorm written with a reshape Core ML can take at a symbolic batch size.

    coremltools lowers ``aten.group_norm`` with a constant shape that cannot hold a symbolic batch, so flexible
    models get this plain form instead: mean and biased variance over each group, as ``torch.group_norm``.
    """
    import torch

    grouped = input.reshape(input.shape[0], num_groups, -1)  # (B, G, C/G * spatial)
    mean = grouped.mean(-1, keepdim=True)
    centered = grouped - mean
    variance = (centered * centered).mean(-1, keepdim=True)
    normalized = (centered * torch.rsqrt(variance + eps)).reshape(input.shape)
    per_channel = (1, -1) + (1,) * (input.dim() - 2)
    if weight is not None:
        normalized = normalized * weight.reshape(per_channel)
    if bias is not None:
        normalized = normalized + bias.reshape(per_channel)
    return normalized


def drop_alias_nodes(program: Any) -> int:
    """Remove ``aten.alias`` nodes (no-ops coremltools cannot convert, e.g. CLIP's position-id slice).

    Returns how many were removed.
    """
    import torch

    graph = program.graph_module.graph
    removed = 0
    for node in list(graph.nodes):
        if node.op == "call_function" and node.target is torch.ops.aten.alias.default:
            node.replace_all_uses_with(node.args[0])
            graph.erase_node(node)
            removed += 1
    if removed:
        graph.lint()
        program.graph_module.recompile()
    return removed


def capture(
    spec: ComponentSpec,
    module: Any,
    values: dict[str, int],
    dynamic_shapes: tuple[dict[int, Any] | None, ...] | None,
) -> Any:
    """``torch.export`` ``module`` (forward takes ``spec``'s inputs in order) on sample inputs shaped by ``values``
    (the scalar timestep as (1,))."""
    import torch

    feeds = sample_inputs(spec, values)
    args = tuple(torch.from_numpy(feeds[name]).reshape(feeds[name].shape or (1,)) for name in spec.input_names)
    decompositions = {torch.ops.aten.group_norm.default: group_norm_decomposition} if dynamic_shapes else {}
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # torch-internal deprecations and diffusers' tracer notes, not the user's
        program = torch.export.export(module, args, dynamic_shapes=dynamic_shapes)
        program = program.run_decompositions(decompositions)
    drop_alias_nodes(program)
    return program


def capture_for_conversion(
    spec: ComponentSpec, module: Any, values: dict[str, dict[str, int]], pipeline_info: PipelineInfo
) -> Any:
    """The program a component's package is converted from: ``module`` (fp32, taking ``spec``'s inputs) captured
    at :func:`trace_values`, dynamic on every symbol whose min and max (``values``, :func:`stage_values`) differ."""
    multiple, factor = pipeline_info.spatial_multiple, pipeline_info.vae_scale_factor
    dims = export_dims(values, multiple, factor)
    return capture(spec, module, trace_values(values, multiple, factor), dynamic_shapes_for(spec, dims))


@contextlib.contextmanager
def quiet_coremltools(quiet: bool) -> Iterator[None]:
    """Silence coremltools' import-time log lines (missing macOS runtime, untested torch) and, when ``quiet``,
    its per-pass progress bars (written to stderr; they have no switch of their own)."""
    logger = logging.getLogger("coremltools")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stderr(io.StringIO()) if quiet else contextlib.nullcontext():
            yield
    finally:
        logger.setLevel(level)


def import_coremltools() -> Any:
    """coremltools, imported without its log lines about the macOS-only runtime."""
    with quiet_coremltools(quiet=False):
        import coremltools

    return coremltools


def coreml_type(ct: Any, tensor: CoreMLTensor) -> Any:
    """A ``ct.TensorType`` for one input: static shape, or a ``RangeDim`` on every dim that varies."""
    if tensor.bounds is None:
        shape: Any = tensor.shape
    else:
        shape = ct.Shape(
            tuple(
                size if low == high else ct.RangeDim(lower_bound=low, upper_bound=high, default=size)
                for size, (low, high) in zip(tensor.shape, tensor.bounds, strict=True)
            )
        )
    return ct.TensorType(name=tensor.name, shape=shape, dtype=np.dtype(tensor.dtype).type)


def convert(
    program: Any,
    inputs: tuple[CoreMLTensor, ...],
    outputs: tuple[CoreMLTensor, ...],
    compute_precision: str,
    options: CoreMLBuildOptions,
    quiet: bool,
) -> Any:
    """``ct.convert`` an exported program to an ML Program with the given I/O names, dtypes and shapes."""
    ct = import_coremltools()
    with quiet_coremltools(quiet):
        model = ct.convert(
            program,
            inputs=[coreml_type(ct, tensor) for tensor in inputs],
            outputs=[ct.TensorType(name=tensor.name, dtype=np.dtype(tensor.dtype).type) for tensor in outputs],
            convert_to="mlprogram",
            compute_precision=ct.precision.FLOAT16 if compute_precision == "float16" else ct.precision.FLOAT32,
            minimum_deployment_target=getattr(ct.target, options.minimum_deployment_target),
            skip_model_load=True,
        )
    return rename_outputs(model, [tensor.name for tensor in outputs])


def rename_outputs(model: Any, names: list[str]) -> Any:
    """``model`` with its outputs named ``names``, in order (the spec's names).

    ``ct.convert`` is given the names and coremltools 9 keeps them; a model converted without them carries op names
    (``add``, ``var_812``), which are renamed here so the package always speaks the spec's names.
    """
    ct = import_coremltools()
    spec = model.get_spec()
    current = [feature.name for feature in spec.description.output]
    if len(current) != len(names):
        raise ExportError(f"the Core ML model has outputs {current}; the component spec lists {names}")
    if current == names:
        return model
    for old, new in zip(current, names, strict=True):
        if old != new:
            ct.utils.rename_feature(spec, old, new)
    return ct.models.MLModel(spec, weights_dir=model.weights_dir, skip_model_load=True)


# -- checks ---------------------------------------------------------------------------------------------------


def described_tensors(package: Path) -> tuple[tuple[CoreMLTensor, ...], tuple[CoreMLTensor, ...]]:
    """Inputs and outputs as the saved package's spec describes them (readable on any system)."""
    ct = import_coremltools()
    from coremltools.proto import FeatureTypes_pb2

    array_types = FeatureTypes_pb2.ArrayFeatureType
    names = {array_types.FLOAT32: "float32", array_types.FLOAT16: "float16", array_types.INT32: "int32"}
    spec = ct.models.MLModel(str(package), skip_model_load=True).get_spec()

    def describe(feature: Any) -> CoreMLTensor:
        kind = feature.type.WhichOneof("Type")
        if kind != "multiArrayType":
            return CoreMLTensor(feature.name, kind or "unknown", ())
        array = feature.type.multiArrayType
        ranges = array.shapeRange.sizeRanges
        bounds = tuple((int(r.lowerBound), int(r.upperBound)) for r in ranges) if len(ranges) else None
        dtype = names.get(array.dataType, array_types.ArrayDataType.Name(array.dataType).lower())
        return CoreMLTensor(feature.name, dtype, tuple(int(size) for size in array.shape), bounds)

    return tuple(map(describe, spec.description.input)), tuple(map(describe, spec.description.output))


def spec_mismatches(
    planned: tuple[CoreMLTensor, ...], described: tuple[CoreMLTensor, ...], kind: str, check_shapes: bool = True
) -> list[str]:
    """Every difference between the I/O we asked for and what the package declares (names, dtypes, shapes)."""
    problems = []
    if [t.name for t in planned] != [t.name for t in described]:
        return [f"{kind} names {[t.name for t in described]} != {[t.name for t in planned]}"]
    for want, have in zip(planned, described, strict=True):
        if want.dtype != have.dtype:
            problems.append(f"{kind} '{want.name}' dtype {have.dtype} != {want.dtype}")
        if not check_shapes:
            continue
        if want.shape != have.shape:
            problems.append(f"{kind} '{want.name}' shape {list(have.shape)} != {list(want.shape)}")
        # A static array may still list a range equal to its shape.
        have_bounds = None if have.bounds and all(low == high for low, high in have.bounds) else have.bounds
        if want.bounds != have_bounds:
            problems.append(f"{kind} '{want.name}' shape range {have.bounds} != {want.bounds}")
    return problems


def check_package(
    name: str, package: Path, inputs: tuple[CoreMLTensor, ...], outputs: tuple[CoreMLTensor, ...]
) -> None:
    """Read the saved package back and check its I/O against the plan; an :class:`ExportError` lists every gap.

    Output shapes are checked when the model is static (a flexible model leaves them to run time).
    """
    described_inputs, described_outputs = described_tensors(package)
    static = all(tensor.is_static for tensor in inputs)
    problems = spec_mismatches(inputs, described_inputs, "input") + spec_mismatches(
        outputs, described_outputs, "output", check_shapes=static
    )
    if problems:
        raise ExportError(f"{name}: the Core ML package does not match the component spec: {'; '.join(problems)}")


def psnr(reference: np.ndarray, actual: np.ndarray) -> float:
    """Peak signal-to-noise ratio in dB, the peak being the reference's largest magnitude (as Apple's check)."""
    reference = np.asarray(reference, dtype=np.float64)
    actual = np.asarray(actual, dtype=np.float64)
    mse = float(np.mean((reference - actual) ** 2))
    peak = float(np.abs(reference).max()) if reference.size else 0.0
    if mse == 0.0:
        return float("inf")
    if peak == 0.0:
        return float("-inf")
    return float(20 * np.log10(peak) - 10 * np.log10(mse))


def validate_prediction(
    spec: ComponentSpec,
    module: Any,
    package: Path,
    inputs: tuple[CoreMLTensor, ...],
    outputs: tuple[CoreMLTensor, ...],
    values: dict[str, int],
) -> dict[str, Any]:
    """macOS only: run the package and PyTorch fp32 on the same sample inputs; every output must pass the gate."""
    import torch

    ct = import_coremltools()
    feeds = sample_inputs(spec, values, seed=1)
    with torch.no_grad():
        reference = module(*(torch.from_numpy(feeds[name]) for name in spec.input_names))
    expected = {name: tensor.float().numpy() for name, tensor in zip(spec.output_names, reference, strict=True)}
    model = ct.models.MLModel(str(package))
    predicted = outputs_by_spec_name(model.predict(adapt_feeds(feeds, inputs)), outputs)
    scores = {name: psnr(expected[name], predicted[name]) for name in spec.output_names}
    failures = [f"{name}: {score:.1f} dB" for name, score in scores.items() if not score >= PSNR_GATE_DB]
    if failures:
        raise ExportError(
            f"{spec.name}: Core ML output differs from PyTorch fp32 below {PSNR_GATE_DB:.0f} dB PSNR "
            f"({'; '.join(failures)})"
        )
    return {
        "validated": "prediction vs pytorch fp32",
        "psnr_db": scores,
        "psnr_gate_db": PSNR_GATE_DB,
        "validation_shapes": {name: list(value.shape) for name, value in feeds.items()},
    }


# -- the bundle -----------------------------------------------------------------------------------------------


def remove_onnx(component_dir: Path) -> None:
    """Delete a component's ONNX file and its external data (``*_data``)."""
    for path in [*component_dir.glob("*.onnx"), *component_dir.glob("*.onnx_data")]:
        path.unlink()


def build_mlpackage(
    module: Any,
    exported: Component,
    package: Path,
    shape_range: ShapeRange,
    pipeline_info: PipelineInfo,
    options: CoreMLBuildOptions,
    quiet: bool,
) -> Artifact:
    """Convert, save and check one component; returns its ``mlpackage`` artifact."""
    import coremltools

    onnx_variant = exported.artifacts["onnx"]
    spec = exported.spec.with_dtypes(onnx_variant.io_dtype)  # float16 for fp16 components, float32 for a kept-fp32 VAE
    torch_spec = exported.spec  # float32: what the fp32 torch module takes
    values = stage_values(spec, shape_range, pipeline_info.vae_scale_factor)
    inputs, outputs = coreml_io(spec, values)
    flexible = not all(tensor.is_static for tensor in inputs)
    compute_precision = "float16" if any(t.dtype == "float16" for t in spec.outputs) else "float32"
    started = time.perf_counter()
    try:
        program = capture_for_conversion(torch_spec, module, values, pipeline_info)
        model = convert(program, inputs, outputs, compute_precision, options, quiet)
    except Exception as error:  # the converters raise anything from AssertionError to NotImplementedError
        first_line = (str(error).strip().splitlines() or [""])[0][:300]
        advice = (
            "export static shapes instead (drop --dynamic and MIN:OPT:MAX ranges)"
            if flexible
            else "this model has an op coremltools cannot convert; use --target onnx"
        )
        raise ExportError(
            f"{spec.name}: Core ML conversion failed ({type(error).__name__}: {first_line}): {advice}"
        ) from error
    if package.exists():
        shutil.rmtree(package)
    model.save(str(package))
    seconds = time.perf_counter() - started
    check_package(spec.name, package, inputs, outputs)
    if platform.system() == "Darwin":
        validation = validate_prediction(torch_spec, module, package, inputs, outputs, values["opt"])
    else:
        validation = {"validated": SPEC_ONLY}
    bundle_root = package.parent.parent
    return Artifact(
        ARTIFACT_FORMAT,
        f"{spec.name}/{PACKAGE_NAME}",
        "fp16" if compute_precision == "float16" else "fp32",
        name=onnx_variant.name,
        io_dtype=onnx_variant.io_dtype,
        files=tuple(sorted(p.relative_to(bundle_root).as_posix() for p in package.rglob("*") if p.is_file())),
        produced_by={"tool": f"coremltools {coremltools.__version__} (torch.export)"},
        details=CoreMLPackageDetails(
            inputs=inputs,
            outputs=outputs,
            minimum_deployment_target=options.deployment_label,
            compute_precision=compute_precision,
            shape_range=shape_range,
            flexible=flexible,
            coremltools_version=coremltools.__version__,
            conversion_seconds=round(seconds, 2),
            validation=validation,
        ).to_json(),
    )


def build(request: BuildRequest) -> dict[str, Component]:
    """Convert every exported component to ``<component>/model.mlpackage``; drop the ONNX unless ``keep_onnx``."""
    from tqdm.auto import tqdm

    options = CoreMLBuildOptions.from_target_options(request.options)
    import_coremltools()  # once, quietly, before the progress bar
    built: dict[str, Component] = {}
    for name in tqdm(list(request.components), desc="convert Core ML", disable=request.quiet, unit="component"):
        exported = request.components[name]
        artifact = build_mlpackage(
            request.modules[name],
            exported,
            request.staging / name / PACKAGE_NAME,
            request.shape_range,
            request.pipeline,
            options,
            request.quiet,
        )
        variants = (artifact, *exported.variants) if options.keep_onnx else (artifact,)  # the package first
        built[name] = Component(spec=exported.spec, variants=variants, validation=exported.validation)
    if not options.keep_onnx:
        for name in request.components:
            remove_onnx(request.staging / name)
    return built


TARGET = Target(
    name="coreml",
    artifact_format=ARTIFACT_FORMAT,
    default_precision="fp16",
    precisions=("fp16", "fp32"),
    install_hint=f"pip install '{PIP_EXTRA}'",
    preflight=preflight,
    build=build,
    needs_modules=True,
)
