"""TensorRT target: one serialized engine per component, built from the ONNX files the exporter checked.

One builder serves both flavours: standard TensorRT (``tensorrt``, builds on the GPU it targets) and TensorRT for
RTX (``tensorrt_rtx_bindings``, builds ahead of time without a GPU, JIT-compiles kernels on the user's GPU).
Both parse the ONNX file with TensorRT's ONNX parser into a strongly typed network where the flavour supports it,
so precision follows the ONNX types: the fp16 components run in fp16 and a VAE exported fp32 (its config sets
``force_upcast``: it overflows in fp16) stays fp32. Optimisation profiles come from the same component specs as
everything else (:meth:`ComponentProfiles.derive`), static by default.

Nothing here imports TensorRT at module level: the ONNX target and the rest of the CLI work without it, and
``--target tensorrt`` without it fails before the model is loaded (:func:`preflight`) with what to install.

The timing cache (``--timing-cache``) is read and written for standard TensorRT only. TensorRT-RTX deprecated
timing caches in 1.2: they do not change its engines, and 1.7 needs a GPU even to deserialize one. Its kernels
are cached at run time instead (the runtime backend keeps a TensorRT-RTX runtime cache per engine).
"""

from __future__ import annotations

import os
import re
import time
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

from lcm_export import DISTRIBUTION
from lcm_export.errors import ExportError
from lcm_export.runtime.backends.tensorrt import (
    FLAVOR_INSTALL,
    FLAVOR_NAMES,
    device_compute_capability,
    gpu_count,
    import_flavor,
)
from lcm_export.runtime.cache import cache_root
from lcm_export.runtime.manifest import (
    COMPUTE_CAPABILITY,
    OPTIMIZATION_LEVELS,
    TENSORRT_DTYPES,
    Artifact,
    Component,
    IOTensor,
    TensorRTEngineDetails,
    parse_compute_capability,
)
from lcm_export.runtime.specs import ComponentProfiles, ComponentSpec
from lcm_export.targets import BuildRequest, Target

FLAVORS = ("auto", "tensorrt", "rtx")
SIZE_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20, "gib": 2**30}
ENGINE_NAME = "model.plan"


@dataclass(frozen=True)
class TensorRTBuildOptions:
    """The TensorRT settings of one export, checked: built from ``ExportConfig.target_options``."""

    flavor: str = "auto"  # "auto" (standard TensorRT when importable and a GPU is present, else RTX), "tensorrt", "rtx"
    compute_capabilities: tuple[int, ...] = ()  # TensorRT-RTX targets, e.g. (86, 89); () = the builder's default
    builder_optimization_level: int = 3
    workspace_bytes: int | None = None  # None: TensorRT's default (the GPU's memory)
    timing_cache: Path | None = None  # None: a file per flavour and version under the lcm-export cache folder
    keep_onnx: bool = False
    # The weights run-time adapters change marked refittable (BuilderFlag.REFIT_INDIVIDUAL), the ONNX kept as the
    # weights' source: adapters refit the U-Net and text encoders by initializer name (lcm_export.runtime.adapters).
    # TensorRT-RTX 1.7 compiles refittable weights with CUDA at build time: a GPU is needed to build (preflight).
    refit: bool = False

    @classmethod
    def from_target_options(cls, options: dict[str, Any]) -> TensorRTBuildOptions:
        """Check and convert the CLI's ``target_options``; every bad value is a one-line :class:`ExportError`."""
        flavor = str(options.get("trt_flavor") or "auto")
        if flavor not in FLAVORS:
            raise ExportError(f"--trt-flavor {flavor}: pick one of {', '.join(FLAVORS)}")
        capabilities = []
        for value in options.get("compute_capabilities") or ():
            try:
                capabilities.append(parse_compute_capability(value))
            except ValueError:
                raise ExportError(
                    f"--compute-capability {value}: pass a GPU compute capability like 86, SM89 or 8.6"
                ) from None
        level = options.get("builder_optimization_level", 3)
        if not isinstance(level, int) or level not in OPTIMIZATION_LEVELS:
            raise ExportError(f"--builder-optimization-level {level}: pick an integer from 0 to 5 (default 3)")
        workspace = options.get("workspace")
        timing_cache = options.get("timing_cache")
        return cls(
            flavor=flavor,
            compute_capabilities=tuple(dict.fromkeys(capabilities)),
            builder_optimization_level=level,
            workspace_bytes=parse_size("--workspace", str(workspace)) if workspace else None,
            timing_cache=Path(timing_cache) if timing_cache else None,
            keep_onnx=bool(options.get("keep_onnx", False)) or bool(options.get("refit", False)),
            refit=bool(options.get("refit", False)),
        )


