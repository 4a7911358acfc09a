"""Which ONNX initializer holds which torch weight: the map run-time adapters (``lcm-export adapter``) need.

A LoRA names torch modules (``down_blocks.0.attentions.0.proj_in``); an ONNX file names initializers, and not
always after the parameter: the TorchScript exporter writes a Linear without bias as a MatMul on a transposed,
renamed initializer (``onnx::MatMul_1234``). The map is found by value at export, while the module is loaded:
:func:`weight_fingerprints` digests every Linear and Conv2d weight (a Linear's also transposed), and
:func:`float_weight_names` finds the initializers of the exported float ONNX with those bytes.

At the end of the export :func:`write_weight_map` writes ``<component>/weights.json``: for every mapped weight its
module, kind and layout, and per ONNX variant of the component where its bytes are (file, offset, length) so that
a runtime reads a base weight without an ONNX parser; for an INT8 (QDQ) variant the int8 weight, its per-channel
scales and the int32 bias quantised with them. The file is listed in the manifest's ``files`` (its sha256 is what
an adapter file is tied to) and named by the component's ``weight_map``; the format is in docs/bundle-format.md
("Weight maps").
"""

from __future__ import annotations

import hashlib
import json
import mmap
from pathlib import Path
from typing import Any

import numpy as np

from lcm_export.runtime.adapters import WEIGHT_MAP_FORMAT, WEIGHT_MAP_NAME, WEIGHT_MAP_VERSION
from lcm_export.runtime.manifest import Component, sha256_file

WEIGHT_INPUTS_SUFFIX = ".weight-inputs.onnx"  # a float variant's graph with its mapped weights as inputs
FACTOR_INPUTS_SUFFIX = ".factor-inputs.onnx"  # the same graph with a LoRA branch (factors as inputs) per weight
QUANTIZED_SUFFIX = "_quantized"  # onnxruntime's quantizer: initializer X becomes X_quantized (+ X_scale, ...)
_ONNX_DTYPES = {1: "float32", 10: "float16", 3: "int8", 6: "int32"}  # TensorProto data types read here


def _digest(values: np.ndarray) -> str:
    return hashlib.blake2b(np.ascontiguousarray(values).tobytes(), digest_size=20).hexdigest()


def weight_fingerprints(module: Any, fp16: bool = False) -> dict[str, tuple[str, str, str]]:
    """digest of the float32 bytes -> (module path, kind "linear"/"conv", layout "same"/"transposed") for every
    Linear and Conv2d weight of ``module`` (a loaded torch module: the U-Net or a text encoder, LoRAs fused);
    ``fp16``: also the digest of each weight as the fp16 conversion writes it (keys ``<shape>:f16:<digest>``), for
    a component exported in fp16.

    Two modules with identical weights (rare: zero-initialised layers) share a digest; neither is mapped, since
    the initializer found could be either's.
    """
    import torch

    found: dict[str, tuple[str, str, str] | None] = {}
    for name, layer in module.named_modules():
        if isinstance(layer, torch.nn.Linear):
            kind, layouts = "linear", ("same", "transposed")  # (out, in), or as the ONNX may hold it, (in, out)
        elif isinstance(layer, torch.nn.Conv2d) and layer.groups == 1:
            kind, layouts = "conv", ("same",)  # (out, in, kh, kw)
        else:
            continue
        weight = layer.weight.detach().float().numpy()
        half = _as_float16(weight) if fp16 else None  # elementwise: converted once, transposed as a view
        for layout in layouts:
            values = weight.T if layout == "transposed" else weight
            keys = [f"{values.shape}:{_digest(values)}"]
            if half is not None:
                halves = half.T if layout == "transposed" else half
                keys.append(f"{halves.shape}:f16:{_digest(halves)}")
            for key in keys:
                found[key] = None if key in found else (name, kind, layout)
    return {key: value for key, value in found.items() if value is not None}


