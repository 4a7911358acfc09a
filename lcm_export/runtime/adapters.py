"""Run-time adapters: LoRA styles applied to a loaded bundle's weights, switched between calls without re-export.

An adapter file (written by ``lcm-export adapter LORA --bundle BUNDLE``) is a safetensors file holding, per adapted
weight, the LoRA's two factors keyed by the bundle's own ONNX initializer name: ``<component>/<name>.down``
(r, in·kh·kw) and ``<component>/<name>.up`` (out, r), the LoRA's alpha/r already in ``up``; its metadata ties it to
the bundle it was made for (the sha256 of each adapted component's weight map, which records the sha256 of the
weights themselves). The format is in docs/bundle-format.md ("Adapter files").

Applying a set of adapters {file: λ} is a merge from the base weights, never from the weights of the previous set:
W' = W + Σ λᵢ·upᵢ·downᵢ (reshaped to the weight's layout, transposed where the ONNX file holds W transposed), so
A -> B -> base -> A gives each one's own weights. An INT8 (QDQ) variant's weight is dequantised, merged in float and
requantised per output channel in the range its recipe used (symmetric: scale max|W'|/L, values in [-L, L], L = 64
for 7-bit weights (``reduce_range``), 127 otherwise), and its int32 bias requantised to the new scale; activation
ranges stay as calibrated. The base weights are read from where the component's weight map says they are (file,
offset, length): no ONNX parser is needed.

Three ways to run adapters (``adapter_mode``, measured in docs/design-notes.md#adapters):

- ``"factors"``: the float variant's *factor-inputs graph* (written by the export beside it: a LoRA branch beside
  every mapped weight, ``y + (x·down)·up``, its factors graph inputs of any rank) runs with the active adapters'
  stacked factors bound once, the branches of the layers they do not touch cut out of the graph first (a rank-0
  branch still runs: 7% of an SD1.5 U-Net's call on onnxruntime). Nothing is merged: a switch binds new factors to
  the open session (onnxruntime: one session for every set of adapters that touch the same weights; OpenVINO:
  compiled per set of ranks). Each call costs about the factors' share of the weights' work (SD1.5-shaped U-Net at
  256 px: about +1% on onnxruntime and +2% on OpenVINO for a rank-16 attention LoRA, +16.5% on onnxruntime for
  rank 64 on every layer). onnxruntime and OpenVINO, float variants.
- ``"inputs"``: the float variant's *weight-inputs graph* (the same graph with every mapped weight a graph input)
  runs with the weights fed at every call: the merged ones for the layers the adapters touch, the stored ones
  (memory-mapped from the bundle) for the rest. A switch is the merge alone and the session stays open (1.2-2 s
  for a rank-64 adapter on every layer of the SD1.5-shaped U-Net on two cores), for a cost per call the size of
  the weights, whatever the adapters (the backend cannot pre-pack or re-lay out weights it does not know at load).
  onnxruntime, float variants.
- ``"rebuild"``: the merged weights replace the initializers and a new, fully optimised session opens (onnxruntime:
  ``add_external_initializers``; OpenVINO: constants replaced before compiling): no cost per call, tens of seconds
  per switch at SD1.5's size. INT8 variants, and the large adapters on OpenVINO (its kernels run 2.8x slower with
  weights as inputs).
- ``"auto"`` (the default), per component: ``"factors"`` where the backend, the variant and the bundle allow it and
  the active factors are at most :data:`FACTOR_SHARE_AUTO` of the weights, else ``"inputs"`` where allowed, else
  ``"rebuild"``.

Back to the base weights (``{}``), a component that ran factors stays on its factor session with every factor zero:
each branch adds (x·0)·0 = 0 to its layer's own output, so the image is the base session's bit for bit (tested on
both backends) and the switch opens nothing (a style adapter on -> off -> on: three bindings). The others reopen
their own optimised session (from the compiled-model cache).

Everything read from an adapter file or a weight map is checked at the border: a file made for another bundle,
factors for weights the bundle does not have, shapes or ranks that do not fit, non-finite values or weights are
each one :class:`AdapterError` line.
"""

from __future__ import annotations

import functools
import json
import math
import struct
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lcm_export.errors import UserError
from lcm_export.runtime.factor_graph import FactorGraphError
from lcm_export.runtime.manifest import Manifest

WEIGHT_MAP_NAME = "weights.json"  # per component folder
WEIGHT_MAP_FORMAT = "lcm-export-weight-map"
WEIGHT_MAP_VERSION = 1
ADAPTER_FORMAT = "lcm-export-adapter"
ADAPTER_VERSION = "1"
MAX_HEADER_BYTES = 100_000_000  # a safetensors header larger than this is not an adapter file
# Symmetric int8 weights as onnxruntime's quantizer writes them (quant_utils.get_qmin_qmax_for_qType): [-127, 127],
# or [-64, 64] with reduce_range (7-bit weights); the scale is max|W| / L for L levels either side of zero.
INT8_LEVELS = 127.0
INT8_REDUCED_LEVELS = 64.0
ADAPTER_MODES = ("auto", "factors", "inputs", "rebuild")
# "auto" runs a component's adapters as factor inputs while their factors are at most this share of the component's
# adaptable weights (measured per call at 256 px on the SD1.5-shaped U-Net, docs/design-notes.md#adapters: a
# rank-16 attention LoRA, 0.4% of the weights, +1.3% on onnxruntime and +2.7% on OpenVINO; rank 32 on every
# transformer projection, 0.8%, +3.1% / +7.9%; rank 64 on every layer, 7.9%, +16.5%); above it, the merge.
FACTOR_SHARE_AUTO = 0.01
# A float32 weight plus a ΔW bounded by this stays finite (float32 reaches 3.4e38): its merge needs no finiteness pass.
FINITE_DELTA_BOUND = 1e30
LOADED_ADAPTERS_KEPT = 4  # adapter files kept read and checked (an SD1.5 rank-64 LCM-LoRA-shaped one: 255 MB)
_SAFETENSORS_DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": None, "F64": np.float64}