def parse_size(flag: str, text: str) -> int:
    """``"4GiB"`` -> 4294967296, ``"512MiB"``, ``"1.5GB"``, ``"1000000"`` (bytes); binary and decimal units."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmg]i?b|b)?\s*", text, flags=re.IGNORECASE)
    if not match or float(match[1]) <= 0:
        raise ExportError(f"{flag} '{text}': pass a size like 4GiB, 512MiB or 2GB")
    return int(float(match[1]) * SIZE_UNITS[(match[2] or "").lower()])


@dataclass(frozen=True)
class Flavor:
    """The TensorRT flavour an export builds with: its name ("tensorrt" or "rtx"), module and version."""

    name: str
    module: ModuleType
    version: str

    @property
    def display_name(self) -> str:
        return f"{FLAVOR_NAMES[self.name]} {self.version}"

    @property
    def strongly_typed(self) -> bool:
        """Whether networks can be strongly typed (TensorRT-RTX always; standard TensorRT from 9.1)."""
        return hasattr(self.module.NetworkDefinitionCreationFlag, "STRONGLY_TYPED")

    def valid_compute_capabilities(self) -> dict[int, Any]:
        """TensorRT-RTX's target GPUs: 86 -> ``ComputeCapability.SM86`` (read from the installed module)."""
        members = getattr(self.module, "ComputeCapability", None)
        if members is None:
            return {}
        return {
            parse_compute_capability(name): member
            for name, member in members.__members__.items()
            if COMPUTE_CAPABILITY.fullmatch(name)  # SM75, SM86, ... (not CURRENT)
        }


def resolve_flavor(requested: str) -> Flavor:
    """Import the flavour asked for; ``auto`` prefers standard TensorRT on a GPU machine, else TensorRT-RTX."""
    if requested not in FLAVORS:
        raise ExportError(f"--trt-flavor {requested}: pick one of {', '.join(FLAVORS)}")
    if requested == "auto":
        standard = import_flavor("tensorrt")
        if standard is not None and gpu_count() > 0:
            return Flavor("tensorrt", standard, str(standard.__version__))
        rtx = import_flavor("rtx")
        if rtx is not None:
            return Flavor("rtx", rtx, str(rtx.__version__))
        if standard is not None:
            requested = "tensorrt"  # installed but no GPU: the check below says so
        else:
            raise ExportError(
                f"--target tensorrt needs TensorRT: {FLAVOR_INSTALL['rtx']} for TensorRT-RTX (builds without a "
                "GPU), or pip install tensorrt for standard TensorRT on a GPU machine"
            )
    module = import_flavor(requested)
    if module is None and requested == "tensorrt" and import_flavor("rtx") is not None:
        raise ExportError(
            f"--trt-flavor tensorrt: standard TensorRT is not installed: {FLAVOR_INSTALL['tensorrt']}, or use "
            "--trt-flavor rtx (TensorRT-RTX, installed here)"
        )
    if module is None:
        raise ExportError(
            f"--trt-flavor {requested}: {FLAVOR_NAMES[requested]} is not installed: {FLAVOR_INSTALL[requested]}"
        )
    if requested == "tensorrt" and gpu_count() == 0:
        raise ExportError(
            "--trt-flavor tensorrt: standard TensorRT builds on the GPU it targets and no NVIDIA GPU was found: "
            "use --trt-flavor rtx (TensorRT-RTX builds without a GPU)"
        )
    return Flavor(requested, module, str(module.__version__))


def compute_capability_targets(flavor: Flavor, requested: tuple[int, ...]) -> list[Any]:
    """The builder's ``ComputeCapability`` members for ``requested``; a bad value lists the valid ones."""
    if not requested:
        return []
    if flavor.name != "rtx":
        raise ExportError(
            "--compute-capability applies to TensorRT-RTX (--trt-flavor rtx); standard TensorRT builds for the "
            "GPU of this machine"
        )
    valid = flavor.valid_compute_capabilities()
    for value in requested:
        if value not in valid:
            listed = ", ".join(str(key) for key in sorted(valid))
            raise ExportError(
                f"--compute-capability {value}: {flavor.display_name} builds for {listed} (e.g. 86 or SM89)"
            )
    return [valid[value] for value in requested]


