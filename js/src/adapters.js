/**
 * Run-time adapters (docs/bundle-format.md, "Weight maps and adapter files"): LoRA styles made by `lcm-export
 * adapter` applied to the bundle's weights, W' = W + Σ λᵢ·upᵢ·downᵢ, always from the base weights (so A -> base -> A
 * gives A's image exactly): merged from the base bytes (on an INT8 variant dequantised, merged and requantised per
 * output channel in the range its recipe used), or run beside them as factors. Three ways to run them
 * (`adapterMode`, as the Python runtime's `adapter_mode`):
 *
 * - "rebuild": the merged values are written into copies of the files that hold them (the weight map says where:
 *   file, offset, length) and the pipeline opens new sessions on those bytes (patchedFiles).
 * - "inputs": a float variant's weight-inputs graph (its mapped weights are graph inputs; the weight map's
 *   `weight_inputs_graph`) is opened once and fed every mapped weight with every call: the merged ones for the layers
 *   the adapters change, the stored ones for the rest (baseWeightInputs, weightInputs). A switch is the merge alone.
 * - "factors": a float variant's factor-inputs graph (a LoRA branch beside each mapped MatMul/Gemm/Conv weight, its
 *   two factors graph inputs of any rank; the weight map's `factor_inputs_graph` and `factor_inputs`), the branches
 *   of the weights no active adapter touches cut out (factorgraph.js), is opened once per set of touched weights
 *   (factorSignature) and fed the active adapters' stacked factors for the kept branches with every call
 *   (factorInputs): nothing is merged, a switch between adapters touching the same weights feeds new factors, each
 *   call costs about the factors' share of the weights (factorShares).
 * - "auto" (the default): "factors" where the backend, the variant and the bundle allow it and the factors are at
 *   most FACTOR_SHARE_AUTO of the component's adaptable weights, else "inputs" where they allow it, else "rebuild".
 *
 * "inputs" and "rebuild" merge with the same arithmetic (mergeFloat), so they give the same float32 values;
 * "factors" computes W·x + up·(down·x) in the graph, which differs from them by float rounding only. The same checks
 * as the Python runtime's (lcm_export/runtime/adapters.py), with the same messages.
 * @module
 */

import { AdapterError, UserError } from "./errors.js";
import { fromFloat16, toFloat16 } from "./backends.js";
import { isNode } from "./source.js";

export const WEIGHT_MAP_FORMAT = "lcm-export-weight-map";
export const ADAPTER_FORMAT = "lcm-export-adapter";
export const ADAPTER_VERSION = "1";
export const ADAPTER_MODES = ["auto", "factors", "inputs", "rebuild"];
/**
 * "auto" runs a component's adapters as factor inputs while their factors are at most this share of its adaptable
 * weights (the Python runtime's FACTOR_SHARE_AUTO, measured there: docs/design-notes.md#adapters); above it, merged.
 */
export const FACTOR_SHARE_AUTO = 0.01;
const MAX_HEADER_BYTES = 100_000_000;
const INT8_LEVELS = 127; // symmetric int8 weights in [-127, 127]; [-64, 64] with the recipe's reduce_range
const INT8_REDUCED_LEVELS = 64;
const ELEMENT = { float32: 4, float16: 2, int8: 1, int32: 4, float64: 8 };

/**
 * @typedef {object} WeightMap
 * @property {string} component
 * @property {string} path     inside the bundle
 * @property {string} sha256   as the manifest lists it: what an adapter file is tied to
 * @property {Record<string, {module: string, kind: string, layout: string, shape: number[]}>} weights
 * @property {Record<string, {path: string, tensors: Record<string, any>}>} variants
 */

/**
 * @typedef {object} Adapter
 * @property {string} file
 * @property {Array<{component: string, weight: string, down: Float32Array, up: Float32Array, rank: number}>} layers
 * @property {string[]} components
 */

