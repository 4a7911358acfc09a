/**
 * cutFactorBranches on a factor-inputs graph written here field by field (ONNX's wire format): the cut weights'
 * `W.factor_add` an Identity of its first input (name kept), their branch nodes and `W.down` / `W.up` inputs gone,
 * every other byte as it was; a weight without a branch and bytes that are no model: one FactorGraphError each.
 * Against the Python runtime's cut of the exported bundles' graphs (bit for bit): test/adapters.test.js.
 */
import assert from "node:assert/strict";
import { describe, test } from "node:test";
import { BundleError } from "../src/errors.js";
import { cutFactorBranches, FactorGraphError } from "../src/factorgraph.js";

const encoder = new TextEncoder();
const decoder = new TextDecoder();

/** A varint's bytes. */
function varint(value) {
  const out = [];
  do {
    out.push((value & 0x7f) | (value > 0x7f ? 0x80 : 0));
    value >>>= 7;
  } while (value);
  return out;
}

/** Field `number` holding `payload` (bytes or a string), length-delimited. */
const field = (number, payload) => {
  const bytes = typeof payload === "string" ? encoder.encode(payload) : payload;
  return Uint8Array.from([...varint((number << 3) | 2), ...varint(bytes.length), ...bytes]);
};
const cat = (...parts) => Uint8Array.from(parts.flatMap((part) => [...part]));

/** A NodeProto: inputs, outputs, name, op_type; an attribute (field 5) a node keeps as it is. */
const node = (inputs, outputs, name, op, attribute = new Uint8Array()) =>
  cat(...inputs.map((i) => field(1, i)), ...outputs.map((o) => field(2, o)), field(3, name), field(4, op), attribute);
/** A ValueInfoProto with a name and a type (field 2) kept as it is. */
const valueInfo = (name) => cat(field(1, name), field(2, Uint8Array.of(0x0a, 0x02, 0x08, 0x01)));

/** Two branched weights (a MatMul's W, a Conv's K) and the fields around them a cut leaves alone. */
function model() {
  const nodes = [
    node(["x", "W"], ["h.base"], "matmul", "MatMul"),
    node(["x", "W.down"], ["W.mid"], "W.factor_down", "MatMul"),
    node(["W.mid", "W.up"], ["W.delta"], "W.factor_up", "MatMul"),
    node(["h.base", "W.delta"], ["h"], "W.factor_add", "Add"),
    node(["h", "K"], ["y.base"], "conv", "Conv", field(5, cat(field(1, "pads")))),
    node(["h", "K.down"], ["K.mid"], "K.factor_down", "Conv"),
    node(["K.mid", "K.up"], ["K.delta"], "K.factor_up", "Conv"),
    node(["y.base", "K.delta"], ["y"], "K.factor_add", "Add"),
  ];
  const graph = cat(
    ...nodes.map((n) => field(1, n)),
    field(2, "factor-inputs"),
    field(5, cat(field(8, "W"), field(9, Uint8Array.of(1, 2, 3, 4)))), // an initializer
    ...["x", "W.down", "W.up", "K.down", "K.up"].map((name) => field(11, valueInfo(name))),
    field(12, valueInfo("y")),
  );
  // ir_version = 8 (a varint field), the graph, an opset_import after it
  return cat(Uint8Array.of(0x08, 0x08), field(7, graph), field(8, cat(Uint8Array.of(0x10, 0x11))));
}