def preflight(target_options: Mapping[str, Any]) -> None:
    """Everything about ``--target tensorrt`` that can fail before the model is loaded: the options, the
    flavour (installed? a GPU for standard TensorRT?) and the compute capabilities."""
    options = TensorRTBuildOptions.from_target_options(target_options)
    flavor = resolve_flavor(options.flavor)
    compute_capability_targets(flavor, options.compute_capabilities)
    if options.refit and gpu_count() == 0:
        raise ExportError(
            f"--trt-refit: {flavor.display_name} {flavor.version} compiles refittable weights with CUDA while it "
            "builds, and no NVIDIA GPU was found: build on a machine with one, or drop --trt-refit"
        )


# -- timing cache (standard TensorRT) -------------------------------------------------------------------------


def default_timing_cache_path(flavor: str, version: str) -> Path:
    """One timing cache per flavour and version: a cache from another TensorRT release is of no use."""
    return cache_root() / f"trt-timing-{flavor}-{version}.cache"


def load_timing_cache(builder_config: Any, path: Path) -> tuple[Any, int]:
    """A timing cache object made from ``path`` (empty when the file is missing or unreadable), and the number
    of bytes read from it. A cache only saves build time, so a bad file never fails the export."""
    try:
        data = path.read_bytes()
    except OSError:
        data = b""
    cache = builder_config.create_timing_cache(data)
    if cache is None and data:
        warnings.warn(f"timing cache '{path}' is unreadable; starting a new one", stacklevel=2)
        cache, data = builder_config.create_timing_cache(b""), b""
    return cache, len(data)


def save_timing_cache(cache: Any, path: Path) -> int:
    """Write ``cache`` to ``path`` atomically; returns the bytes written (0 when the folder is read-only)."""
    data = bytes(cache.serialize())
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        temporary.write_bytes(data)
        temporary.replace(path)
    except OSError:
        return 0
    return len(data)


# -- building -------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class EngineBuild:
    """One built engine: the serialized plan, its I/O as the parsed network declares it, and the build time."""

    plan: bytes
    io: tuple[IOTensor, ...]
    seconds: float


def collecting_logger(trt: ModuleType) -> Any:
    """A TensorRT logger that keeps errors (for one-line messages) and prints nothing."""

    class CollectingLogger(trt.ILogger):
        def __init__(self) -> None:
            trt.ILogger.__init__(self)
            self.errors: list[str] = []

        def log(self, severity: Any, message: str) -> None:
            if severity in (trt.ILogger.Severity.INTERNAL_ERROR, trt.ILogger.Severity.ERROR):
                self.errors.append(" ".join(str(message).split()))

    return CollectingLogger()


def parse_onnx(flavor: Flavor, builder: Any, logger: Any, onnx_path: Path, component: str) -> tuple[Any, Any]:
    """Parse ``onnx_path`` into a new network (external weights resolve from its folder); every parser error
    is reported. Returns (network, parser): the parser owns weights the network refers to until the build."""
    trt = flavor.module
    flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED) if flavor.strongly_typed else 0
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = []
        for index in range(parser.num_errors):
            error = parser.get_error(index)
            where = f"node {error.node()} '{error.node_name()}' ({error.node_operator()})" if error.node() >= 0 else ""
            errors.append(f"{where}: {error.desc()}" if where else str(error.desc()))
        details = "; ".join(errors) or "; ".join(logger.errors) or "no details"
        raise ExportError(
            f"{component}: {flavor.display_name} cannot parse '{onnx_path.name}' ({len(errors)} error(s)): {details}"
        )
    return network, parser


def network_io(flavor: Flavor, network: Any) -> tuple[IOTensor, ...]:
    """The network's inputs then outputs: names, numpy dtype names and shapes (-1 where set at run time)."""

    def describe(tensor: Any, mode: str) -> IOTensor:
        dtype = TENSORRT_DTYPES.get(tensor.dtype.name, tensor.dtype.name.lower())
        return IOTensor(tensor.name, mode, dtype, tuple(int(d) for d in tensor.shape))

    inputs = [describe(network.get_input(i), "input") for i in range(network.num_inputs)]
    outputs = [describe(network.get_output(i), "output") for i in range(network.num_outputs)]
    return (*inputs, *outputs)