/**
 * @typedef {object} WeightInput   one graph input of a weight-inputs graph: a mapped weight in its stored dtype
 * @property {"float32" | "float16"} dtype
 * @property {Float32Array | Uint16Array} data   float16: the IEEE half bits
 * @property {number[]} dims                     the ONNX shape (the initializer's)
 */

/** The torch shape of a mapped weight: (out, in) or (out, in, kh, kw). */
const torchShape = (mapped) => (mapped.layout === "transposed" ? [...mapped.shape].reverse() : mapped.shape);
const product = (shape) => shape.reduce((a, b) => a * b, 1);

/**
 * The weight map of every component that has one (bundle-format.md), read from the bundle (its hash was verified
 * with the other files).
 * @param {any} source @param {any} manifest
 * @returns {Promise<Record<string, WeightMap>>}
 */
export async function readWeightMaps(source, manifest) {
  const hashes = Object.fromEntries(manifest.files.map((entry) => [entry.path, entry.sha256]));
  /** @type {Record<string, WeightMap>} */
  const maps = {};
  for (const [component, entry] of Object.entries(manifest.components)) {
    const relative = /** @type {any} */ (entry).weight_map;
    if (!relative) continue;
    const refuse = (problem) => new AdapterError(`weight map '${relative}' ${problem}: re-export the bundle`);
    if (!(relative in hashes)) throw refuse("is not listed in the manifest's files");
    let data;
    try {
      data = JSON.parse(new TextDecoder().decode(await source.read(relative)));
    } catch (error) {
      throw refuse(`cannot be read (${error.name})`);
    }
    if (!data || data.format !== WEIGHT_MAP_FORMAT || data.version !== 1) throw refuse(`is not a version-1 ${WEIGHT_MAP_FORMAT}`);
    if (!data.weights || typeof data.weights !== "object" || !data.variants || typeof data.variants !== "object") {
      throw refuse("has a malformed entry");
    }
    for (const [name, weight] of Object.entries(data.weights)) {
      const ok = weight && ["linear", "conv"].includes(weight.kind) && ["same", "transposed"].includes(weight.layout) &&
        Array.isArray(weight.shape) && weight.shape.every(Number.isInteger);
      if (!ok) throw refuse(`has a malformed entry (${name})`);
    }
    maps[component] = { component, path: relative, sha256: hashes[relative], weights: data.weights, variants: data.variants };
  }
  return maps;
}

/**
 * Tensors (as Float32Array) and metadata of a safetensors file: 8-byte little-endian header length, JSON header,
 * little-endian data.
 * @param {Uint8Array} bytes @param {string} label
 */
export function readSafetensors(bytes, label) {
  const refuse = (problem) => new AdapterError(`${label} is not a safetensors file (${problem}): pass an adapter file made by lcm-export adapter`);
  if (bytes.length < 8) throw refuse("header size");
  const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  const headerSize = Number(view.getBigUint64(0, true));
  if (!(headerSize > 0 && headerSize <= Math.min(MAX_HEADER_BYTES, bytes.length - 8))) throw refuse("header size");
  let header;
  try {
    header = JSON.parse(new TextDecoder().decode(bytes.subarray(8, 8 + headerSize)));
  } catch {
    throw refuse("header");
  }
  if (!header || typeof header !== "object" || Array.isArray(header)) throw refuse("header");
  const metadata = header.__metadata__ || {};
  delete header.__metadata__;
  const data = bytes.subarray(8 + headerSize);
  /** @type {Record<string, {shape: number[], values: Float32Array}>} */
  const tensors = {};
  for (const [name, entry] of Object.entries(header)) {
    const size = { F32: 4, F16: 2, F64: 8 }[entry?.dtype];
    if (!size) throw refuse(`dtype ${entry?.dtype}`);
    const [start, end] = (entry.data_offsets || []).map(Number);
    const shape = (entry.shape || []).map(Number);
    const count = product(shape);
    if (!(start >= 0 && start <= end && end <= data.length && end - start === count * size)) throw refuse(`offsets of ${name}`);
    const raw = data.slice(start, end); // aligned copy
    const values =
      entry.dtype === "F32" ? new Float32Array(raw.buffer) :
      entry.dtype === "F16" ? fromFloat16(new Uint16Array(raw.buffer)) : Float32Array.from(new Float64Array(raw.buffer));
    tensors[name] = { shape, values };
  }
  return { tensors, metadata };
}

