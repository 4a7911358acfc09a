/**
 * The ONNX Runtime backends (bundle-format.md, "Choosing a variant" rule 1: all run `onnx` variants): onnxruntime-node
 * ("node", Node only), onnxruntime-web's WASM ("wasm", browsers and Node) and WebGPU ("webgpu", browsers with an
 * adapter). "auto" picks onnxruntime-node when it is installed, else WASM in Node; WebGPU where navigator.gpu gives
 * an adapter, else WASM in a browser. Sessions are created once per component and reused.
 * @module
 */

import { UserError } from "./errors.js";
import { isNode } from "./source.js";

export const BACKENDS = ["auto", "node", "wasm", "webgpu"];

/**
 * @typedef {object} Backend
 * @property {string} name            which one runs: "node", "wasm" or "webgpu"
 * @property {boolean} fp16           it runs fp16 graphs (false: a WebGPU adapter without the shader-f16 feature)
 * @property {any} ort                the onnxruntime module
 * @property {(model: string | Uint8Array, externalData: Array<{path: string, data: Uint8Array | string}>) => Promise<any>} createSession
 */

async function importNode() {
  try {
    return await import("onnxruntime-node");
  } catch {
    return null;
  }
}

async function webGpuAdapter() {
  try {
    return (globalThis.navigator?.gpu && (await globalThis.navigator.gpu.requestAdapter())) || null;
  } catch {
    return null;
  }
}

/**
 * @param {string} backend one of BACKENDS
 * @param {{threads?: number, sessionOptions?: object}} [options]
 * @returns {Promise<Backend>}
 */
export async function openBackend(backend, options = {}) {
  if (!BACKENDS.includes(backend)) throw new UserError(`backend=${JSON.stringify(backend)}: pick one of ${BACKENDS.join(", ")}`);
  if (options.threads !== undefined && !(Number.isInteger(options.threads) && options.threads >= 1)) {
    throw new UserError(`threads=${JSON.stringify(options.threads)}: pass a positive integer`);
  }
  let name = backend;
  let nodeModule = null;
  if (backend === "auto") {
    if (isNode) {
      nodeModule = await importNode();
      name = nodeModule ? "node" : "wasm";
    } else {
      name = (await webGpuAdapter()) ? "webgpu" : "wasm";
    }
  }
  const extra = options.sessionOptions || {};
  if (name === "node") {
    if (!isNode) throw new UserError("backend 'node' (onnxruntime-node) runs in Node only: use 'wasm' or 'webgpu' in a browser");
    const ort = nodeModule || (await importNode());
    if (!ort) throw new UserError("backend 'node' needs onnxruntime-node: npm install onnxruntime-node (with ONNXRUNTIME_NODE_INSTALL=skip)");
    const sessionOptions = {
      executionProviders: ["cpu"],
      graphOptimizationLevel: "all",
      ...(options.threads ? { intraOpNumThreads: options.threads, interOpNumThreads: 1 } : {}),
      ...extra,
    };
    return {
      name,
      fp16: true,
      ort,
      // A model path lets onnxruntime-node find external data beside it; bytes carry none.
      createSession: (model) => ort.InferenceSession.create(model, sessionOptions),
    };
  }
  let ort;
  let fp16 = true;
  if (name === "webgpu") {
    const adapter = await webGpuAdapter();
    if (!adapter) throw new UserError("backend 'webgpu': navigator.gpu gives no adapter here: use 'wasm'");
    fp16 = adapter.features.has("shader-f16");
    ort = await import("onnxruntime-web/webgpu");
  } else {
    ort = await import("onnxruntime-web");
  }
  if (options.threads) ort.env.wasm.numThreads = options.threads;
  else if (isNode) ort.env.wasm.numThreads = 1; // Node: no worker threads unless asked
  return {
    name,
    fp16,
    ort,
    createSession: (model, externalData) =>
      ort.InferenceSession.create(model, {
        executionProviders: [name],
        graphOptimizationLevel: "all",
        ...(externalData.length ? { externalData } : {}),
        ...extra,
      }),
  };
}

/** float32 -> IEEE half bits (round to nearest even). @param {Float32Array} values @returns {Uint16Array} */
export function toFloat16(values) {
  const out = new Uint16Array(values.length);
  const f32 = new Float32Array(1);
  const u32 = new Uint32Array(f32.buffer);
  for (let i = 0; i < values.length; i++) {
    f32[0] = values[i];
    const x = u32[0];
    const sign = (x >>> 16) & 0x8000;
    const exponent = (x >>> 23) & 0xff;
    let mantissa = x & 0x7fffff;
    if (exponent === 0xff) {
      out[i] = sign | 0x7c00 | (mantissa ? 0x200 : 0);
      continue;
    }
    let e = exponent - 127 + 15;
    if (e >= 0x1f) {
      out[i] = sign | 0x7c00;
      continue;
    }
    if (e <= 0) {
      if (e < -10) {
        out[i] = sign;
        continue;
      }
      mantissa |= 0x800000;
      const shift = 14 - e;
      let half = mantissa >>> shift;
      const rest = mantissa & ((1 << shift) - 1);
      const halfway = 1 << (shift - 1);
      if (rest > halfway || (rest === halfway && half & 1)) half++;
      out[i] = sign | half;
      continue;
    }
    let half = (e << 10) | (mantissa >>> 13);
    const rest = mantissa & 0x1fff;
    if (rest > 0x1000 || (rest === 0x1000 && half & 1)) half++;
    out[i] = sign | half;
  }
  return out;
}

/** IEEE half bits -> float32. @param {Uint16Array} bits @returns {Float32Array} */
export function fromFloat16(bits) {
  const out = new Float32Array(bits.length);
  for (let i = 0; i < bits.length; i++) {
    const h = bits[i];
    const sign = h & 0x8000 ? -1 : 1;
    const exponent = (h >>> 10) & 0x1f;
    const mantissa = h & 0x3ff;
    if (exponent === 0) out[i] = sign * mantissa * 2 ** -24;
    else if (exponent === 0x1f) out[i] = mantissa ? NaN : sign * Infinity;
    else out[i] = sign * (1 + mantissa / 1024) * 2 ** (exponent - 15);
  }
  return out;
}