def _as_float16(values: np.ndarray) -> np.ndarray:
    """``values`` as the exporter's fp16 conversion stores them (onnxruntime's float16 converter: magnitudes
    clamped into fp16's finite range and above its smallest subnormal, then rounded)."""
    from onnxruntime.transformers.float16 import convert_np_to_float16

    return convert_np_to_float16(np.ascontiguousarray(values))


def _tensor_bytes(tensor: Any, model_dir: Path) -> bytes | None:
    """An initializer's raw bytes (inline raw_data or its external data); None for other encodings."""
    from onnx.external_data_helper import ExternalDataInfo, uses_external_data

    if uses_external_data(tensor):
        info = ExternalDataInfo(tensor)
        with open(model_dir / info.location, "rb") as handle:
            handle.seek(info.offset or 0)
            return handle.read(info.length) if info.length else handle.read()
    return tensor.raw_data or None


def float_weight_names(onnx_path: Path, fingerprints: dict[str, tuple[str, str, str]]) -> dict[str, dict[str, Any]]:
    """float ONNX initializer name -> {module, kind, layout, shape} for the initializers of the float model at
    ``onnx_path`` (fp32, or fp16 with fingerprints made with ``fp16=True``) whose bytes are a fingerprinted torch
    weight (as it is, or transposed)."""
    import onnx

    model = onnx.load(str(onnx_path), load_external_data=False)
    shapes = {key.split(":", 1)[0] for key in fingerprints}
    names: dict[str, dict[str, Any]] = {}
    seen_modules: set[str] = set()
    dtypes = {onnx.TensorProto.FLOAT: (np.float32, ""), onnx.TensorProto.FLOAT16: (np.float16, "f16:")}
    for tensor in model.graph.initializer:
        if tensor.data_type not in dtypes or str(tuple(tensor.dims)) not in shapes:
            continue
        payload = _tensor_bytes(tensor, onnx_path.parent)
        if payload is None:
            continue
        dtype, tag = dtypes[tensor.data_type]
        values = np.frombuffer(payload, dtype=dtype).reshape(tuple(tensor.dims))
        match = fingerprints.get(f"{values.shape}:{tag}{_digest(values)}")
        if match is None or match[0] in seen_modules:
            continue
        module, kind, layout = match
        seen_modules.add(module)
        names[tensor.name] = {"module": module, "kind": kind, "layout": layout, "shape": list(tensor.dims)}
    return names


class _Locator:
    """Where an initializer's bytes are in the bundle: its external data entry, or (inline) the place of its raw
    bytes inside the .onnx file, found by search (equal bytes anywhere are equal values)."""

    def __init__(self, staging: Path, onnx_path: Path) -> None:
        self.staging = staging
        self.onnx_path = onnx_path
        self._handle = open(onnx_path, "rb")
        self._map = mmap.mmap(self._handle.fileno(), 0, access=mmap.ACCESS_READ)

    def close(self) -> None:
        self._map.close()
        self._handle.close()

    def locate(self, tensor: Any) -> dict[str, Any] | None:
        from onnx.external_data_helper import ExternalDataInfo, uses_external_data

        dtype = _ONNX_DTYPES.get(tensor.data_type)
        if dtype is None:
            return None
        count = int(np.prod(tensor.dims)) if len(tensor.dims) else 1
        length = count * np.dtype(dtype).itemsize
        if uses_external_data(tensor):
            info = ExternalDataInfo(tensor)
            file = (self.onnx_path.parent / info.location).relative_to(self.staging).as_posix()
            offset = int(info.offset or 0)
        else:
            # raw_data as it is; float_data is a packed repeated fixed32 field, whose bytes are the float32 array's
            if tensor.raw_data:
                payload = tensor.raw_data
            elif dtype == "float32" and len(tensor.float_data) == count:
                payload = np.asarray(tensor.float_data, dtype="<f4").tobytes()
            else:
                return None  # varint-encoded data (int32_data) cannot be found or patched in place
            offset = self._map.find(payload) if len(payload) == length else -1
            if offset < 0:
                return None
            file = self.onnx_path.relative_to(self.staging).as_posix()
        return {
            "name": tensor.name,
            "file": file,
            "offset": offset,
            "length": length,
            "dtype": dtype,
            "shape": list(tensor.dims),
        }


