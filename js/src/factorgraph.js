/**
 * A factor-inputs graph with the branches of untouched weights cut out, edited in ONNX's protobuf wire format (the
 * Python runtime's lcm_export/runtime/factor_graph.py, byte for byte the same output).
 *
 * The export writes one factor-inputs graph per float variant: beside every mapped weight W, nodes `W.factor_down`
 * and `W.factor_up` compute `W.delta` from the graph inputs `W.down` and `W.up`, and `W.factor_add` adds it to the
 * layer's own output. Fed rank 0, a branch adds nothing but still runs (onnxruntime, an SD1.5 U-Net at 256 px, a
 * style adapter touching 128 of its 283 weights: every branch +7.9% per call, only those 128 +1.0%;
 * docs/design-notes.md#adapters), and onnxruntime's Conv leaves its output unwritten for 0 input channels. So the
 * runtime cuts the untouched ones out before a session opens the graph: each `W.factor_add` becomes an Identity of
 * the layer's output (its name kept), its two branch nodes and two inputs are dropped.
 *
 * No protobuf library: the graph is ours and the edit touches three kinds of fields (ModelProto.graph = 7;
 * GraphProto.node = 1, GraphProto.input = 11; NodeProto input = 1, output = 2, name = 3, op_type = 4;
 * ValueInfoProto.name = 1). Every field not edited is copied byte for byte.
 * @module
 */

import { BundleError } from "./errors.js";

const MODEL_GRAPH = 7;
const GRAPH_NODE = 1;
const GRAPH_INPUT = 11;
const NODE_INPUT = 1;
const NODE_OUTPUT = 2;
const NODE_NAME = 3;
const NODE_OP_TYPE = 4;
const VALUE_INFO_NAME = 1;
const BRANCH_NODES = ["factor_down", "factor_up"];

/** The bytes are not a factor-inputs graph this module can edit (the Python runtime's FactorGraphError). */
export class FactorGraphError extends BundleError {
  /** @param {string} message */
  constructor(message) {
    super(message);
    this.name = "FactorGraphError";
  }
}

/** [value, position after it] of the varint at `position` (numbers: a length or a key fits 2^53). */
function varint(data, position) {
  let value = 0;
  let scale = 1;
  for (;;) {
    if (position >= data.length) throw new FactorGraphError("truncated varint");
    const byte = data[position++];
    value += (byte & 0x7f) * scale;
    if (!(byte & 0x80)) return [value, position];
    scale *= 128;
  }
}

/** @param {number} value @returns {number[]} */
function encodeVarint(value) {
  const out = [];
  for (;;) {
    const byte = value % 128;
    value = Math.floor(value / 128);
    if (!value) {
      out.push(byte);
      return out;
    }
    out.push(byte | 0x80);
  }
}

/**
 * {number, wire, start, payload, end} for each field of a message: its number, wire type, the start of the whole
 * field, of its payload, and its end.
 * @param {Uint8Array} data
 */
function* fields(data) {
  let position = 0;
  while (position < data.length) {
    const start = position;
    let key;
    [key, position] = varint(data, position);
    const number = Math.floor(key / 8);
    const wire = key % 8;
    let payload;
    if (wire === 0) {
      [, position] = varint(data, position);
      payload = start;
    } else if (wire === 1) {
      payload = position;
      position += 8;
    } else if (wire === 2) {
      let length;
      [length, payload] = varint(data, position);
      position = payload + length;
    } else if (wire === 5) {
      payload = position;
      position += 4;
    } else {
      throw new FactorGraphError(`unsupported wire type ${wire}`);
    }
    if (position > data.length) throw new FactorGraphError("truncated field");
    yield { number, wire, start, payload, end: position };
  }
}

/** A length-delimited field `number` holding `payload`. @param {number} number @param {Uint8Array} payload */
function lengthDelimited(number, payload) {
  const head = [...encodeVarint(number * 8 + 2), ...encodeVarint(payload.length)];
  const out = new Uint8Array(head.length + payload.length);
  out.set(head);
  out.set(payload, head.length);
  return out;
}