def check_io_against_spec(component: str, io: tuple[IOTensor, ...], spec: ComponentSpec) -> None:
    """The engine must take and give exactly what the manifest says: names, dtypes and ranks."""
    expected = {(t.name, "input", t.dtype, len(t.shape)) for t in spec.inputs}
    expected |= {(t.name, "output", t.dtype, len(t.shape)) for t in spec.outputs}
    actual = {(t.name, t.mode, t.dtype, len(t.shape)) for t in io}
    if actual != expected:
        missing = sorted(f"{n} ({m}, {d}, rank {r})" for n, m, d, r in expected - actual)
        extra = sorted(f"{n} ({m}, {d}, rank {r})" for n, m, d, r in actual - expected)
        raise ExportError(
            f"{component}: the TensorRT network's I/O differs from the component spec (spec only: "
            f"{', '.join(missing) or '-'}; network only: {', '.join(extra) or '-'})"
        )


def build_engine(
    flavor: Flavor,
    onnx_path: Path,
    spec: ComponentSpec,
    profiles: ComponentProfiles,
    options: TensorRTBuildOptions,
    *,
    precision: str,
    compute_capabilities: list[Any],
    timing_cache: Any = None,
    refittable: frozenset[str] = frozenset(),
) -> EngineBuild:
    """Build one engine: parse, check the I/O against ``spec``, one optimisation profile, serialize;
    ``refittable``: the weights (ONNX initializer names) marked refittable (``--trt-refit``).

    ``precision`` is the ONNX file's ("fp16" or "fp32"); it matters only for a standard TensorRT without strong
    typing, where fp16 is a builder flag (and an fp32 component, a force_upcast VAE, is built without it).
    """
    trt = flavor.module
    start = time.perf_counter()
    logger = collecting_logger(trt)
    builder = trt.Builder(logger)
    if builder is None:
        raise ExportError(f"{spec.name}: {flavor.display_name} could not create a builder ({'; '.join(logger.errors)})")
    network, parser = parse_onnx(flavor, builder, logger, onnx_path, spec.name)
    io = network_io(flavor, network)
    check_io_against_spec(spec.name, io, spec)

    config = builder.create_builder_config()
    config.builder_optimization_level = options.builder_optimization_level
    if options.workspace_bytes is not None:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, options.workspace_bytes)
    if not flavor.strongly_typed and precision == "fp16":
        config.set_flag(trt.BuilderFlag.FP16)
    if refittable:
        # Only the weights adapters change are refittable (REFIT_INDIVIDUAL): the others stay constants the builder
        # may fold. The ONNX parser names each weight after its initializer.
        config.set_flag(trt.BuilderFlag.REFIT_INDIVIDUAL)
        unknown = sorted(name for name in refittable if not network.mark_weights_refittable(name))
        if unknown:
            raise ExportError(
                f"{spec.name}: {flavor.display_name} has no weight named '{unknown[0]}' to make refittable: re-export"
            )
    if compute_capabilities:
        config.num_compute_capabilities = len(compute_capabilities)
        for index, capability in enumerate(compute_capabilities):
            if not config.set_compute_capability(capability, index):
                raise ExportError(f"{spec.name}: {flavor.display_name} refused compute capability {capability.name}")
    if timing_cache is not None:
        config.set_timing_cache(timing_cache, False)

    # One profile. 0-d inputs (the scalar timestep) and fully static inputs need none.
    profile = builder.create_optimization_profile()
    for tensor in io:
        if tensor.mode == "input" and -1 in tensor.shape:
            profile.set_shape(
                tensor.name, profiles.minimum[tensor.name], profiles.optimum[tensor.name], profiles.maximum[tensor.name]
            )
    config.add_optimization_profile(profile)

    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise ExportError(
            f"{spec.name}: {flavor.display_name} could not build an engine: {'; '.join(logger.errors) or 'no details'}"
        )
    del parser  # kept alive until here: the network may refer to weights it owns
    return EngineBuild(bytes(serialized), io, time.perf_counter() - start)


def _recorded_capabilities(flavor: Flavor, requested: tuple[int, ...]) -> list[int]:
    """What the runtime checks the GPU against: RTX's targets as asked ([] = its default), or the build GPU."""
    if flavor.name == "rtx":
        return list(requested)
    return [device_compute_capability(0)]