def _variant_tensors(staging: Path, onnx_path: Path, names: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """float initializer name -> where its weight is in the variant at ``onnx_path``: the same name (a float
    variant, or a layer an INT8 variant kept float), or ``<name>_quantized`` with its scales (and its layer's
    quantised bias) in a QDQ variant."""
    import onnx
    from onnx import helper

    model = onnx.load(str(onnx_path), load_external_data=False)
    initializers = {tensor.name: tensor for tensor in model.graph.initializer}
    dequantizers = {node.input[0]: node for node in model.graph.node if node.op_type == "DequantizeLinear"}
    consumers: dict[str, list[Any]] = {}
    for node in model.graph.node:
        for value in node.input:
            consumers.setdefault(value, []).append(node)
    locator = _Locator(staging, onnx_path)
    tensors: dict[str, Any] = {}
    try:
        for name in names:
            if name in initializers:
                where = locator.locate(initializers[name])
                if where is not None and where["dtype"] in ("float32", "float16"):
                    tensors[name] = where
                continue
            quantized = initializers.get(name + QUANTIZED_SUFFIX)
            node = dequantizers.get(name + QUANTIZED_SUFFIX)
            if quantized is None or node is None or len(node.input) < 3:
                continue
            scale, zero_point = initializers.get(node.input[1]), initializers.get(node.input[2])
            if scale is None or zero_point is None or np.any(onnx.numpy_helper.to_array(zero_point)):
                continue  # only symmetric (zero point 0) int8 weights are requantised
            axis = next((helper.get_attribute_value(a) for a in node.attribute if a.name == "axis"), 1)
            entry = {**(locator.locate(quantized) or {}), "axis": int(axis), "scale": locator.locate(scale)}
            if "file" not in entry or entry["scale"] is None or entry["dtype"] != "int8":
                continue
            bias = _quantized_bias(node, consumers, dequantizers, initializers, locator)
            if bias is not None:
                entry["bias"] = bias
            tensors[name] = entry
    finally:
        locator.close()
    return tensors


def _quantized_bias(
    weight_node: Any, consumers: dict[str, list[Any]], dequantizers: dict[str, Any], initializers: dict, locator: Any
) -> dict[str, Any] | None:
    """The int32 bias of the Conv/Gemm reading the dequantised weight, with its scale (input scale x weight
    scale, per channel): requantising the weight changes that scale, so the bias is requantised too."""
    for layer in consumers.get(weight_node.output[0], []):
        if layer.op_type not in ("Conv", "Gemm") or len(layer.input) < 3:
            continue
        producer = next((node for node in dequantizers.values() if node.output[0] == layer.input[2]), None)
        if producer is None or producer.input[0] not in initializers:
            return None
        data, scale = locator.locate(initializers[producer.input[0]]), locator.locate(initializers[producer.input[1]])
        if data is None or scale is None or data["dtype"] != "int32":
            return None
        return {**data, "scale": scale}
    return None


def _graph_beside(variant_path: str, suffix: str) -> str:
    """``unet/model.onnx`` -> ``unet/model<suffix>``: a graph written beside a variant."""
    stem = variant_path[: -len(".onnx")] if variant_path.endswith(".onnx") else variant_path
    return stem + suffix


def weight_inputs_graph_path(variant_path: str) -> str:
    """``unet/model.onnx`` -> ``unet/model.weight-inputs.onnx``."""
    return _graph_beside(variant_path, WEIGHT_INPUTS_SUFFIX)


def write_weight_inputs_graph(staging: Path, variant_path: str, tensors: dict[str, Any]) -> str | None:
    """Write the graph of the float variant at ``variant_path`` with every mapped weight of ``tensors`` turned from
    an initializer into a graph input of the same name, dtype and shape, and return its bundle path; None when a
    mapped weight is not an initializer of the graph.

    The other initializers stay as they are, inline or in the variant's external data (the same files, read by
    reference), so the file is the graph alone at full size. A runtime feeds the weights with every call (the
    base ones as stored, or an adapter's merges): switching adapters is then a merge, with no new session
    (docs/design-notes.md#adapters)."""
    import onnx
    from onnx import helper

    source = staging / variant_path
    model = onnx.load(str(source), load_external_data=False)
    graph = model.graph
    wanted = {str(where["name"]) for where in tensors.values()}
    if not wanted:
        return None
    moved = [tensor for tensor in graph.initializer if tensor.name in wanted]
    if len(moved) != len(wanted):
        return None
    kept = [tensor for tensor in graph.initializer if tensor.name not in wanted]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    declared = {value.name for value in graph.input}
    graph.input.extend(
        helper.make_tensor_value_info(tensor.name, tensor.data_type, list(tensor.dims))
        for tensor in moved
        if tensor.name not in declared
    )
    relative = weight_inputs_graph_path(variant_path)
    onnx.save(model, str(staging / relative))
    return relative


def factor_inputs_graph_path(variant_path: str) -> str:
    """``unet/model.onnx`` -> ``unet/model.factor-inputs.onnx``."""
    return _graph_beside(variant_path, FACTOR_INPUTS_SUFFIX)


def _attribute(node: Any, name: str, default: Any) -> Any:
    from onnx import helper

    for attribute in node.attribute:
        if attribute.name == name:
            return helper.get_attribute_value(attribute)
    return default


def write_factor_inputs_graph(
    staging: Path, variant_path: str, tensors: dict[str, Any]
) -> tuple[str, list[str]] | None:
    """Write the graph of the float variant at ``variant_path`` with, beside each mapped weight W of ``tensors``
    that one MatMul, Gemm or ungrouped Conv reads, a low-rank branch whose factors are graph inputs, and return its
    bundle path and the mapped weights that got one (None when none did). The weights stay initializers of the variant's
    own files (read by reference: the file is the graph alone).

    - MatMul / Gemm (``y = x·W``, or ``x·Wᵀ`` with ``transB``): ``y + (x·<W>.down)·<W>.up``, ``down`` (in, r),
      ``up`` (r, out);
    - Conv: ``y + Conv1x1(Conv(x, <W>.down), <W>.up)``, ``down`` (r, in, kh, kw) with the node's strides, pads and
      dilations, ``up`` (out, r, 1, 1).

    Every rank is its own symbolic dimension: the runtime feeds Σ λᵢ·upᵢ·downᵢ as the stacked factors of the active
    adapters, and cuts the branches of weights none of them touches out of the graph before it opens it (by the
    node names: ``W.factor_down``, ``W.factor_up``, ``W.factor_add``; lcm_export.runtime.factor_graph on
    onnxruntime, OpenVINO's own graph API there). A switch between adapters on the same weights binds new factors and
    opens nothing; the cost per call grows with the adapters' factors and not with the model's weights
    (docs/design-notes.md#adapters).
    """
    import onnx
    from onnx import helper

    source = staging / variant_path
    model = onnx.load(str(source), load_external_data=False)
    graph = model.graph
    initializers = {tensor.name: tensor for tensor in graph.initializer}
    mapped_names = {str(where["name"]): key for key, where in tensors.items()}  # initializer -> mapped weight
    wanted = set(mapped_names) & set(initializers)
    readers: dict[str, int] = {}
    for node in graph.node:
        for name in node.input:
            readers[name] = readers.get(name, 0) + 1
    nodes: list[Any] = []
    branched: list[str] = []
    for node in graph.node:
        weight = node.input[1] if len(node.input) > 1 else ""
        if weight not in wanted or readers.get(weight) != 1 or node.input[0] == weight:
            nodes.append(node)
            continue
        tensor = initializers[weight]
        dims = list(tensor.dims)
        rank = f"rank_{len(branched)}"
        down, up, base, low = f"{weight}.down", f"{weight}.up", f"{node.output[0]}.base", f"{weight}.low"
        x, output = node.input[0], node.output[0]
        if node.op_type in ("MatMul", "Gemm") and len(dims) == 2:
            if node.op_type == "Gemm" and (_attribute(node, "transA", 0) or _attribute(node, "alpha", 1.0) != 1.0):
                nodes.append(node)
                continue
            transposed = node.op_type == "Gemm" and _attribute(node, "transB", 0)
            features_in, features_out = (dims[1], dims[0]) if transposed else (dims[0], dims[1])
            shapes = {down: [features_in, rank], up: [rank, features_out]}
            branch = [
                helper.make_node("MatMul", [x, down], [low], name=f"{weight}.factor_down"),
                helper.make_node("MatMul", [low, up], [f"{weight}.delta"], name=f"{weight}.factor_up"),
            ]
        elif node.op_type == "Conv" and len(dims) == 4 and _attribute(node, "group", 1) == 1:
            shapes = {down: [rank, *dims[1:]], up: [dims[0], rank, 1, 1]}
            kept = {
                attribute.name: helper.get_attribute_value(attribute)
                for attribute in node.attribute
                if attribute.name in ("strides", "pads", "dilations", "auto_pad")
            }
            branch = [
                helper.make_node("Conv", [x, down], [low], name=f"{weight}.factor_down", **kept),
                helper.make_node("Conv", [low, up], [f"{weight}.delta"], name=f"{weight}.factor_up"),
            ]
        else:
            nodes.append(node)
            continue
        node.output[0] = base
        nodes.extend([node, *branch])
        nodes.append(helper.make_node("Add", [base, f"{weight}.delta"], [output], name=f"{weight}.factor_add"))
        graph.input.extend(
            helper.make_tensor_value_info(name, tensor.data_type, shape) for name, shape in shapes.items()
        )
        branched.append(mapped_names[weight])
    if not branched:
        return None
    del graph.node[:]
    graph.node.extend(nodes)
    relative = factor_inputs_graph_path(variant_path)
    onnx.save(model, str(staging / relative))
    return relative, sorted(branched)


def write_weight_map(
    staging: Path, name: str, component: Component, names: dict[str, dict[str, Any]]
) -> Component | None:
    """Write ``<name>/weights.json`` for ``component`` (its ONNX variants as they are now) and return the component
    naming it; None (nothing written) when no weight was mapped or no ONNX variant is left."""
    import dataclasses

    if not names:
        return None
    variants: dict[str, Any] = {}
    for variant in component.variants:
        if variant.format != "onnx":
            continue
        tensors = _variant_tensors(staging, staging / variant.path, names)
        variants[variant.name] = {
            "path": variant.path,
            "precision": variant.precision,
            "sha256": [sha256_file(staging / file) for file in variant.files],
            "tensors": tensors,
        }
        if variant.precision in ("fp32", "fp16"):
            graph = write_weight_inputs_graph(staging, variant.path, tensors)
            if graph is not None:
                variants[variant.name]["weight_inputs_graph"] = graph
            factors = write_factor_inputs_graph(staging, variant.path, tensors)
            if factors is not None:
                variants[variant.name]["factor_inputs_graph"] = factors[0]
                variants[variant.name]["factor_inputs"] = factors[1]
    document = {
        "format": WEIGHT_MAP_FORMAT,
        "version": WEIGHT_MAP_VERSION,
        "component": name,
        "weights": names,
        "variants": variants,
    }
    path = staging / name / WEIGHT_MAP_NAME
    path.write_text(json.dumps(document, indent=1, sort_keys=True) + "\n")
    return dataclasses.replace(component, weight_map=f"{name}/{WEIGHT_MAP_NAME}")