/** The strings of field `number` of a message. @param {Uint8Array} data @param {number} number */
function strings(data, number) {
  const decoder = new TextDecoder();
  const found = [];
  for (const field of fields(data)) {
    if (field.number === number && field.wire === 2) found.push(decoder.decode(data.subarray(field.payload, field.end)));
  }
  return found;
}

/** Parts joined into one array. @param {Uint8Array[]} parts */
function joined(parts) {
  const out = new Uint8Array(parts.reduce((sum, part) => sum + part.length, 0));
  let at = 0;
  for (const part of parts) {
    out.set(part, at);
    at += part.length;
  }
  return out;
}

/** `W.factor_add` (Add(layer output, W.delta) -> y) as Identity(layer output) -> y, its name kept. @param {Uint8Array} node */
function identityNode(node) {
  const [inputs, outputs, names] = [strings(node, NODE_INPUT), strings(node, NODE_OUTPUT), strings(node, NODE_NAME)];
  if (inputs.length !== 2 || outputs.length !== 1 || names.length !== 1) {
    throw new FactorGraphError(`node ${JSON.stringify(names.slice(0, 1))} is not a factor branch's Add`);
  }
  const encoder = new TextEncoder();
  return joined([
    lengthDelimited(NODE_INPUT, encoder.encode(inputs[0])),
    lengthDelimited(NODE_OUTPUT, encoder.encode(outputs[0])),
    lengthDelimited(NODE_NAME, encoder.encode(names[0])),
    lengthDelimited(NODE_OP_TYPE, encoder.encode("Identity")),
  ]);
}

/**
 * `model` (a serialized factor-inputs graph) without the branches of the weights in `cut` (their initializer
 * names): the graph a session needs for adapters that touch only the others (`model` itself when `cut` is empty).
 * A FactorGraphError when a weight in `cut` has no branch there, or the bytes are not a model.
 * @param {Uint8Array} model @param {Iterable<string>} cut @returns {Uint8Array}
 */
export function cutFactorBranches(model, cut) {
  const weights = [...new Set(cut)];
  if (!weights.length) return model;
  const graphFields = [...fields(model)].filter((field) => field.number === MODEL_GRAPH);
  if (graphFields.length !== 1 || graphFields[0].wire !== 2) throw new FactorGraphError("no graph in the model");
  const [{ start: graphStart, payload: graphPayload, end: graphEnd }] = graphFields;
  const graph = model.subarray(graphPayload, graphEnd);
  const droppedNodes = new Set(weights.flatMap((weight) => BRANCH_NODES.map((role) => `${weight}.${role}`)));
  const adds = new Set(weights.map((weight) => `${weight}.factor_add`));
  const droppedInputs = new Set(weights.flatMap((weight) => [`${weight}.down`, `${weight}.up`]));
  const foundAdds = new Set();
  const foundInputs = new Set();
  /** @type {Uint8Array[]} */
  const parts = [];
  for (const { number, wire, start, payload, end } of fields(graph)) {
    if (wire === 2 && number === GRAPH_NODE) {
      const node = graph.subarray(payload, end);
      const name = strings(node, NODE_NAME)[0] ?? "";
      if (droppedNodes.has(name)) continue;
      if (adds.has(name)) {
        foundAdds.add(name);
        parts.push(lengthDelimited(GRAPH_NODE, identityNode(node)));
        continue;
      }
    } else if (wire === 2 && number === GRAPH_INPUT) {
      const name = strings(graph.subarray(payload, end), VALUE_INFO_NAME)[0];
      if (name !== undefined && droppedInputs.has(name)) {
        foundInputs.add(name);
        continue;
      }
    }
    parts.push(graph.subarray(start, end));
  }
  const unfound = [...[...adds].filter((name) => !foundAdds.has(name)), ...[...droppedInputs].filter((name) => !foundInputs.has(name))];
  const missing = [...new Set(unfound.map((name) => name.slice(0, name.lastIndexOf("."))))].sort();
  if (missing.length) throw new FactorGraphError(`the factor-inputs graph has no branch for ${missing.slice(0, 3).join(", ")}`);
  return joined([model.subarray(0, graphStart), lengthDelimited(MODEL_GRAPH, joined(parts)), model.subarray(graphEnd)]);
}