/**
 * An adapter file checked against this bundle's weight maps: the bundle it was made for, every key, every shape and
 * rank, finite values.
 * @param {Uint8Array} bytes @param {string} file @param {Record<string, WeightMap>} maps @param {string} bundle
 * @returns {Adapter}
 */
export function checkAdapter(bytes, file, maps, bundle) {
  const label = `adapter '${file}'`;
  const { tensors, metadata } = readSafetensors(bytes, label);
  if (metadata.format !== ADAPTER_FORMAT) {
    throw new AdapterError(`${label} is not an lcm-export adapter file (no '${ADAPTER_FORMAT}' metadata): make one with lcm-export adapter LORA --bundle BUNDLE --output FILE`);
  }
  if (metadata.version !== ADAPTER_VERSION) {
    throw new AdapterError(`${label} is adapter format version ${JSON.stringify(metadata.version)}; this runtime reads ${ADAPTER_VERSION}: make it again with this lcm-export`);
  }
  let madeFor;
  try {
    madeFor = JSON.parse(metadata.bundle);
  } catch {
    madeFor = null;
  }
  if (!madeFor || typeof madeFor !== "object" || Array.isArray(madeFor)) {
    throw new AdapterError(`${label} has no valid 'bundle' metadata: make it again with lcm-export adapter`);
  }
  for (const component of Object.keys(madeFor).sort()) {
    const map = maps[component];
    if (!map || map.sha256 !== madeFor[component]) {
      const what = map ? "has other weights" : "has no weight map for it";
      throw new AdapterError(`${label} was made for another bundle (its ${component} ${what} here): make it for this one with lcm-export adapter LORA --bundle '${bundle}' --output FILE`);
    }
  }
  /** @type {Map<string, Record<string, {shape: number[], values: Float32Array}>>} */
  const groups = new Map();
  for (const [key, tensor] of Object.entries(tensors)) {
    const slash = key.indexOf("/");
    const component = key.slice(0, slash);
    const dot = key.lastIndexOf(".");
    const weight = key.slice(slash + 1, dot);
    const role = key.slice(dot + 1);
    if (slash < 0 || !(component in madeFor) || !["down", "up"].includes(role) || !weight || dot < slash) {
      throw new AdapterError(`${label} holds a tensor '${key}' that is not <component>/<weight>.down|.up of a component it was made for: make it again with lcm-export adapter`);
    }
    const id = `${component}/${weight}`;
    if (!groups.has(id)) groups.set(id, {});
    /** @type {any} */ (groups.get(id))[role] = tensor;
  }
  const layers = [];
  for (const id of [...groups.keys()].sort()) {
    const factors = /** @type {any} */ (groups.get(id));
    const component = id.slice(0, id.indexOf("/"));
    const weight = id.slice(id.indexOf("/") + 1);
    const mapped = maps[component].weights[weight];
    const where = `${label}: ${component} weight '${weight}'`;
    if (!mapped) throw new AdapterError(`${where} is not an adaptable weight of this bundle: make the adapter for this bundle`);
    if (!factors.down || !factors.up) throw new AdapterError(`${where} has only its ${factors.down ? "down" : "up"} factor: make the adapter again`);
    const { down, up } = factors;
    const shape = torchShape(mapped);
    const fits = down.shape.length === 2 && up.shape.length === 2 && up.shape[1] === down.shape[0];
    if (!fits || up.shape[0] !== shape[0] || down.shape[1] !== product(shape.slice(1))) {
      throw new AdapterError(`${where}: factors [${up.shape.join(", ")}] x [${down.shape.join(", ")}] do not fit the weight [${shape.join(", ")}] (up (out, r), down (r, in*kh*kw)): make the adapter for this bundle`);
    }
    if (!down.values.every(Number.isFinite) || !up.values.every(Number.isFinite)) {
      throw new AdapterError(`${where} holds NaN or inf: the LoRA it was made from is broken`);
    }
    layers.push({ component, weight, down: down.values, up: up.values, rank: down.shape[0] });
  }
  if (!layers.length) throw new AdapterError(`${label} adapts no weight: make it again with lcm-export adapter`);
  return { file, layers, components: [...new Set(layers.map((l) => l.component))].sort() };
}