def _remove_onnx(staging: Path, component: Component) -> None:
    for variant in component.variants:
        if variant.format == "onnx":
            for file in variant.files:
                (staging / file).unlink(missing_ok=True)


def build(request: BuildRequest) -> dict[str, Component]:
    """Build ``<component>/model.plan`` for every component from its checked ONNX file.

    Each component gets a "tensorrt" artifact whose details (:class:`TensorRTEngineDetails`, what the backend
    reads) record the flavour, version, compute capabilities, optimisation profiles (spec-derived) and the
    engine's I/O. The ONNX files are removed unless ``keep_onnx``
    (then their "onnx" artifacts stay and the bundle also runs on onnxruntime, for debugging).
    """
    from tqdm.auto import tqdm

    staging, components, pipeline_info, quiet = request.staging, request.components, request.pipeline, request.quiet
    options = TensorRTBuildOptions.from_target_options(request.options)
    flavor = resolve_flavor(options.flavor)
    targets = compute_capability_targets(flavor, options.compute_capabilities)
    shape_range = request.shape_range
    capabilities = _recorded_capabilities(flavor, options.compute_capabilities)

    timing_cache = timing_cache_path = None
    if flavor.name == "tensorrt":
        timing_cache_path = options.timing_cache or default_timing_cache_path(flavor.name, flavor.version)
        cache_builder = flavor.module.Builder(collecting_logger(flavor.module))
        timing_cache, _ = load_timing_cache(cache_builder.create_builder_config(), timing_cache_path)
    elif options.timing_cache is not None and not quiet:
        tqdm.write(
            "note: --timing-cache is ignored with TensorRT-RTX (its timing caches are no-ops since 1.2); "
            "its kernels are cached at run time instead"
        )

    built: dict[str, Component] = {}
    progress = tqdm(
        list(components), desc=f"build {FLAVOR_NAMES[flavor.name]} engines", disable=quiet, unit="component"
    )
    for name in progress:
        component = components[name]
        onnx_artifact = component.artifacts["onnx"]
        profiles = ComponentProfiles.derive(component.spec, shape_range, pipeline_info.vae_scale_factor)
        refittable = request.adaptable.get(name, frozenset()) if options.refit else frozenset()
        engine = build_engine(
            flavor,
            staging / onnx_artifact.path,
            component.spec.with_dtypes(onnx_artifact.io_dtype),
            profiles,
            options,
            precision=onnx_artifact.precision,
            compute_capabilities=targets,
            timing_cache=timing_cache,
            refittable=refittable,
        )
        engine_path = staging / name / ENGINE_NAME
        engine_path.write_bytes(engine.plan)
        details = TensorRTEngineDetails(
            flavor=flavor.name,
            trt_version=flavor.version,
            compute_capabilities=tuple(capabilities),
            io=engine.io,
            profiles=profiles,
            vae_scale_factor=pipeline_info.vae_scale_factor,
            shape_range=shape_range,
            strongly_typed=flavor.strongly_typed,
            builder_optimization_level=options.builder_optimization_level,
            build_seconds=round(engine.seconds, 2),
            refittable=bool(refittable),
        )
        artifact = Artifact(
            format="tensorrt",
            path=f"{name}/{ENGINE_NAME}",
            precision=onnx_artifact.precision,
            details=details.to_json(),
            name=onnx_artifact.name,
            io_dtype=onnx_artifact.io_dtype,
            produced_by={"tool": f"{FLAVOR_NAMES[flavor.name]} {flavor.version}", "from": onnx_artifact.path},
        )
        variants = (artifact, *component.variants) if options.keep_onnx else (artifact,)  # the engine first
        built[name] = Component(spec=component.spec, variants=variants, validation=component.validation)

    if timing_cache is not None and timing_cache_path is not None:
        save_timing_cache(timing_cache, timing_cache_path)
    if not options.keep_onnx:
        for component in components.values():
            _remove_onnx(staging, component)
    return built


TARGET = Target(
    name="tensorrt",
    artifact_format="tensorrt",
    default_precision="fp16",
    precisions=("fp16", "fp32", "int8"),
    install_hint=f"pip install '{DISTRIBUTION}[tensorrt]' (TensorRT for RTX; builds without a GPU)",
    preflight=preflight,
    build=build,
)
