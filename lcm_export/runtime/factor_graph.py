"""A factor-inputs graph with the branches of untouched weights cut out, edited in ONNX's protobuf wire format.

The export writes one factor-inputs graph per float variant (lcm_export.exporter.weight_map.write_factor_inputs_graph):
beside every mapped weight W, nodes ``W.factor_down`` and ``W.factor_up`` compute ``W.delta`` from the graph inputs
``W.down`` and ``W.up``, and ``W.factor_add`` adds it to the layer's own output. Fed rank 0, a branch adds nothing
but still runs: on onnxruntime the 283 branches of an SD1.5 U-Net cost 7.9% of its call at 256 px when a style
adapter touches 128 of them, against 1.0% with only those 128 in the graph (docs/design-notes.md#adapters). So the
runtime cuts the untouched ones out before onnxruntime opens the graph: each ``W.factor_add`` becomes an Identity
of the layer's output (which onnxruntime's optimiser removes), its two branch nodes and two inputs are dropped.

The runtime has no ``onnx`` package (not a dependency), and needs none: the graph is ours and the edit touches
three kinds of fields, so it is done on the serialized message (ModelProto.graph = 7; GraphProto.node = 1,
GraphProto.input = 11; NodeProto input = 1, output = 2, name = 3, op_type = 4; ValueInfoProto.name = 1). Every field
not edited is copied byte for byte.
"""

from __future__ import annotations

from collections.abc import Iterator

MODEL_GRAPH, GRAPH_NODE, GRAPH_INPUT = 7, 1, 11
NODE_INPUT, NODE_OUTPUT, NODE_NAME, NODE_OP_TYPE = 1, 2, 3, 4
VALUE_INFO_NAME = 1
BRANCH_NODES = ("factor_down", "factor_up")


class FactorGraphError(ValueError):
    """The bytes are not a factor-inputs graph this module can edit."""


def _varint(data: bytes | memoryview, position: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if position >= len(data):
            raise FactorGraphError("truncated varint")
        byte = data[position]
        position += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, position
        shift += 7


def _encode_varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _fields(data: bytes | memoryview) -> Iterator[tuple[int, int, int, int, int]]:
    """(field number, wire type, start of the whole field, start of its payload, end) for each field of a message."""
    position = 0
    while position < len(data):
        start = position
        key, position = _varint(data, position)
        number, wire = key >> 3, key & 7
        if wire == 0:
            _, position = _varint(data, position)
            payload = start
        elif wire == 1:
            payload, position = position, position + 8
        elif wire == 2:
            length, payload = _varint(data, position)
            position = payload + length
        elif wire == 5:
            payload, position = position, position + 4
        else:
            raise FactorGraphError(f"unsupported wire type {wire}")
        if position > len(data):
            raise FactorGraphError("truncated field")
        yield number, wire, start, payload, position


def _length_delimited(number: int, payload: bytes) -> bytes:
    return _encode_varint(number << 3 | 2) + _encode_varint(len(payload)) + payload


def _strings(data: memoryview, number: int) -> list[str]:
    return [bytes(data[start:end]).decode() for n, wire, _, start, end in _fields(data) if n == number and wire == 2]


def _identity_node(node: memoryview) -> bytes:
    """``W.factor_add`` (Add(layer output, W.delta) -> y) as Identity(layer output) -> y, its name kept."""
    inputs, outputs, names = _strings(node, NODE_INPUT), _strings(node, NODE_OUTPUT), _strings(node, NODE_NAME)
    if len(inputs) != 2 or len(outputs) != 1 or len(names) != 1:
        raise FactorGraphError(f"node {names[:1]} is not a factor branch's Add")
    return (
        _length_delimited(NODE_INPUT, inputs[0].encode())
        + _length_delimited(NODE_OUTPUT, outputs[0].encode())
        + _length_delimited(NODE_NAME, names[0].encode())
        + _length_delimited(NODE_OP_TYPE, b"Identity")
    )


def cut_factor_branches(model: bytes, cut: set[str]) -> bytes:
    """``model`` (a serialized factor-inputs graph) without the branches of the weights in ``cut`` (their
    initializer names): the graph a session needs for adapters that touch only the others. Raises
    :class:`FactorGraphError` when a weight in ``cut`` has no branch there."""
    if not cut:
        return model
    data = memoryview(model)
    graph_fields = [(start, payload, end) for n, _, start, payload, end in _fields(data) if n == MODEL_GRAPH]
    if len(graph_fields) != 1 or data[graph_fields[0][0]] & 7 != 2:
        raise FactorGraphError("no graph in the model")
    graph_start, graph_payload, graph_end = graph_fields[0]
    graph = data[graph_payload:graph_end]
    dropped_nodes = {f"{weight}.{role}" for weight in cut for role in BRANCH_NODES}
    adds = {f"{weight}.factor_add" for weight in cut}
    dropped_inputs = {f"{weight}.{role}" for weight in cut for role in ("down", "up")}
    found_adds: set[str] = set()
    found_inputs: set[str] = set()
    parts: list[bytes | memoryview] = []
    for number, wire, start, payload, end in _fields(graph):
        if wire == 2 and number == GRAPH_NODE:
            node = graph[payload:end]
            names = _strings(node, NODE_NAME)
            name = names[0] if names else ""
            if name in dropped_nodes:
                continue
            if name in adds:
                found_adds.add(name)
                parts.append(_length_delimited(GRAPH_NODE, _identity_node(node)))
                continue
        elif wire == 2 and number == GRAPH_INPUT:
            names = _strings(graph[payload:end], VALUE_INFO_NAME)
            if names and names[0] in dropped_inputs:
                found_inputs.add(names[0])
                continue
        parts.append(graph[start:end])
    missing = sorted({name.rsplit(".", 1)[0] for name in (adds - found_adds) | (dropped_inputs - found_inputs)})
    if missing:
        raise FactorGraphError(f"the factor-inputs graph has no branch for {', '.join(missing[:3])}")
    new_graph = b"".join(bytes(part) for part in parts)
    return b"".join([bytes(data[:graph_start]), _length_delimited(MODEL_GRAPH, new_graph), bytes(data[graph_end:])])