class AdapterError(UserError):
    """An adapter file or weight that cannot be applied to this bundle."""


# -- the bundle side: weight maps --------------------------------------------------------------------------------


@dataclass(frozen=True)
class MappedWeight:
    """One adaptable weight of a component: its float ONNX initializer name, the torch module it came from, its
    kind ("linear", "conv") and layout ("same", or "transposed": the ONNX holds Wᵀ), and its ONNX shape."""

    name: str
    module: str
    kind: str
    layout: str
    shape: tuple[int, ...]

    @property
    def torch_shape(self) -> tuple[int, ...]:
        """(out, in) or (out, in, kh, kw): the shape a LoRA's B·A has."""
        return tuple(reversed(self.shape)) if self.layout == "transposed" else self.shape


@dataclass(frozen=True)
class WeightMap:
    """A component's ``weights.json``: its adaptable weights and, per ONNX variant, where they are stored."""

    component: str
    path: str  # inside the bundle
    sha256: str  # as the manifest lists it: what an adapter file is tied to
    weights: dict[str, MappedWeight]
    variants: dict[str, dict[str, Any]]  # variant name -> {"path", "tensors": {name: location}}


def _map_error(path: str, problem: str) -> AdapterError:
    return AdapterError(f"weight map '{path}' {problem}: re-export the bundle")


def read_weight_map(bundle_dir: Path, manifest: Manifest, component: str) -> WeightMap | None:
    """The weight map of ``component``, or None where the bundle has none (exported before weight maps, or a
    component without Linear/Conv weights). Its hash was verified with the bundle's other files."""
    relative = manifest.components[component].weight_map
    if relative is None:
        return None
    hashes = {entry.path: entry.sha256 for entry in manifest.files}
    if relative not in hashes:
        raise _map_error(relative, "is not listed in the manifest's files")
    try:
        data = json.loads((bundle_dir / relative).read_text())
    except (OSError, ValueError) as error:
        raise _map_error(relative, f"cannot be read ({type(error).__name__})") from None
    if not isinstance(data, dict) or data.get("format") != WEIGHT_MAP_FORMAT or data.get("version") != 1:
        raise _map_error(relative, f"is not a version-{WEIGHT_MAP_VERSION} {WEIGHT_MAP_FORMAT}")
    weights: dict[str, MappedWeight] = {}
    try:
        for name, entry in data["weights"].items():
            shape = tuple(int(dim) for dim in entry["shape"])
            if entry["kind"] not in ("linear", "conv") or entry["layout"] not in ("same", "transposed"):
                raise ValueError(name)
            weights[name] = MappedWeight(name, str(entry["module"]), entry["kind"], entry["layout"], shape)
        variants = {str(name): dict(entry) for name, entry in data["variants"].items()}
    except (KeyError, TypeError, ValueError, AttributeError) as error:
        raise _map_error(relative, f"has a malformed entry ({error})") from None
    return WeightMap(component, relative, hashes[relative], weights, variants)


def _read_location(bundle_dir: Path, manifest: Manifest, where: Any, what: str) -> np.ndarray:
    """The tensor stored at ``where`` ({file, offset, length, dtype, shape}) in a bundle file the manifest lists."""
    try:
        file, offset, length = str(where["file"]), int(where["offset"]), int(where["length"])
        dtype, shape = np.dtype(where["dtype"]), tuple(int(dim) for dim in where["shape"])
    except (KeyError, TypeError, ValueError) as error:
        raise AdapterError(f"{what}: malformed location in its weight map ({error}): re-export the bundle") from None
    if file not in {entry.path for entry in manifest.files}:
        raise AdapterError(f"{what}: its weight map names '{file}', which the manifest does not list: re-export")
    count = math.prod(shape) if shape else 1
    if offset < 0 or count * dtype.itemsize != length:
        raise AdapterError(f"{what}: its weight map's location does not fit its shape: re-export the bundle")
    values = np.fromfile(bundle_dir / file, dtype=dtype, count=count, offset=offset)
    if values.size != count:
        raise AdapterError(f"{what}: '{file}' is shorter than its weight map says: re-export the bundle")
    return values.reshape(shape)


# -- adapter files -----------------------------------------------------------------------------------------------