/**
 * `{file: weight, …}` (an object or a Map; empty: the base weights) with finite numeric weights.
 * @param {unknown} adapters @returns {Array<[string, number]>}
 */
export function checkAdapterWeights(adapters) {
  const entries = adapters instanceof Map ? [...adapters.entries()] :
    adapters && typeof adapters === "object" && !Array.isArray(adapters) ? Object.entries(adapters) : null;
  if (!entries) throw new AdapterError(`adapters=${JSON.stringify(adapters)}: pass an object {"style.safetensors": 0.8, …} ({}: no adapter)`);
  for (const [file, weight] of entries) {
    if (typeof weight !== "number" || !Number.isFinite(weight)) {
      throw new AdapterError(`adapter '${file}': weight ${JSON.stringify(weight) ?? String(weight)} is not a finite number: pass e.g. 0.8`);
    }
  }
  return entries.map(([file, weight]) => [String(file), weight]);
}

/** `adapterMode` checked: one of ADAPTER_MODES. @param {unknown} mode @returns {"auto" | "factors" | "inputs" | "rebuild"} */
export function checkAdapterMode(mode) {
  if (typeof mode !== "string" || !ADAPTER_MODES.includes(mode)) {
    throw new UserError(`adapterMode=${JSON.stringify(mode) ?? String(mode)}: pick one of ${ADAPTER_MODES.join(", ")}`);
  }
  return /** @type {"auto" | "factors" | "inputs" | "rebuild"} */ (mode);
}

/** The bytes of an adapter file: a path (Node) or a URL. @param {string} file */
export async function readAdapterFile(file) {
  try {
    if (isNode && !/^https?:\/\//i.test(file)) {
      const fs = await import("node:fs/promises");
      const path = /^file:/i.test(file) ? (await import("node:url")).fileURLToPath(file) : file;
      return new Uint8Array(await fs.readFile(path));
    }
    const response = await fetch(file);
    if (!response.ok) throw new Error(`HTTP ${response.status}`);
    return new Uint8Array(await response.arrayBuffer());
  } catch (error) {
    throw new AdapterError(`adapter '${file}' cannot be read (${error.code || error.message}): pass an adapter file made by lcm-export adapter`);
  }
}

/** L of an INT8 variant's symmetric weights, from the recipe its produced_by records (Python: int8_weight_levels). */
export function int8WeightLevels(producedBy) {
  return producedBy?.recipe?.reduce_range === true ? INT8_REDUCED_LEVELS : INT8_LEVELS;
}

/** A copy (aligned) of the bytes of the tensor at `where` of `bytes`, its location checked against its shape. */
function locationBytes(bytes, where, what) {
  const count = product(where.shape || []);
  const size = ELEMENT[where.dtype];
  if (!size || count * size !== where.length || where.offset < 0 || where.offset + where.length > bytes.length) {
    throw new AdapterError(`${what}: its weight map's location does not fit its shape: re-export the bundle`);
  }
  return bytes.slice(where.offset, where.offset + where.length).buffer;
}

/** Read/write little-endian values of `dtype` at `offset` of `bytes` as float64 numbers. */
function readValues(bytes, where, what) {
  const raw = locationBytes(bytes, where, what);
  if (where.dtype === "float16") return Float64Array.from(fromFloat16(new Uint16Array(raw)));
  const Typed = { float32: Float32Array, int8: Int8Array, int32: Int32Array, float64: Float64Array }[where.dtype];
  return Float64Array.from(new Typed(raw));
}