/** The fields of a message: [number, wire, payload bytes or value]. */
function read(data) {
  const found = [];
  let at = 0;
  const next = () => {
    let value = 0;
    let scale = 1;
    for (;;) {
      const byte = data[at++];
      value += (byte & 0x7f) * scale;
      if (!(byte & 0x80)) return value;
      scale *= 128;
    }
  };
  while (at < data.length) {
    const key = next();
    const wire = key & 7;
    if (wire === 0) found.push([key >> 3, wire, next()]);
    else {
      const length = next();
      found.push([key >> 3, wire, data.subarray(at, at + length)]);
      at += length;
    }
  }
  return found;
}
const strings = (message, number) => read(message).filter(([n]) => n === number).map(([, , bytes]) => decoder.decode(bytes));
const graphOf = (bytes) => read(bytes).find(([n]) => n === 7)[2];
const nodesOf = (bytes) =>
  read(graphOf(bytes)).filter(([n]) => n === 1).map(([, , n]) => ({ name: strings(n, 3)[0], op: strings(n, 4)[0], inputs: strings(n, 1), outputs: strings(n, 2), bytes: n }));
const inputsOf = (bytes) => read(graphOf(bytes)).filter(([n]) => n === 11).map(([, , v]) => strings(v, 1)[0]);

describe("cutFactorBranches", () => {
  test("a cut weight's branch: its Add an Identity of the layer's output, its branch nodes and inputs gone", () => {
    const original = model();
    const cut = cutFactorBranches(original, ["K"]);
    assert.deepEqual(
      nodesOf(cut).map(({ name, op }) => `${name}:${op}`),
      ["matmul:MatMul", "W.factor_down:MatMul", "W.factor_up:MatMul", "W.factor_add:Add", "conv:Conv", "K.factor_add:Identity"],
    );
    const identity = nodesOf(cut).at(-1);
    assert.deepEqual([identity.inputs, identity.outputs], [["y.base"], ["y"]]);
    assert.deepEqual(inputsOf(cut), ["x", "W.down", "W.up"]);
    // every field the cut does not edit, byte for byte: the kept nodes, the name, the initializer, the output
    const kept = (bytes) => read(graphOf(bytes)).filter(([n, , v]) => n !== 1 || !/^K\./.test(strings(v, 3)[0]));
    assert.deepEqual(kept(cut).filter(([n]) => n !== 11), kept(original).filter(([n, , v]) => n !== 11));
    assert.deepEqual(read(cut).filter(([n]) => n !== 7), read(original).filter(([n]) => n !== 7));
  });

  test("every branch cut: the graph of the plain layers, named as before; no cut: the same bytes", () => {
    const original = model();
    const cut = cutFactorBranches(original, new Set(["W", "K"]));
    assert.deepEqual(nodesOf(cut).map(({ name, op }) => `${name}:${op}`), ["matmul:MatMul", "W.factor_add:Identity", "conv:Conv", "K.factor_add:Identity"]);
    assert.deepEqual(inputsOf(cut), ["x"]);
    assert.equal(cutFactorBranches(original, []), original);
    assert.deepEqual(cutFactorBranches(cutFactorBranches(original, ["W"]), ["K"]), cut, "one weight at a time gives the same bytes");
  });

  test("a weight without a branch, bytes that are no model: one FactorGraphError each (a BundleError)", () => {
    const original = model();
    assert.throws(
      () => cutFactorBranches(original, ["K", "Q", "P"]),
      (error) => error instanceof FactorGraphError && error instanceof BundleError && error.message === "the factor-inputs graph has no branch for P, Q",
    );
    assert.throws(() => cutFactorBranches(encoder.encode("not an onnx file"), ["K"]), FactorGraphError);
    assert.throws(() => cutFactorBranches(Uint8Array.of(0x08, 0x08), ["K"]), (error) => error.message === "no graph in the model");
    assert.throws(() => cutFactorBranches(original.subarray(0, original.length - 2), ["K"]), (error) => error.message === "truncated field");
    const noAdd = cat(Uint8Array.of(0x08, 0x08), field(7, cat(field(1, node(["a", "b", "c"], ["y"], "K.factor_add", "Sum")), field(11, valueInfo("K.down")), field(11, valueInfo("K.up")))));
    assert.throws(() => cutFactorBranches(noAdd, ["K"]), (error) => error.message === 'node ["K.factor_add"] is not a factor branch\'s Add');
  });
});