def read_safetensors(path: Path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Tensors and metadata of a safetensors file, read with numpy only (8-byte header length, JSON header,
    little-endian data). Raises :class:`AdapterError` on anything that is not one."""
    label = f"adapter '{path}'"
    try:
        raw = path.read_bytes()
    except OSError as error:
        raise AdapterError(
            f"{label} cannot be read ({error.strerror or type(error).__name__}): pass an adapter file "
            "made by lcm-export adapter"
        ) from None
    try:
        (header_size,) = struct.unpack("<Q", raw[:8])
        if not 0 < header_size <= min(MAX_HEADER_BYTES, len(raw) - 8):
            raise ValueError("header size")
        header = json.loads(raw[8 : 8 + header_size])
        if not isinstance(header, dict):
            raise ValueError("header")
        metadata = header.pop("__metadata__", {}) or {}
        data = memoryview(raw)[8 + header_size :]
        tensors: dict[str, np.ndarray] = {}
        for name, entry in header.items():
            dtype = _SAFETENSORS_DTYPES.get(entry["dtype"])
            if dtype is None:
                raise ValueError(f"dtype {entry['dtype']}")
            start, end = (int(value) for value in entry["data_offsets"])
            shape = tuple(int(dim) for dim in entry["shape"])
            if not 0 <= start <= end <= len(data) or (end - start) != math.prod(shape) * np.dtype(dtype).itemsize:
                raise ValueError(f"offsets of {name}")
            tensors[name] = np.frombuffer(data[start:end], dtype=np.dtype(dtype).newbyteorder("<")).reshape(shape)
    except (struct.error, ValueError, KeyError, TypeError) as error:
        raise AdapterError(
            f"{label} is not a safetensors file ({error}): pass an adapter file made by lcm-export adapter"
        ) from None
    return tensors, {str(key): str(value) for key, value in metadata.items()}


@dataclass(frozen=True)
class AdapterLayer:
    """One adapted weight: ``up`` (out, r) · ``down`` (r, in·kh·kw) is its ΔW in torch's layout, alpha/r included."""

    component: str
    weight: str  # the float ONNX initializer name
    down: np.ndarray
    up: np.ndarray

    @functools.cached_property
    def delta_peak(self) -> float:
        """An upper bound of max|up·down|: r·max|up|·max|down| (computed once per loaded adapter)."""
        return self.up.shape[1] * float(np.abs(self.up).max(initial=0)) * float(np.abs(self.down).max(initial=0))


@dataclass(frozen=True)
class Adapter:
    """A checked adapter file: its layers and what it was made from."""

    path: Path
    source: str  # the LoRA it was made from, as recorded
    layers: tuple[AdapterLayer, ...]

    @property
    def components(self) -> tuple[str, ...]:
        return tuple(sorted({layer.component for layer in self.layers}))


def load_adapter(path: str | Path, bundle_dir: Path, weight_maps: Mapping[str, WeightMap]) -> Adapter:
    """Read ``path`` and check it against this bundle's weight maps: the bundle it was made for, every key, every
    shape and rank, finite values."""
    path = Path(path)
    label = f"adapter '{path}'"
    tensors, metadata = read_safetensors(path)
    if metadata.get("format") != ADAPTER_FORMAT:
        raise AdapterError(
            f"{label} is not an lcm-export adapter file (no '{ADAPTER_FORMAT}' metadata): make one "
            "with lcm-export adapter LORA --bundle BUNDLE --output FILE"
        )
    if metadata.get("version") != ADAPTER_VERSION:
        raise AdapterError(
            f"{label} is adapter format version {metadata.get('version')!r}; this runtime reads "
            f"{ADAPTER_VERSION}: make it again with this lcm-export"
        )
    try:
        made_for = json.loads(metadata.get("bundle", ""))
        assert isinstance(made_for, dict)
    except (ValueError, AssertionError):
        raise AdapterError(f"{label} has no valid 'bundle' metadata: make it again with lcm-export adapter") from None
    for component, digest in sorted(made_for.items()):
        weight_map = weight_maps.get(component)
        if weight_map is None or weight_map.sha256 != digest:
            what = "has no weight map for it" if weight_map is None else "has other weights"
            raise AdapterError(
                f"{label} was made for another bundle (its {component} {what} here): make it for this one with "
                f"lcm-export adapter LORA --bundle '{bundle_dir}' --output FILE"
            )
    groups: dict[tuple[str, str], dict[str, np.ndarray]] = {}
    for key, values in tensors.items():
        component, _, rest = key.partition("/")
        weight, _, role = rest.rpartition(".")
        if component not in made_for or role not in ("down", "up") or not weight:
            raise AdapterError(
                f"{label} holds a tensor '{key}' that is not <component>/<weight>.down|.up of a "
                "component it was made for: make it again with lcm-export adapter"
            )
        groups.setdefault((component, weight), {})[role] = values
    layers = []
    for (component, weight), factors in sorted(groups.items()):
        mapped = weight_maps[component].weights.get(weight)
        where = f"{label}: {component} weight '{weight}'"
        if mapped is None:
            raise AdapterError(f"{where} is not an adaptable weight of this bundle: make the adapter for this bundle")
        if set(factors) != {"down", "up"}:
            raise AdapterError(f"{where} has only its {next(iter(factors))} factor: make the adapter again")
        down, up = factors["down"].astype(np.float32), factors["up"].astype(np.float32)
        out_features, inner = mapped.torch_shape[0], math.prod(mapped.torch_shape[1:])
        fits = down.ndim == 2 and up.ndim == 2 and up.shape[1] == down.shape[0]
        if not fits or up.shape[0] != out_features or down.shape[1] != inner:
            raise AdapterError(
                f"{where}: factors {list(up.shape)} x {list(down.shape)} do not fit the weight "
                f"{list(mapped.torch_shape)} (up (out, r), down (r, in*kh*kw)): make the adapter for this bundle"
            )
        if not (np.isfinite(down).all() and np.isfinite(up).all()):
            raise AdapterError(f"{where} holds NaN or inf: the LoRA it was made from is broken")
        layers.append(AdapterLayer(component, weight, down, up))
    if not layers:
        raise AdapterError(f"{label} adapts no weight: make it again with lcm-export adapter")
    return Adapter(path, metadata.get("source", path.name), tuple(layers))


def check_adapter_weights(adapters: Any) -> dict[str, float]:
    """``{FILE: weight, ...}`` (a mapping; an empty one means the base weights) with finite numeric weights."""
    if not isinstance(adapters, Mapping):
        raise AdapterError(f"adapters={adapters!r}: pass a dict {{'style.safetensors': 0.8, ...}} ({{}}: no adapter)")
    checked: dict[str, float] = {}
    for path, weight in adapters.items():
        if isinstance(weight, bool) or not isinstance(weight, (int, float, np.floating)) or not math.isfinite(weight):
            raise AdapterError(f"adapter '{path}': weight {weight!r} is not a finite number: pass e.g. 0.8")
        checked[str(path)] = float(weight)
    return checked


# -- merging -----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class WeightOverrides:
    """Initializers of one ONNX variant to replace when its session opens: name -> new value, and for those stored
    inside the .onnx file itself (small models) the byte offset of their data there, so that a backend that can
    only replace external data (onnxruntime) patches those bytes in a copy of the file instead."""

    values: dict[str, np.ndarray]
    inline_offsets: dict[str, int]

    def __bool__(self) -> bool:
        return bool(self.values)


def _terms_by_weight(
    component: str, active: list[tuple[Adapter, float]]
) -> dict[str, list[tuple[float, AdapterLayer]]]:
    """The ``active`` adapters' layers of ``component`` with a non-zero weight, grouped by the weight they adapt."""
    terms: dict[str, list[tuple[float, AdapterLayer]]] = {}
    for adapter, weight in active:
        for layer in adapter.layers:
            if layer.component == component and weight != 0:
                terms.setdefault(layer.weight, []).append((weight, layer))
    return terms


def _stacked(terms: list[tuple[float, AdapterLayer]]) -> tuple[np.ndarray, np.ndarray]:
    """([λ₁·up₁ | λ₂·up₂ ...], [down₁; down₂ ...]): ``terms``' factors stacked along the rank, float32."""
    ups = np.concatenate([np.float32(weight) * layer.up for weight, layer in terms], axis=1)
    downs = np.concatenate([layer.down for _, layer in terms], axis=0)
    return ups, downs


MERGE_BLOCK_BYTES = 1 << 20  # rows of a float merge computed per product: ~1 MB, still in cache for the add


def _merged_float(mapped: MappedWeight, terms: list[tuple[float, AdapterLayer]], base: np.ndarray) -> np.ndarray:
    """``base`` + Σ λ·up·down in the ONNX layout of ``mapped``, float32: one product of the stacked factors
    ([λ₁·up₁ | λ₂·up₂ ...] · [down₁; down₂ ...]), computed directly in that layout (no transposed copy), a block
    of rows at a time into the result, each block added to the base while it is in cache (one pass over memory,
    not three: measured 1.2 s against 2.0-2.5 s for a rank-64 adapter on the SD1.5-shaped U-Net). The merge of a
    float variant; INT8 variants use :func:`_delta`, whose rounding the JavaScript runtime repeats exactly."""
    ups, downs = _stacked(terms)
    # the ONNX holds (in, out) = (up·down)ᵀ = downᵀ·upᵀ for a transposed weight
    left, right = (downs.T, ups.T) if mapped.layout == "transposed" else (ups, downs)
    rows, columns = left.shape[0], right.shape[1]
    merged = np.empty((rows, columns), np.float32)
    stored = base.reshape(rows, columns)
    step = max(1, MERGE_BLOCK_BYTES // (4 * columns))
    for start in range(0, rows, step):
        block = merged[start : start + step]
        np.matmul(left[start : start + step], right, out=block)
        block += stored[start : start + step]  # float16 bases are widened as they are added
    return merged.reshape(mapped.shape)


def _delta_bound(terms: list[tuple[float, AdapterLayer]]) -> float:
    """An upper bound of max|ΔW| for ``terms``: Σ |λ|·r·max|up|·max|down| (factors are checked finite at load)."""
    return sum(abs(weight) * layer.delta_peak for weight, layer in terms)


def _mapped_location(bundle_dir: Path, manifest: Manifest, where: Any, what: str) -> np.ndarray:
    """The tensor at ``where`` as a read-only memory map of the bundle file (no copy: the page cache holds it)."""
    try:
        file, offset, length = str(where["file"]), int(where["offset"]), int(where["length"])
        dtype, shape = np.dtype(where["dtype"]), tuple(int(dim) for dim in where["shape"])
    except (KeyError, TypeError, ValueError):
        return _read_location(bundle_dir, manifest, where, what)  # its own one-line error
    if file not in {entry.path for entry in manifest.files} or math.prod(shape) * dtype.itemsize != length:
        return _read_location(bundle_dir, manifest, where, what)
    path = bundle_dir / file
    if offset < 0 or offset + length > path.stat().st_size:
        raise AdapterError(f"{what}: '{file}' is shorter than its weight map says: re-export the bundle")
    return np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=shape)


def _delta(mapped: MappedWeight, terms: list[tuple[float, AdapterLayer]]) -> np.ndarray:
    """Σ λ·up·down in the ONNX layout of ``mapped``, float32."""
    total = np.zeros((mapped.torch_shape[0], math.prod(mapped.torch_shape[1:])), dtype=np.float32)
    for weight, layer in terms:
        total += np.float32(weight) * (layer.up @ layer.down)
    total = total.reshape(mapped.torch_shape)
    return np.ascontiguousarray(total.T) if mapped.layout == "transposed" else total


def int8_weight_levels(produced_by: Mapping[str, Any]) -> float:
    """L of an INT8 variant's symmetric weights ([-L, L], scale max|W|/L), from the recipe its ``produced_by``
    records: 64 with ``reduce_range`` (7-bit weights), else 127 (also for variants made before the recipe said)."""
    recipe = produced_by.get("recipe")
    reduced = isinstance(recipe, Mapping) and recipe.get("reduce_range") is True
    return INT8_REDUCED_LEVELS if reduced else INT8_LEVELS


def requantized(
    merged: np.ndarray, old_scale: np.ndarray, axis: int, levels: float = INT8_LEVELS
) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric per-channel int8 of ``merged`` along ``axis`` in [-levels, levels] (see
    :func:`int8_weight_levels`): (int8 values, float32 scales); a channel that is all zero keeps its old scale."""
    reduce = tuple(index for index in range(merged.ndim) if index != axis)
    scale = (np.abs(merged).max(axis=reduce) / np.float32(levels)).astype(np.float32)
    scale = np.where(scale > 0, scale, old_scale.reshape(scale.shape)).astype(np.float32)
    shape = [1] * merged.ndim
    shape[axis] = -1
    quantized = np.clip(np.rint(merged / scale.reshape(shape)), -levels, levels).astype(np.int8)
    return quantized, scale.reshape(old_scale.shape)


def merged_weights(
    bundle_dir: Path,
    manifest: Manifest,
    weight_map: WeightMap,
    variant: str,
    active: list[tuple[Adapter, float]],
    int8_levels: float = INT8_LEVELS,
) -> WeightOverrides:
    """The initializers of ``variant`` of the component to replace for the ``active`` adapters (with their weights):
    initializer name -> new value. Float variants: W + ΔW in the stored dtype; INT8 variants: the int8 weight
    requantised in [-int8_levels, int8_levels] (the variant's recipe: :func:`int8_weight_levels`), its scales and
    its requantised int32 bias."""
    stored = weight_map.variants.get(variant)
    if stored is None:
        raise AdapterError(
            f"the {weight_map.component} variant '{variant}' is not in its weight map: load another variant "
            "(variant='fp32') or re-export the bundle"
        )
    terms = _terms_by_weight(weight_map.component, active)
    overrides: dict[str, np.ndarray] = {}
    inline: dict[str, int] = {}
    finite: set[str] = set()  # merged weights known finite without looking
    tensors = stored.get("tensors", {})

    def replace(where: Any, value: np.ndarray) -> None:
        overrides[str(where["name"])] = value
        if where["file"] == stored.get("path"):
            inline[str(where["name"])] = int(where["offset"])

    for name, layer_terms in terms.items():
        mapped = weight_map.weights[name]
        where = tensors.get(name)
        what = f"{weight_map.component} weight '{name}' ({mapped.module}) of variant '{variant}'"
        if where is None:
            raise AdapterError(f"{what} is not adaptable (its weight map has no location): load variant='fp32'")
        if where["dtype"] in ("float32", "float16"):
            base = _mapped_location(bundle_dir, manifest, where, what)
            merged = _merged_float(mapped, layer_terms, base)
            replace(where, merged if base.dtype == np.float32 else merged.astype(base.dtype))
            if base.dtype == np.float32 and _delta_bound(layer_terms) < FINITE_DELTA_BOUND:
                finite.add(str(where["name"]))  # a finite stored weight plus a bounded ΔW: no pass over it
            continue
        delta = _delta(mapped, layer_terms)
        # INT8: dequantise, merge in float, requantise per channel; the bias follows the new scales.
        quantized = _read_location(bundle_dir, manifest, where, what)
        old_scale = _read_location(bundle_dir, manifest, where["scale"], what).astype(np.float32)
        axis = int(where["axis"]) % quantized.ndim
        shape = [1] * quantized.ndim
        shape[axis] = -1
        merged = quantized.astype(np.float32) * old_scale.reshape(shape) + delta
        new_quantized, new_scale = requantized(merged, old_scale, axis, int8_levels)
        replace(where, new_quantized)
        replace(where["scale"], new_scale)
        bias = where.get("bias")
        if bias is not None:
            bias_values = _read_location(bundle_dir, manifest, bias, what)
            bias_scale = _read_location(bundle_dir, manifest, bias["scale"], what).astype(np.float32)
            new_bias_scale = (bias_scale * (new_scale / old_scale)).astype(np.float32)
            real = bias_values.astype(np.float64) * bias_scale
            replace(bias, np.rint(real / new_bias_scale).astype(np.int32))
            replace(bias["scale"], new_bias_scale)
    for name, value in overrides.items():
        if name not in finite and not np.isfinite(value).all():
            raise AdapterError(f"the merged {weight_map.component} weight '{name}' is not finite: lower the weights")
    return WeightOverrides(overrides, inline)


def weight_inputs(
    bundle_dir: Path,
    manifest: Manifest,
    weight_map: WeightMap,
    variant: str,
    active: list[tuple[Adapter, float]],
) -> dict[str, np.ndarray]:
    """Every graph input of ``variant``'s weight-inputs graph: the merged weight for each layer the ``active``
    adapters touch, the stored one (memory-mapped) for the others."""
    merged = merged_weights(bundle_dir, manifest, weight_map, variant, active).values
    values: dict[str, np.ndarray] = {}
    for name, where in weight_map.variants[variant].get("tensors", {}).items():
        key = str(where["name"])
        what = f"{weight_map.component} weight '{name}' of variant '{variant}'"
        values[key] = merged[key] if key in merged else _mapped_location(bundle_dir, manifest, where, what)
    return values


def factor_shares(weight_map: WeightMap, active: list[tuple[Adapter, float]]) -> float:
    """The ``active`` adapters' factors for ``weight_map``'s component, as a share of its adaptable weights
    (elements): what a call on the factor-inputs graph adds, roughly."""
    factors = sum(
        layer.up.size + layer.down.size
        for adapter, weight in active
        if weight != 0
        for layer in adapter.layers
        if layer.component == weight_map.component
    )
    weights = sum(math.prod(mapped.shape) for mapped in weight_map.weights.values())
    return factors / max(weights, 1)


def factor_inputs(weight_map: WeightMap, variant: str, active: list[tuple[Adapter, float]]) -> dict[str, np.ndarray]:
    """Every factor input of ``variant``'s factor-inputs graph for the ``active`` adapters: per branched weight W
    (by its initializer name), ``W.down`` and ``W.up`` holding the stacked factors [down₁; down₂ ...] and
    [λ₁·up₁ | λ₂·up₂ ...] in the graph's layouts (linear: (in, r) and (r, out); conv: (r, in, kh, kw) and
    (out, r, 1, 1)), in the variant's dtype; rank 0 for a weight no adapter touches (whose branch the backends cut
    out of the graph before they open it). Raises :class:`AdapterError` when an adapter touches a weight the graph
    has no branch for."""
    stored = weight_map.variants.get(variant, {})
    branched = set(stored.get("factor_inputs") or ())
    terms = _terms_by_weight(weight_map.component, active)
    missing = sorted(set(terms) - branched)
    if missing:
        raise AdapterError(
            f"the {weight_map.component} weight '{missing[0]}' ({weight_map.weights[missing[0]].module}) has no "
            "factor branch in this bundle: pass adapter_mode='auto' (or 'inputs' / 'rebuild')"
        )
    values: dict[str, np.ndarray] = {}
    for name in sorted(branched):
        mapped = weight_map.weights[name]
        where = stored["tensors"][name]
        dtype = np.dtype(where["dtype"])
        out_features, inner = mapped.torch_shape[0], math.prod(mapped.torch_shape[1:])
        layer_terms = terms.get(name, [])
        if layer_terms:
            ups, downs = _stacked(layer_terms)
        else:
            ups, downs = np.zeros((out_features, 0), np.float32), np.zeros((0, inner), np.float32)
        rank = downs.shape[0]
        if mapped.kind == "linear":
            down, up = downs.T, ups.T
        else:
            down, up = downs.reshape(rank, *mapped.torch_shape[1:]), ups.reshape(out_features, rank, 1, 1)
        key = str(where["name"])
        values[f"{key}.down"] = np.ascontiguousarray(down, dtype=dtype)
        values[f"{key}.up"] = np.ascontiguousarray(up, dtype=dtype)
    return values


def zero_factors(layouts: Mapping[str, tuple[tuple[int, ...], np.dtype]]) -> dict[str, np.ndarray]:
    """Factor inputs of these shapes and dtypes, all zero: a factor-inputs session on the base weights. Both
    factors are zero (not only ``up``), so a branch is 0 even where x·down would overflow a half-precision type."""
    return {name: np.zeros(shape, dtype) for name, (shape, dtype) in layouts.items()}


class WeightInputsSession:
    """A session on a weight-inputs or factor-inputs graph and the values it runs with: each call feeds them with
    its inputs. Several share one backend session (an adapter switch makes a new one on the same session).

    Where the backend session can hold inputs bound across calls (``bind_inputs``: onnxruntime's I/O binding),
    the values are bound once here and a call binds only its own inputs: fed as arrays at every call, the 570
    factors of an SD1.5 U-Net cost 4-6% of its call at 256 px on onnxruntime, bound 0.6%
    (docs/design-notes.md#adapters)."""

    def __init__(self, inner: Any, weights: dict[str, np.ndarray]) -> None:
        self.inner = inner
        self.weights = weights
        bind = getattr(inner, "bind_inputs", None)
        self._bound = bind(weights) if bind is not None else None

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self._bound is not None:
            return self._bound.run(feeds)
        return self.inner.run({**feeds, **self.weights})

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def check_adapter_mode(mode: object) -> str:
    if not isinstance(mode, str) or mode not in ADAPTER_MODES:
        raise UserError(f"adapter_mode={mode!r}: pick one of {', '.join(ADAPTER_MODES)}")
    return mode


# -- switching between calls -------------------------------------------------------------------------------------


class CallGuard:
    """Calls run concurrently with each other; a swap of sessions waits for the running calls to end and holds new
    ones until it is done, so no call runs partly on the old weights and partly on the new."""

    def __init__(self) -> None:
        self._condition = threading.Condition()
        self._calls = 0
        self._swapping = False

    @contextmanager
    def call(self) -> Iterator[None]:
        with self._condition:
            while self._swapping:
                self._condition.wait()
            self._calls += 1
        try:
            yield
        finally:
            with self._condition:
                self._calls -= 1
                self._condition.notify_all()

    @contextmanager
    def swap(self) -> Iterator[None]:
        with self._condition:
            while self._swapping:
                self._condition.wait()
            self._swapping = True
            while self._calls:
                self._condition.wait()
        try:
            yield
        finally:
            with self._condition:
                self._swapping = False
                self._condition.notify_all()


def one_weight_set(method: Callable[..., Any]) -> Callable[..., Any]:
    """A :class:`Pipeline` method that runs on one set of weights from start to end (its ``call_guard``)."""

    @functools.wraps(method)
    def guarded(self: Any, *args: Any, **kwargs: Any) -> Any:
        with self.call_guard.call():
            return method(self, *args, **kwargs)

    return guarded


class AdapterState:
    """The adapters a pipeline runs with, and the bundle facts applying them needs (weight maps, read once)."""

    def __init__(self, bundle_dir: Path, manifest: Manifest, mode: str = "auto") -> None:
        self.bundle_dir = bundle_dir
        self.manifest = manifest
        self.mode = check_adapter_mode(mode)
        self._weight_maps: dict[str, WeightMap] | None = None
        self._graphs: dict[tuple[str, str], Any] = {}  # (component, variant) -> its weight-inputs session
        # component -> ((variant, ranks), factor session, its factors' (shape, dtype) by input)
        self._factor_graphs: dict[str, tuple[Any, Any, dict]] = {}
        # path -> (file status, adapter): the last LOADED_ADAPTERS_KEPT read, checked once
        self._loaded: OrderedDict[str, tuple[tuple, Adapter]] = OrderedDict()
        self.active: tuple[tuple[Adapter, float], ...] = ()
        self.modes: dict[str, str] = {}  # adapted component -> how its adapters run now (factors/inputs/rebuild)

    @property
    def weight_maps(self) -> dict[str, WeightMap]:
        if self._weight_maps is None:
            maps = {name: read_weight_map(self.bundle_dir, self.manifest, name) for name in self.manifest.components}
            self._weight_maps = {name: found for name, found in maps.items() if found is not None}
        return self._weight_maps

    @property
    def weights(self) -> dict[str, float]:
        """The active adapters as {file: weight} (empty: the base weights)."""
        return {str(adapter.path): weight for adapter, weight in self.active}

    def prepare(self, denoiser: Any, adapters: Any) -> tuple[dict[str, Any], tuple[tuple[Adapter, float], ...]]:
        """New sessions for every component whose weights change from the active set to ``adapters`` (each merged
        from the base weights), not yet in use; and the new set. Raises :class:`AdapterError` before any session
        opens when a file or weight is bad."""
        checked = check_adapter_weights(adapters)
        if checked and not self.weight_maps:
            raise AdapterError(
                f"BUNDLE '{self.bundle_dir}' has no weight maps (exported before run-time adapters): re-export it"
            )
        wanted = tuple((self._load(path), weight) for path, weight in checked.items())
        touched = {component for adapter, _ in (*self.active, *wanted) for component in adapter.components}
        sessions: dict[str, Any] = {}
        for component in sorted(touched):
            terms = [(adapter, weight) for adapter, weight in wanted if component in adapter.components]
            if not terms:  # back to the base weights
                self.modes.pop(component, None)
                kept = self._factor_graphs.get(component)
                if kept is not None:
                    # The factor session stays, its factors zero: each branch adds (x·0)·0 = 0 to the layer's own
                    # output, so the image is the base session's bit for bit (tested), and no session opens.
                    sessions[component] = denoiser.wrap_session(WeightInputsSession(kept[1], zero_factors(kept[2])))
                else:
                    sessions[component] = denoiser.new_session(component)
                continue
            variant = denoiser.variants[component]
            weight_map = self.weight_maps[component]
            mode = self.mode_for(denoiser, component, weight_map, terms)
            self.modes[component] = mode
            if mode != "factors":
                self._factor_graphs.pop(component, None)  # it holds the weights: not kept beside another session
            if mode == "factors":
                values = factor_inputs(weight_map, variant.name, terms)
                graph = self._factor_inputs_graph(denoiser, component, weight_map, values)
                sessions[component] = denoiser.wrap_session(WeightInputsSession(graph, values))
                continue
            if mode == "inputs":
                graph = self._weight_inputs_graph(denoiser, component, weight_map)
                values = weight_inputs(self.bundle_dir, self.manifest, weight_map, variant.name, terms)
                sessions[component] = denoiser.wrap_session(WeightInputsSession(graph, values))
                continue
            levels = int8_weight_levels(variant.artifact.produced_by)
            weights = merged_weights(self.bundle_dir, self.manifest, weight_map, variant.name, terms, levels)
            sessions[component] = denoiser.new_session(component, weights)
        return sessions, wanted

    def _load(self, path: str) -> Adapter:
        """``path`` read and checked, or as read before while the file is unchanged (size, time, inode): switching
        back to one of the last few adapters does not read and check it again."""
        try:
            status = Path(path).stat()
            key: tuple | None = (status.st_size, status.st_mtime_ns, status.st_ino)
        except OSError:
            key = None  # load_adapter says why in one line
        cached = self._loaded.get(path)
        if key is not None and cached is not None and cached[0] == key:
            self._loaded.move_to_end(path)
            return cached[1]
        adapter = load_adapter(path, self.bundle_dir, self.weight_maps)
        if key is not None:
            self._loaded[path] = (key, adapter)
            while len(self._loaded) > LOADED_ADAPTERS_KEPT:
                self._loaded.popitem(last=False)
        return adapter

    def mode_for(
        self, denoiser: Any, component: str, weight_map: WeightMap, terms: list[tuple[Adapter, float]] = ()
    ) -> str:
        """How ``component``'s adapters (``terms``) run: "factors", "inputs" or "rebuild". "factors" where the
        backend, the variant (float) and the bundle (a factor-inputs graph with a branch for every weight the
        adapters touch) allow it and, for "auto", the factors are at most :data:`FACTOR_SHARE_AUTO` of the weights;
        else "inputs" where the backend and the bundle (a weight-inputs graph) allow it; else "rebuild". A mode
        asked for where one of them does not is an error saying which."""
        variant = denoiser.variants[component]
        stored = weight_map.variants.get(variant.name, {})
        backend = denoiser.backend_module
        floating = variant.precision in ("fp32", "fp16")
        touched = {layer.weight for adapter, _ in terms for layer in adapter.layers if layer.component == component}

        def refusal(flag: str, backend_line: str, graph: str, kind: str) -> str | None:
            """Why this component cannot run its adapters on a ``kind`` graph, or None."""
            if not getattr(backend, flag, False):
                return backend_line
            if not floating:
                return f"the {component} runs an {variant.precision} variant: load with variant='fp32'"
            if not isinstance(stored.get(graph), str):
                return f"the bundle has no {kind} graph for its {component}: re-export it"
            return None

        no_factors = refusal(
            "FACTOR_INPUTS",
            "this backend does not run adapters as factor inputs: load with backend='onnxruntime'",
            "factor_inputs_graph",
            "factor-inputs",
        )
        if no_factors is None and touched - set(stored.get("factor_inputs") or ()):
            no_factors = f"the bundle's {component} factor-inputs graph has no branch for some weights they adapt"
        no_inputs = refusal(
            "WEIGHT_INPUTS",
            "this backend does not take merged weights as inputs (it runs adapters as factors or rebuilt): "
            "load with backend='onnxruntime'",
            "weight_inputs_graph",
            "weight-inputs",
        )
        if self.mode in ("factors", "inputs"):
            missing = no_factors if self.mode == "factors" else no_inputs
            if missing is not None:
                raise AdapterError(f"adapter_mode='{self.mode}': {missing}, or pass adapter_mode='auto'")
            return self.mode
        if self.mode == "auto":
            if no_factors is None and factor_shares(weight_map, list(terms)) <= FACTOR_SHARE_AUTO:
                return "factors"
            if no_inputs is None:
                return "inputs"
        return "rebuild"

    def _factor_inputs_graph(
        self, denoiser: Any, component: str, weight_map: WeightMap, values: dict[str, np.ndarray]
    ) -> Any:
        """The open factor-inputs session of ``component``'s variant for factors shaped as ``values``, the branches
        of rank-0 factors cut out (onnxruntime: one per set of touched weights; OpenVINO: one per set of ranks,
        compiled with them). One is kept per component: it holds the component's weights."""
        variant = denoiser.variants[component].name
        shapes = {name: value.shape for name, value in values.items()}
        key = (variant, denoiser.factor_signature(shapes))
        kept = self._factor_graphs.get(component)
        if kept is not None and kept[0] == key:
            return kept[1]
        self._factor_graphs.pop(component, None)
        graph = self._listed_graph(weight_map, variant, "factor_inputs_graph")
        try:
            session = denoiser.open_factor_inputs(component, graph, shapes)
        except FactorGraphError as error:  # a listed file, its sha256 checked at load, but not the graph expected
            raise _map_error(weight_map.path, f"names '{graph.relative_to(self.bundle_dir)}', where {error}") from None
        layouts = {name: (value.shape, value.dtype) for name, value in values.items()}
        self._factor_graphs[component] = (key, session, layouts)
        return session

    def _weight_inputs_graph(self, denoiser: Any, component: str, weight_map: WeightMap) -> Any:
        """The open weight-inputs session of ``component``'s variant (opened once)."""
        variant = denoiser.variants[component].name
        key = (component, variant)
        if key not in self._graphs:
            graph = self._listed_graph(weight_map, variant, "weight_inputs_graph")
            self._graphs[key] = denoiser.open_weight_inputs(component, graph)
        return self._graphs[key]

    def _listed_graph(self, weight_map: WeightMap, variant: str, kind: str) -> Path:
        """Where the weight map's ``kind`` graph of ``variant`` is, once checked to be a file the manifest lists."""
        graph = str(weight_map.variants[variant][kind])
        if graph not in {entry.path for entry in self.manifest.files}:
            raise _map_error(weight_map.path, f"names '{graph}', which the manifest does not list")
        return self.bundle_dir / graph