/** `values` in the stored encoding of `dtype`: what the patched bytes hold and a weight input is fed. */
function encodeValues(dtype, values) {
  if (dtype === "float16") return toFloat16(Float32Array.from(values));
  return new ({ float32: Float32Array, int8: Int8Array, int32: Int32Array, float64: Float64Array }[dtype])(values);
}

function writeValues(bytes, where, values) {
  bytes.set(new Uint8Array(encodeValues(where.dtype, values).buffer), where.offset);
}

/** Σ λ·up·down in the ONNX layout of `mapped` (float32 values held in a Float64Array). */
function delta(mapped, terms) {
  const shape = torchShape(mapped);
  const out = shape[0];
  const inner = product(shape.slice(1));
  const total = new Float32Array(out * inner);
  for (const [weight, layer] of terms) {
    const { up, down, rank } = layer;
    const lambda = Math.fround(weight);
    for (let o = 0; o < out; o++) {
      for (let i = 0; i < inner; i++) {
        let sum = 0;
        for (let k = 0; k < rank; k++) sum += up[o * rank + k] * down[k * inner + i];
        total[o * inner + i] += Math.fround(lambda * Math.fround(sum));
      }
    }
  }
  if (mapped.layout !== "transposed") return total;
  const transposed = new Float32Array(total.length); // ONNX holds Wᵀ: (inner, out)
  for (let o = 0; o < out; o++) for (let i = 0; i < inner; i++) transposed[i * out + o] = total[o * inner + i];
  return transposed;
}

/** The stored float32/float16 weight of a float variant (else an INT8 weight with its scales). */
const isFloat = (where) => where.dtype === "float32" || where.dtype === "float16";

/** The weight map's entry of `variant` (a choice of the pipeline), or an AdapterError. @param {WeightMap} map */
function storedVariant(map, variant) {
  const stored = map.variants[variant.name];
  if (!stored) {
    throw new AdapterError(`the ${map.component} variant '${variant.name}' is not in its weight map: load another variant (precision "fp32") or re-export the bundle`);
  }
  return stored;
}

/**
 * The layers of `map.component` the `active` adapters change, by weight name: [[λ, layer], …] (λ = 0 left out).
 * @param {WeightMap} map @param {Array<[Adapter, number]>} active @returns {Map<string, Array<[number, any]>>}
 */
function termsByWeight(map, active) {
  /** @type {Map<string, Array<[number, any]>>} */
  const terms = new Map();
  for (const [adapter, weight] of active) {
    for (const layer of adapter.layers) {
      if (layer.component !== map.component || weight === 0) continue;
      if (!terms.has(layer.weight)) terms.set(layer.weight, []);
      /** @type {any} */ (terms.get(layer.weight)).push([weight, layer]);
    }
  }
  return terms;
}

/** Where weight `name` is in the variant, and how messages name it. */
function locate(map, stored, variant, name) {
  const mapped = map.weights[name];
  const where = stored.tensors?.[name];
  const what = `${map.component} weight '${name}' (${mapped?.module}) of variant '${variant.name}'`;
  if (!where) throw new AdapterError(`${what} is not adaptable (its weight map has no location): load precision "fp32"`);
  return { mapped, where, what };
}

/** A reader of the variant's files that checks each is one of them; `copy`: a copy to patch. */
function variantFiles(read, map, variant, copy) {
  /** @type {Map<string, Uint8Array>} */
  const files = new Map();
  const bytesOf = async (file) => {
    if (!variant.files.includes(file)) throw new AdapterError(`${map.component}: its weight map names '${file}', which is not a file of variant '${variant.name}': re-export`);
    if (!files.has(file)) files.set(file, copy ? Uint8Array.from(await read(file)) : await read(file));
    return /** @type {Uint8Array} */ (files.get(file));
  };
  return { files, bytesOf };
}

/**
 * W' = W + Σ λ·up·down of one float weight: `base` its stored values (float64 numbers holding float32 or float16
 * values), each sum rounded to float32 (Math.fround) as the Python runtime's float32 arithmetic does. Both modes
 * use it: "rebuild" writes the result into the file's bytes, "inputs" feeds it.
 * @returns {Float64Array} float32 values
 */
function mergeFloat(base, mapped, terms, component, name) {
  const change = delta(mapped, terms);
  const merged = base.map((value, i) => Math.fround(Math.fround(value) + change[i]));
  checkMerged(merged, component, name);
  return merged;
}

/**
 * The stored value of every mapped weight of float `variant`, as its weight-inputs graph takes them: initializer
 * name -> WeightInput, each file read once (the base weights the untouched layers are fed).
 * @param {(path: string) => Promise<Uint8Array>} read  the base bytes of a bundle file
 * @param {WeightMap} map @param {any} variant
 * @returns {Promise<Record<string, WeightInput>>}
 */
export async function baseWeightInputs(read, map, variant) {
  const stored = storedVariant(map, variant);
  const { bytesOf, files } = variantFiles(read, map, variant, false);
  /** @type {Record<string, WeightInput>} */
  const inputs = {};
  /** @type {Map<string, string[]>} file -> the weights it holds */
  const byFile = new Map();
  for (const [name, where] of Object.entries(stored.tensors || {})) byFile.set(where.file, [...(byFile.get(where.file) || []), name]);
  for (const [file, names] of byFile) {
    for (const name of names) {
      const { where, what } = locate(map, stored, variant, name);
      if (!isFloat(where)) throw new AdapterError(`${what} is not a float weight, so it cannot be fed as a graph input: pass adapterMode "rebuild" or re-export the bundle`);
      const raw = locationBytes(await bytesOf(where.file), where, what);
      inputs[where.name] = { dtype: where.dtype, data: where.dtype === "float16" ? new Uint16Array(raw) : new Float32Array(raw), dims: where.shape.map(Number) };
    }
    files.delete(file); // one file's bytes at a time
  }
  return inputs;
}

/**
 * Every graph input of float `variant`'s weight-inputs graph with the `active` adapters: the merged weight for each
 * layer they change (the same values patchedFiles writes), `base` (from baseWeightInputs) for the others.
 * @param {Record<string, WeightInput>} base
 * @param {WeightMap} map @param {any} variant @param {Array<[Adapter, number]>} active
 * @returns {Record<string, WeightInput>}
 */
export function weightInputs(base, map, variant, active) {
  const stored = storedVariant(map, variant);
  const inputs = { ...base };
  for (const [name, layerTerms] of termsByWeight(map, active)) {
    const { mapped, where, what } = locate(map, stored, variant, name);
    const given = base[where.name];
    if (!given || !isFloat(where)) throw new AdapterError(`${what} is not a weight input of its graph: re-export the bundle`);
    const values = Float64Array.from(given.dtype === "float16" ? fromFloat16(/** @type {Uint16Array} */ (given.data)) : given.data);
    inputs[where.name] = { ...given, data: encodeValues(where.dtype, mergeFloat(values, mapped, layerTerms, map.component, where.name)) };
  }
  return inputs;
}

/**
 * The `active` adapters' factors for `map`'s component as a share of its adaptable weights (elements): roughly what
 * a call on the factor-inputs graph adds (Python: factor_shares). What "auto" compares with FACTOR_SHARE_AUTO.
 * @param {WeightMap} map @param {Array<[Adapter, number]>} active @returns {number}
 */
export function factorShares(map, active) {
  let factors = 0;
  for (const [adapter, weight] of active) {
    if (weight === 0) continue;
    for (const layer of adapter.layers) if (layer.component === map.component) factors += layer.up.length + layer.down.length;
  }
  const weights = Object.values(map.weights).reduce((sum, mapped) => sum + product(mapped.shape), 0);
  return factors / Math.max(weights, 1);
}

/**
 * Every factor input of float `variant`'s factor-inputs graph with the `active` adapters (Python: factor_inputs):
 * per weight W of the map's `factor_inputs` (by its initializer name), `W.down` and `W.up` holding the stacked
 * factors [down₁; down₂ …] and [λ₁·up₁ | λ₂·up₂ …] (each λ·up rounded to float32) in the graph's layouts (linear:
 * (in, r) and (r, out); conv: (r, in, kh, kw) and (out, r, 1, 1)), in the variant's stored dtype (fp16 as half
 * bits); rank 0 (empty tensors) for a weight no adapter touches, whose branch the pipeline cuts out of the graph
 * before it opens it (factorSignature) and does not feed. An AdapterError when an adapter touches a weight the graph
 * has no branch for.
 * @param {WeightMap} map @param {any} variant @param {Array<[Adapter, number]>} active
 * @returns {Record<string, WeightInput>}
 */
export function factorInputs(map, variant, active) {
  const stored = storedVariant(map, variant);
  const branched = new Set(Array.isArray(stored.factor_inputs) ? stored.factor_inputs : []);
  const terms = termsByWeight(map, active);
  const missing = [...terms.keys()].filter((name) => !branched.has(name)).sort();
  if (missing.length) {
    throw new AdapterError(`the ${map.component} weight '${missing[0]}' (${map.weights[missing[0]]?.module}) has no factor branch in this bundle: pass adapterMode "auto" (or "inputs" / "rebuild")`);
  }
  /** @type {Record<string, WeightInput>} */
  const inputs = {};
  for (const name of [...branched].sort()) {
    const mapped = map.weights[name];
    const where = stored.tensors?.[name];
    if (!mapped || !where || !isFloat(where)) {
      throw new AdapterError(`weight map '${map.path}': the factor input '${name}' of variant '${variant.name}' is not a float weight of its map: re-export the bundle`);
    }
    const shape = torchShape(mapped);
    const out = shape[0];
    const inner = product(shape.slice(1));
    const layerTerms = terms.get(name) || [];
    const rank = layerTerms.reduce((sum, [, layer]) => sum + layer.rank, 0);
    // ups (out, rank): [λ₁·up₁ | λ₂·up₂ …]; downs (rank, inner): [down₁; down₂ …]
    const ups = new Float32Array(out * rank);
    const downs = new Float32Array(rank * inner);
    let first = 0;
    for (const [weight, layer] of layerTerms) {
      const lambda = Math.fround(weight);
      for (let o = 0; o < out; o++) {
        for (let k = 0; k < layer.rank; k++) ups[o * rank + first + k] = lambda * layer.up[o * layer.rank + k];
      }
      downs.set(layer.down, first * inner);
      first += layer.rank;
    }
    let down = downs;
    let up = ups;
    let dims;
    if (mapped.kind === "linear") {
      down = new Float32Array(inner * rank); // downsᵀ: (in, rank)
      for (let k = 0; k < rank; k++) for (let i = 0; i < inner; i++) down[i * rank + k] = downs[k * inner + i];
      up = new Float32Array(rank * out); // upsᵀ: (rank, out)
      for (let o = 0; o < out; o++) for (let k = 0; k < rank; k++) up[k * out + o] = ups[o * rank + k];
      dims = { down: [inner, rank], up: [rank, out] };
    } else {
      dims = { down: [rank, ...shape.slice(1)], up: [out, rank, 1, 1] }; // the same memory, reshaped
    }
    const encode = (values) => (where.dtype === "float16" ? toFloat16(values) : values);
    inputs[`${where.name}.down`] = { dtype: where.dtype, data: encode(down), dims: dims.down };
    inputs[`${where.name}.up`] = { dtype: where.dtype, data: encode(up), dims: dims.up };
  }
  return inputs;
}

/**
 * The branches a factor-inputs session keeps for `inputs` (factorInputs' result), by initializer name, sorted: the
 * weights whose factors' rank is not 0; the others' branches are cut out of the graph and their factors not fed
 * (Python: factor_signature). Adapters that touch the same weights share one session, whatever their ranks or
 * weights. onnxruntime's Conv (1.30, node and WASM) leaves its output unwritten when its input has 0 channels (seen
 * as NaN and stray values), so a rank-0 branch could not run there anyway.
 * @param {Record<string, WeightInput>} inputs @returns {{kept: string[], cut: string[]}}
 */
export function factorSignature(inputs) {
  const kept = new Set();
  const cut = new Set();
  for (const [key, input] of Object.entries(inputs)) {
    (input.dims.includes(0) ? cut : kept).add(key.slice(0, key.lastIndexOf(".")));
  }
  return { kept: [...kept].sort(), cut: [...cut].sort() };
}

/**
 * The bytes of the files of `variant` that the `active` adapters change: bundle path -> patched copy.
 * @param {(path: string) => Promise<Uint8Array>} read  the base bytes of a bundle file
 * @param {WeightMap} map @param {any} variant @param {Array<[Adapter, number]>} active
 * @returns {Promise<Map<string, Uint8Array>>}
 */
export async function patchedFiles(read, map, variant, active) {
  const stored = storedVariant(map, variant);
  const { files, bytesOf } = variantFiles(read, map, variant, true);
  const levels = int8WeightLevels(variant.produced_by);
  for (const [name, layerTerms] of termsByWeight(map, active)) {
    const { mapped, where, what } = locate(map, stored, variant, name);
    const bytes = await bytesOf(where.file);
    if (isFloat(where)) {
      writeValues(bytes, where, mergeFloat(readValues(bytes, where, what), mapped, layerTerms, map.component, where.name));
      continue;
    }
    const change = delta(mapped, layerTerms);
    const base = readValues(bytes, where, what);
    // INT8: dequantise, merge in float, requantise per channel in the recipe's range; the bias follows the scales.
    const scaleBytes = await bytesOf(where.scale.file);
    const oldScale = readValues(scaleBytes, where.scale, what).map(Math.fround);
    const shape = where.shape;
    const axis = ((where.axis % shape.length) + shape.length) % shape.length;
    const channels = shape[axis];
    const after = product(shape.slice(axis + 1));
    const channelOf = (i) => Math.floor(i / after) % channels;
    const merged = base.map((q, i) => Math.fround(Math.fround(q * oldScale[channelOf(i)]) + change[i]));
    checkMerged(merged, map.component, where.name);
    const peak = new Float64Array(channels);
    merged.forEach((value, i) => (peak[channelOf(i)] = Math.max(peak[channelOf(i)], Math.abs(value))));
    const newScale = Float64Array.from(peak, (p, c) => (p > 0 ? Math.fround(Math.fround(p) / levels) : oldScale[c]));
    const roundEven = (x) => {
      const r = Math.round(x);
      return Math.abs(x % 1) === 0.5 && r % 2 !== 0 ? r - 1 : r; // numpy's rint
    };
    const quantized = merged.map((value, i) => Math.min(levels, Math.max(-levels, roundEven(Math.fround(value / newScale[channelOf(i)])))));
    writeValues(bytes, where, quantized);
    writeValues(scaleBytes, where.scale, newScale);
    if (where.bias) {
      const biasBytes = await bytesOf(where.bias.file);
      const biasScaleBytes = await bytesOf(where.bias.scale.file);
      const bias = readValues(biasBytes, where.bias, what);
      const biasScale = readValues(biasScaleBytes, where.bias.scale, what).map(Math.fround);
      const newBiasScale = biasScale.map((s, c) => Math.fround(s * Math.fround(newScale[c] / oldScale[c])));
      writeValues(biasBytes, where.bias, bias.map((b, c) => roundEven((b * biasScale[c]) / newBiasScale[c])));
      writeValues(biasScaleBytes, where.bias.scale, newBiasScale);
    }
  }
  return files;
}

function checkMerged(values, component, name) {
  if (!values.every(Number.isFinite)) throw new AdapterError(`the merged ${component} weight '${name}' is not finite: lower the weights`);
}
