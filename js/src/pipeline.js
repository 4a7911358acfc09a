/**
 * `Pipeline.load(bundle)` then `generate(prompt, …)` / `img2img(image, prompt, …)`: the LCM loop of
 * docs/bundle-format.md ("The LCM loop as data", "Image-to-image") on ONNX Runtime, in Node or a browser. The loop
 * knows no model family: the text encoders and U-Net inputs come from the manifest's conditioning declaration.
 * Given the same random tensors (or the same seed: the shared generator) the images equal the Python runtime's.
 * ControlNet bundles (lcm-export --controlnet) run their ControlNets before each U-Net call (bundle-format.md,
 * "ControlNet"): `controlImage`, `controlnetConditioningScale`, `controlGuidanceStart` / `controlGuidanceEnd`.
 * @module
 */

import {
  baseWeightInputs,
  checkAdapter,
  checkAdapterMode,
  checkAdapterWeights,
  FACTOR_SHARE_AUTO,
  factorInputs,
  factorShares,
  factorSignature,
  patchedFiles,
  readAdapterFile,
  readWeightMaps,
  weightInputs,
} from "./adapters.js";
import { openBackend } from "./backends.js";
import { AdapterError, BundleError, NonFiniteError, UserError } from "./errors.js";
import { cutFactorBranches, FactorGraphError } from "./factorgraph.js";
import { loadManifest, strengthKey, verifyUsedFiles, VERIFY_MODES } from "./manifest.js";
import { PhiloxGenerator, seedKey } from "./philox.js";
import { openSource } from "./source.js";
import { PromptTokenizer } from "./tokenizer.js";
import { backendPreference, checkVariant, chooseVariant, chooseVariants } from "./variants.js";
import { fromFloat16, toFloat16 } from "./backends.js";
import { DEFAULT_BATCH_STEPS, FrameStream } from "./stream.js";

const now = () => globalThis.performance.now();

/**
 * @typedef {object} Image   an RGB image, row-major (H, W, 3), values in [0, 1]
 * @property {number} width
 * @property {number} height
 * @property {Float32Array} data  H*W*3 values
 */

/**
 * @typedef {object} ControlOptions   ControlNet bundles only (as diffusers' StableDiffusionControlNetPipeline)
 * @property {Image | Image[]} [controlImage]  one per ControlNet of the bundle, in its order; the output's size
 *   (not resized), preprocessed by the caller (edges, poses, depth), values in [0, 1]
 * @property {number | number[]} [controlnetConditioningScale]  default: each ControlNet's scale in the manifest
 * @property {number | number[]} [controlGuidanceStart]  the fraction of the steps each ControlNet starts at (0)
 * @property {number | number[]} [controlGuidanceEnd]    ... and ends at (1)
 */

/**
 * @typedef {object} ControlRequest  a call's checked ControlNet arguments, one entry per ControlNet
 * @property {Image[]} images
 * @property {number[]} scales
 * @property {number[]} starts
 * @property {number[]} ends
 */

/**
 * @typedef {object} FactorGraph   a session on a factor-inputs graph cut to the branches of some weights
 * @property {any} session
 * @property {string | null} folder   its temporary folder (onnxruntime-node, external data), removed with it
 * @property {string[]} kept          the weights (initializer names, sorted) whose branches it has
 */

/**
 * @typedef {object} PipelineOutput
 * @property {Image[]} images
 * @property {Record<string, number>} timings  milliseconds per stage: tokenize, text_encoder, "unet[i]", "scheduler[i]", vae_encode, vae_decode, total
 * @property {number | bigint} seed            the seed the draws not passed came from
 */

/** A NaN or inf is an error naming the stage, never a black image. @param {Float32Array | Uint16Array} values @param {string} stage */
export function checkFinite(values, stage) {
  for (let i = 0; i < values.length; i++) {
    if (!Number.isFinite(values[i])) {
      throw new NonFiniteError(`${stage} produced NaN or inf values: an fp16 overflow or an extreme guidance scale; try a lower guidance, or load with precision 'fp32'`);
    }
  }
}

/** @param {unknown} value @param {string} name @param {number} minimum */
function checkInteger(value, name, minimum) {
  if (!Number.isInteger(value) || /** @type {number} */ (value) < minimum) {
    throw new UserError(`${name}=${JSON.stringify(value)}: pass an integer >= ${minimum}`);
  }
  return /** @type {number} */ (value);
}

/** @param {unknown} prompt @param {string} name @returns {string[]} */
function checkPrompts(prompt, name = "prompt") {
  const prompts = typeof prompt === "string" ? [prompt] : prompt;
  if (!Array.isArray(prompts) || !prompts.length || !prompts.every((p) => typeof p === "string")) {
    throw new UserError(`${name} must be a string or a non-empty array of strings`);
  }
  return [...prompts];
}

/** The LCM w-embedding of guidance g (bundle-format.md, loop step 5), one row of d float32 values. */
export function guidanceEmbedding(guidanceScale, dimension, frequencies) {
  const w = Math.fround(Math.fround(guidanceScale - 1) * 1000);
  const half = Math.floor(dimension / 2);
  const row = new Float32Array(dimension);
  let table;
  if (frequencies) table = Float32Array.from(frequencies);
  else {
    const exponent = Math.fround(Math.fround(Math.log(Math.fround(10000))) / Math.fround(half - 1));
    table = new Float32Array(half);
    for (let k = 0; k < half; k++) table[k] = Math.exp(Math.fround(k * -exponent));
  }
  for (let k = 0; k < half; k++) {
    const angle = Math.fround(w * table[k]);
    row[k] = Math.sin(angle);
    row[half + k] = Math.cos(angle);
  }
  return row;
}

/** Repeat each of `rows` rows of `rowSize` values `count` times in a row. */
function repeatRows(data, rows, rowSize, count) {
  if (count === 1) return data;
  const out = new data.constructor(rows * count * rowSize);
  for (let r = 0; r < rows; r++) {
    for (let c = 0; c < count; c++) out.set(data.subarray(r * rowSize, (r + 1) * rowSize), (r * count + c) * rowSize);
  }
  return out;
}

/**
 * A text conditioning (encodeText) with each row `count` times in a row: the rows of `count` latents.
 * @param {{rows: number, sequence: number, width: number, hidden: Float32Array, pooledSize: number, pooled: Float32Array | null}} text
 */
export function repeatText(text, count) {
  return {
    ...text,
    rows: text.rows * count,
    hidden: repeatRows(text.hidden, text.rows, text.sequence * text.width, count),
    pooled: text.pooled && repeatRows(text.pooled, text.rows, text.pooledSize, count),
  };
}

/** @param {unknown} image @param {string} name @returns {Image} an image checked as {width, height, data} */
function checkImageShape(image, name) {
  const { width, height, data } = /** @type {any} */ (image) || {};
  if (!Number.isInteger(width) || !Number.isInteger(height) || !(data instanceof Float32Array) || data.length !== width * height * 3) {
    throw new UserError(`${name} must be {width, height, data: Float32Array of height*width*3 RGB values in [0, 1]}`);
  }
  return { width, height, data };
}

/** One number for every ControlNet, or a list of one per ControlNet, each in [low, high]. */
function perControlNet(name, value, count, low, high) {
  const values = Array.isArray(value) ? value : Array(count).fill(value);
  if (values.length !== count) throw new UserError(`${name}: pass one value or a list of ${count} (one per ControlNet of the bundle)`);
  for (const item of values) {
    if (typeof item !== "number" || !Number.isFinite(item) || item < low || item > high) {
      throw new UserError(`${name}=${JSON.stringify(item)}: pass a number from ${low} to ${high}`);
    }
  }
  return values;
}

/** The backends whose sessions can take their weights as inputs with every call (adapterMode "inputs"). */
const WEIGHT_INPUT_BACKENDS = ["node", "wasm"];
/**
 * The backends that run a factor-inputs graph, its untouched branches cut out, with factors of any rank (adapterMode
 * "factors"): onnxruntime's CPU kernels, in Node and in WASM.
 */
const FACTOR_INPUT_BACKENDS = ["node", "wasm"];

/** Remove a temporary folder of adapted files (Node). @param {string} folder */
async function removeFolder(folder) {
  const fs = await import("node:fs/promises");
  await fs.rm(folder, { recursive: true, force: true });
}

/** Concatenate float arrays. */
function concat(parts) {
  const out = new Float32Array(parts.reduce((n, p) => n + p.length, 0));
  let at = 0;
  for (const part of parts) {
    out.set(part, at);
    at += part.length;
  }
  return out;
}

/**
 * A residual's dim: "batch" the U-Net's rows, "latent_height" / "latent_height_K" the latent size (down-sampled by
 * K, rounded up as a stride-2 convolution with padding 1 does), a number as is.
 * @param {string | number} dim
 */
function latentDim(dim, rows, latentHeight, latentWidth) {
  if (typeof dim === "number") return dim;
  if (dim === "batch") return rows;
  const match = /^latent_(height|width)(?:_(\d+))?$/.exec(dim);
  if (!match) throw new BundleError(`a residual input has the dim '${dim}', which this runtime cannot size`);
  return Math.ceil((match[1] === "height" ? latentHeight : latentWidth) / Number(match[2] ?? 1));
}

export class Pipeline {
  /** @private */
  constructor(source, manifest, backend, precision) {
    this.source = source;
    this.manifest = manifest;
    this.backendImpl = backend;
    /** which backend runs: "node", "wasm" or "webgpu" */
    this.backend = backend.name;
    this.precision = precision;
    /** @type {"full" | "cached" | "size"} how the files a session opens are checked first */
    this.verify = "cached";
    /** @type {Record<string, import("./variants.js").VariantChoice>} the variant each open component runs, and why */
    this.variants = {};
    /** @type {Record<string, any>} */
    this.sessions = {};
    /** @type {Record<string, PromptTokenizer>} */
    this.tokenizers = {};
    /** @type {Array<[import("./adapters.js").Adapter, number]>} the adapters the calls run with */
    this.activeAdapters = [];
    /** @type {Record<string, import("./adapters.js").WeightMap> | null} read on the first setAdapters */
    this.weightMaps = null;
    /** @type {"auto" | "factors" | "inputs" | "rebuild"} how adapters run, as asked at load (adapterModes: as they run) */
    this.adapterMode = "auto";
    /** @private @type {Record<string, "factors" | "inputs" | "rebuild">} component -> how its active adapters run */
    this.modes = {};
    /** @private @type {Record<string, any>} component -> its weight-inputs graph's session (opened once, kept) */
    this.weightGraphs = {};
    /** @private @type {Record<string, FactorGraph>} component -> its cut factor-inputs graph's session (temporary
     * folder, kept branches), kept while the component runs adapters touching those weights as factors */
    this.factorGraphs = {};
    /** @private @type {Record<string, Record<string, import("./adapters.js").WeightInput>>} the stored weights a
     * component in "inputs" mode is fed for the layers no adapter changes (read once, kept while it runs so) */
    this.storedWeights = {};
    /** @private @type {Record<string, Record<string, any>>} component -> the weight tensors every call feeds */
    this.fedWeights = {};
    /** @private calls running (a weight swap waits for them) and what waits for none to run */
    this.running = 0;
    /** @private @type {Array<() => void>} */
    this.idleWaiters = [];
    /** @private @type {Record<string, string>} temporary folders of adapted sessions (onnxruntime-node, external data) */
    this.adaptedFolders = {};
    /** counts weight swaps: what a frame loop's encoded prompt was made on */
    this.weightsVersion = 0;
    /** @private @type {Set<WeakRef<any>>} the frame loops made here (a swap waits for none to hold frames) */
    this.streams = new Set();
  }

  /**
   * Load a bundle: validate the manifest (schema + checks beyond it), verify the files' sizes and sha256, choose one
   * variant per component, open one session each.
   * @param {string | URL} location a bundle folder (Node) or base URL
   * @param {{backend?: "auto" | "node" | "wasm" | "webgpu", precision?: "auto" | "fp32" | "fp16" | "int8",
   *          verify?: "full" | "cached" | "size", cacheDir?: string, threads?: number, sessionOptions?: object,
   *          adapters?: Record<string, number>, adapterMode?: "auto" | "factors" | "inputs" | "rebuild"}} [options]
   *   adapters: {file: weight} made by lcm-export adapter (see setAdapters); adapterMode: how they run: "factors"
   *   (each adapted layer's LoRA factors fed with every call to a branch beside it, the untouched layers' branches
   *   cut out, on one session per set of touched layers: a switch between adapters touching the same layers feeds
   *   new factors, each call slower by about the factors' share of the weights; node and wasm, float variants),
   *   "inputs" (the merged weights fed with every call to one session kept open: a switch is the merge alone, each
   *   call slower by the weights the backend cannot pre-pack; node and wasm, float variants), "rebuild"
   *   (merged into a new session per switch: no cost per call) or "auto" (the default: "factors" where it runs and
   *   the factors are at most 1% of the component's adaptable weights, else "inputs" where it runs, else "rebuild")
   * @returns {Promise<Pipeline>}
   */
  static async load(location, options = {}) {
    const { backend = "auto", precision = "auto", verify = "cached", cacheDir, threads, sessionOptions, adapters, adapterMode = "auto" } = options;
    checkAdapterMode(adapterMode);
    if (adapters !== undefined) checkAdapterWeights(adapters);
    if (!VERIFY_MODES.includes(verify)) throw new UserError(`verify=${JSON.stringify(verify)}: pick one of ${VERIFY_MODES.join(", ")}`);
    checkVariant(precision);
    const opened = await openBackend(backend, { threads, sessionOptions });
    const source = await openSource(location, { cacheDir });
    // Every listed file's presence and size now; the sha256 of each file before it is used (below, openSession).
    const manifest = await loadManifest(source, verify, new Set());
    const pipe = new Pipeline(source, manifest, opened, precision);
    pipe.verify = verify;
    pipe.adapterMode = adapterMode;
    const encoders = manifest.conditioning.text_encoders.map((e) => e.component);
    const controlnets = manifest.controlnet ? manifest.controlnet.models.map((model) => model.component) : [];
    const needed = [...encoders, "unet", ...controlnets, "vae_decoder"];
    const missing = needed.filter((name) => !(name in manifest.components));
    if (missing.length) throw new BundleError(`BUNDLE '${source.description}' has no ${missing.join(", ")}: re-export it`);
    Object.assign(pipe.variants, chooseVariants(manifest, needed, "onnx", precision, source.description, backendPreference(manifest, opened)));
    pipe.checkFp16(Object.values(pipe.variants));
    await verifyUsedFiles(manifest, source, verify, manifest.tokenizers.map((info) => info.path));
    for (const info of manifest.tokenizers) {
      const bytes = await source.read(info.path);
      let json;
      try {
        json = JSON.parse(new TextDecoder().decode(bytes));
      } catch {
        throw new BundleError(`BUNDLE '${source.description}': ${info.path} is not JSON`);
      }
      pipe.tokenizers[info.name] = new PromptTokenizer(json, info);
    }
    for (const name of needed) await pipe.openSession(name);
    if (adapters !== undefined && checkAdapterWeights(adapters).length) await pipe.setAdapters(adapters);
    return pipe;
  }

  /**
   * Run the next calls with these adapters (files from `lcm-export adapter`, paths in Node or URLs) at these
   * weights, mixed: W + Σ λᵢ·Bᵢ·Aᵢ, always from the base weights (`{}`: the base). Every file and weight is
   * checked first (an AdapterError naming the file); the components they change get their new weights, swapped in
   * when no call is running (a call in progress finishes on the weights it started with): in "factors" mode the
   * stacked factors are fed to a session on their factor-inputs graph with the branches of the weights no adapter
   * touches cut out (kept while the adapters touch the same weights; others open a new cut graph and the old one
   * closes), in "inputs" mode the merged weights their weight-inputs graph's session (opened once) is fed, in "rebuild" mode new sessions
   * on the patched bytes; back to the base (`{}`), a component that ran factors keeps its factor-inputs session fed
   * zero factors (the base image bit for bit, no session opened), the others their own session again
   * (adapterModes says which adapters run).
   * @param {Record<string, number> | Map<string, number>} adapters
   * @returns {Promise<void>}
   */
  async setAdapters(adapters) {
    const checked = checkAdapterWeights(adapters);
    this.refuseFramesInFlight();
    if (checked.length && !this.weightMaps) {
      const maps = Object.values(this.manifest.components).map((entry) => /** @type {any} */ (entry).weight_map).filter(Boolean);
      await verifyUsedFiles(this.manifest, this.source, this.verify, maps);
    }
    if (checked.length && !this.weightMaps) this.weightMaps = await readWeightMaps(this.source, this.manifest);
    if (checked.length && !Object.keys(this.weightMaps || {}).length) {
      throw new AdapterError(`BUNDLE '${this.source.description}' has no weight maps (exported before run-time adapters): re-export it`);
    }
    /** @type {Array<[import("./adapters.js").Adapter, number]>} */
    const wanted = [];
    for (const [file, weight] of checked) {
      wanted.push([checkAdapter(await readAdapterFile(file), file, /** @type {any} */ (this.weightMaps), this.source.description), weight]);
    }
    const touched = new Set([...this.activeAdapters, ...wanted].flatMap(([adapter]) => adapter.components));
    const sessions = {};
    const folders = {};
    /** @type {Record<string, {stored: Record<string, any> | null, tensors: Record<string, any>} | null>} "inputs" and
     * "factors" modes: what every call feeds (and the stored weights, "inputs") */
    const fed = {};
    /** @type {Record<string, "factors" | "inputs" | "rebuild">} */
    const modes = {};
    /** @type {Record<string, FactorGraph>} factor-inputs sessions opened here */
    const factorOpened = {};
    const created = []; // the sessions opened here (a weight-inputs graph's is kept even when this call fails)
    const release = async () => {
      for (const session of created) await /** @type {any} */ (session).release?.();
      for (const folder of Object.values(folders)) await removeFolder(folder);
      for (const { folder } of Object.values(factorOpened)) if (folder) await removeFolder(folder);
    };
    try {
      for (const component of [...touched].sort()) {
        if (!this.sessions[component]) continue; // a component not open (the VAE encoder before img2img)
        const terms = wanted.filter(([adapter]) => adapter.components.includes(component));
        const map = /** @type {any} */ (this.weightMaps)[component];
        const variant = this.variants[component].variant;
        fed[component] = null;
        const mode = terms.length ? this.modeFor(component, map, terms) : null;
        if (mode) modes[component] = mode;
        if (!mode && this.factorGraphs[component] && this.sessions[component] === this.factorGraphs[component].session) {
          // back to the base on the factor-inputs session, its factors zero: each branch adds (x·0)·0 = 0 to the
          // layer's own output (the base image bit for bit, as the Python runtime does), and no session opens
          sessions[component] = this.factorGraphs[component].session;
          fed[component] = { stored: null, tensors: this.zeroTensors(this.fedWeights[component]) };
          continue;
        }
        if (mode === "factors") {
          const inputs = factorInputs(map, variant, terms); // before a session opens: its errors are the adapter's
          const { kept, cut } = factorSignature(inputs);
          const open = this.factorGraphs[component];
          const reused = open && open.kept.join("\n") === kept.join("\n");
          if (!reused) {
            factorOpened[component] = await this.factorInputsGraph(component, map, kept, cut);
            created.push(factorOpened[component].session);
          }
          sessions[component] = (reused ? open : factorOpened[component]).session;
          // only the kept branches' factors: the cut ones are no inputs of the graph
          const keptInputs = Object.fromEntries(Object.entries(inputs).filter(([, input]) => !input.dims.includes(0)));
          fed[component] = { stored: null, tensors: this.weightTensors(keptInputs) };
          continue;
        }
        if (mode === "inputs") {
          sessions[component] = await this.weightInputsGraph(component, map);
          const stored = this.storedWeights[component] || (await baseWeightInputs((file) => this.source.read(file), map, variant));
          fed[component] = { stored, tensors: this.weightTensors(weightInputs(stored, map, variant, terms)) };
          continue;
        }
        let patched = new Map();
        if (terms.length) patched = await patchedFiles((file) => this.source.read(file), map, variant, terms);
        const [session, folder] = await this.createSession(component, patched);
        created.push(session);
        sessions[component] = session;
        if (folder) folders[component] = folder;
      }
    } catch (error) {
      await release();
      throw error;
    }
    while (this.running) await new Promise((resolve) => this.idleWaiters.push(resolve));
    try {
      this.refuseFramesInFlight(); // again, now that no push runs
    } catch (error) {
      await release();
      throw error;
    }
    const old = Object.keys(sessions).map((name) => [this.sessions[name], this.adaptedFolders[name]]);
    /** @type {FactorGraph[]} factor-inputs sessions no component runs any more */
    const dropped = [];
    for (const name of Object.keys(sessions)) {
      this.sessions[name] = sessions[name];
      if (folders[name]) this.adaptedFolders[name] = folders[name];
      else delete this.adaptedFolders[name];
      const weights = fed[name];
      if (weights) this.fedWeights[name] = weights.tensors;
      else delete this.fedWeights[name];
      if (weights?.stored) this.storedWeights[name] = weights.stored;
      else delete this.storedWeights[name]; // a session holding its weights, or factors: the copy is not needed
      if (modes[name]) this.modes[name] = modes[name];
      else delete this.modes[name];
      if (modes[name] === "factors" && !factorOpened[name]) continue; // the same branches: the same session
      if (!modes[name] && this.factorGraphs[name] && sessions[name] === this.factorGraphs[name].session) continue; // zero factors
      if (this.factorGraphs[name]) {
        dropped.push(this.factorGraphs[name]); // it holds the weights: not kept beside another session
        delete this.factorGraphs[name];
      }
      if (factorOpened[name]) this.factorGraphs[name] = factorOpened[name];
    }
    this.activeAdapters = wanted;
    this.weightsVersion += 1;
    const kept = new Set([
      ...Object.values(this.sessions),
      ...Object.values(this.weightGraphs),
      ...Object.values(this.factorGraphs).map((graph) => graph.session),
    ]);
    const closing = new Set();
    for (const [session, folder] of old) {
      if (session && !kept.has(session)) closing.add(session);
      if (folder) await removeFolder(folder);
    }
    for (const { session } of dropped) if (!kept.has(session)) closing.add(session);
    for (const session of closing) await session.release?.();
    for (const { folder } of dropped) if (folder) await removeFolder(folder);
  }

  /**
   * How `component`'s adapters (`terms`) run, as the Python runtime's AdapterState.mode_for: "factors" where the
   * backend (node, wasm), the variant (float) and the bundle (a factor-inputs graph with a branch for every weight
   * the adapters touch) allow it and, for "auto", their factors are at most FACTOR_SHARE_AUTO of the component's
   * adaptable weights; else "inputs" where the backend (node, wasm), the variant and the bundle (a weight-inputs
   * graph) allow it; else "rebuild". adapterMode "factors" or "inputs" where one of them does not is an
   * AdapterError saying which.
   * @private @param {string} component @param {import("./adapters.js").WeightMap} map
   * @param {Array<[import("./adapters.js").Adapter, number]>} terms
   * @returns {"factors" | "inputs" | "rebuild"}
   */
  modeFor(component, map, terms) {
    const variant = this.variants[component].variant;
    const stored = map.variants[variant.name] || {};
    const floating = ["fp32", "fp16"].includes(variant.precision);
    const touched = new Set(terms.flatMap(([adapter]) => adapter.layers.filter((l) => l.component === component).map((l) => l.weight)));
    const branched = new Set(Array.isArray(stored.factor_inputs) ? stored.factor_inputs : []);
    let noFactors = null;
    if (!FACTOR_INPUT_BACKENDS.includes(this.backend)) {
      noFactors = `backend "${this.backend}" does not run adapters as factor inputs: load with backend "node" or "wasm"`;
    } else if (!floating) {
      noFactors = `the ${component} runs an ${variant.precision} variant: load with precision "fp32"`;
    } else if (typeof stored.factor_inputs_graph !== "string") {
      noFactors = `the bundle has no factor-inputs graph for its ${component}: re-export it`;
    } else if ([...touched].some((weight) => !branched.has(weight))) {
      noFactors = `the bundle's ${component} factor-inputs graph has no branch for some weights they adapt`;
    }
    let noInputs = null;
    if (!WEIGHT_INPUT_BACKENDS.includes(this.backend)) {
      noInputs = `backend "${this.backend}" runs adapters by rebuilding its sessions (it would upload every weight with every call): load with backend "node" or "wasm"`;
    } else if (!floating) {
      noInputs = `the ${component} runs an ${variant.precision} variant: load with precision "fp32"`;
    } else if (typeof stored.weight_inputs_graph !== "string") {
      noInputs = `the bundle has no weight-inputs graph for its ${component}: re-export it`;
    }
    if (this.adapterMode === "factors" || this.adapterMode === "inputs") {
      const missing = this.adapterMode === "factors" ? noFactors : noInputs;
      if (missing !== null) throw new AdapterError(`adapterMode="${this.adapterMode}": ${missing}, or pass adapterMode "auto"`);
      return this.adapterMode;
    }
    if (this.adapterMode === "auto") {
      if (noFactors === null && factorShares(map, terms) <= FACTOR_SHARE_AUTO) return "factors";
      if (noInputs === null) return "inputs";
    }
    return "rebuild";
  }

  /**
   * A session on the weight map's `kind` graph of `component`'s variant ("weight_inputs_graph" or
   * "factor_inputs_graph"), once checked to be a file the manifest lists beside the variant: [session, temporary
   * folder or null], as createSession returns them.
   * @private @param {string} component @param {import("./adapters.js").WeightMap} map @param {string} kind
   */
  async openGraphBeside(component, map, kind) {
    return this.createSession(component, new Map(), this.graphBeside(component, map, kind));
  }

  /**
   * The bundle path of the weight map's `kind` graph of `component`'s variant, once checked to be a file the
   * manifest lists beside the variant.
   * @private @param {string} component @param {import("./adapters.js").WeightMap} map @param {string} kind
   */
  graphBeside(component, map, kind) {
    const variant = this.variants[component].variant;
    const graph = map.variants[variant.name][kind];
    const folder = variant.path.slice(0, variant.path.lastIndexOf("/") + 1);
    if (!this.manifest.files.some((entry) => entry.path === graph) || !graph.startsWith(folder) || graph.slice(folder.length).includes("/")) {
      throw new AdapterError(`weight map '${map.path}' names '${graph}', which the manifest does not list beside ${variant.path}: re-export the bundle`);
    }
    return graph;
  }

  /**
   * A session on `component`'s factor-inputs graph (bundle-format.md, "Weight maps and adapter files") with the
   * branches of the weights in `cut` cut out (factorgraph.js; `kept`: the others, what the session is for), its
   * file's sha256 checked before it is cut, as every opened file's; the cut bytes open as patched bytes do
   * (createSession: from memory, or onnxruntime-node's temporary folder beside links to the external data). A
   * branch still runs fed rank 0 (7.9% of an SD1.5 U-Net's call on onnxruntime for a style adapter's untouched
   * layers, against 1.0% cut), so setAdapters keeps it while the adapters touch the same weights.
   * @private @param {string} component @param {import("./adapters.js").WeightMap} map
   * @param {string[]} kept @param {string[]} cut
   * @returns {Promise<FactorGraph>}
   */
  async factorInputsGraph(component, map, kept, cut) {
    const graph = this.graphBeside(component, map, "factor_inputs_graph");
    const patched = new Map();
    if (cut.length) {
      await verifyUsedFiles(this.manifest, this.source, this.verify, [graph]); // the bytes cut are the listed ones
      try {
        patched.set(graph, cutFactorBranches(await this.source.read(graph), cut));
      } catch (error) {
        if (!(error instanceof FactorGraphError)) throw error;
        throw new FactorGraphError(`BUNDLE '${this.source.description}': ${graph}: ${error.message}: re-export the bundle`);
      }
    }
    const [session, temporary] = await this.createSession(component, patched, graph);
    return { session, folder: temporary, kept };
  }

  /**
   * The session of `component`'s weight-inputs graph (bundle-format.md, "Weight maps and adapter files"), opened
   * once (its file's sha256 checked first, as every opened file's) and kept while the pipeline lives.
   * @private @param {string} component @param {import("./adapters.js").WeightMap} map
   */
  async weightInputsGraph(component, map) {
    if (this.weightGraphs[component]) return this.weightGraphs[component];
    const [session, temporary] = await this.openGraphBeside(component, map, "weight_inputs_graph");
    this.weightGraphs[component] = session;
    if (temporary) this.adaptedFolders[`${component}.weight-inputs`] = temporary; // kept with the session
    return session;
  }

  /** @private: zero tensors of the types and dims of `tensors` (a factor-inputs session on the base weights) */
  zeroTensors(tensors) {
    const ort = this.backendImpl.ort;
    return Object.fromEntries(
      Object.entries(tensors).map(([name, tensor]) => [name, new ort.Tensor(tensor.type, new /** @type {any} */ (tensor.data).constructor(tensor.data.length), tensor.dims)]),
    );
  }

  /** @private: weight inputs as the backend's tensors, made once per switch and fed with every call */
  weightTensors(inputs) {
    const ort = this.backendImpl.ort;
    return Object.fromEntries(Object.entries(inputs).map(([name, input]) => [name, new ort.Tensor(input.dtype, input.data, input.dims)]));
  }

  /** How each component with active adapters runs them, {component: "factors" | "inputs" | "rebuild"} ({} on the base). */
  get adapterModes() {
    return { ...this.modes };
  }

  /** @private: a step-batched stream's frames in flight started on the current weights and must end on them */
  refuseFramesInFlight() {
    let holding = 0;
    for (const reference of [...this.streams]) {
      const stream = reference.deref();
      if (stream) holding += stream.framesInFlight;
      else this.streams.delete(reference);
    }
    if (holding) {
      throw new AdapterError(`setAdapters: ${holding} frame(s) of a step-batched stream are in flight and would run on two sets of weights: call the stream's flush() first`);
    }
  }

  /** The adapters the calls run with, {file: weight} ({}: the base weights). @returns {Record<string, number>} */
  get adapters() {
    return Object.fromEntries(this.activeAdapters.map(([adapter, weight]) => [adapter.file, weight]));
  }

  /** @private: one call on one set of weights from start to end (setAdapters waits for it) */
  async guarded(call) {
    this.running++;
    try {
      return await call();
    } finally {
      this.running--;
      if (!this.running) for (const wake of this.idleWaiters.splice(0)) wake();
    }
  }

  /** @private @param {string} name */
  /**
   * fp16 variants on a WebGPU adapter without shader-f16 compute wrong images without an exception: refuse them.
   * @param {import("./variants.js").VariantChoice[]} choices
   */
  checkFp16(choices) {
    const fp16 = choices.filter((c) => c.variant.precision === "fp16").map((c) => c.component);
    if (fp16.length && !this.backendImpl.fp16) {
      throw new UserError(`${fp16.join(", ")} would run fp16 on webgpu, but this adapter has no shader-f16 feature (onnxruntime-web's fp16 kernels need it): pass precision "fp32" or backend "wasm"`);
    }
  }

  async openSession(name) {
    if (this.sessions[name]) return;
    const [session] = await this.createSession(name, new Map());
    this.sessions[name] = session;
    // Only the active adapters' components get adapted sessions; one opened later (the VAE encoder) has none.
  }

  /**
   * A session of `name` on its chosen variant, `patched` (bundle path -> bytes) replacing those files' bytes
   * (run-time adapters "rebuild"), or on the graph at bundle path `graph` instead of the variant's .onnx with the
   * variant's external data (its weight-inputs or factor-inputs graph, beside it). onnxruntime-node reads external
   * data from beside a model path only: patched files of a model with external data are written to a temporary
   * folder (returned, removed when the session is replaced).
   * @private @param {string} name @param {Map<string, Uint8Array>} patched @param {string} [graph]
   * @returns {Promise<[any, string | null]>}
   */
  async createSession(name, patched, graph) {
    const variant = this.variants[name].variant;
    const source = this.source;
    const modelPath = graph ?? variant.path;
    const external = variant.files.filter((file) => file !== variant.path);
    const files = [modelPath, ...external];
    await verifyUsedFiles(this.manifest, source, this.verify, files);
    let model;
    let temporary = null;
    const externalData = [];
    const folder = variant.path.slice(0, variant.path.lastIndexOf("/") + 1);
    if (this.backend === "node" && source.resolve && !patched.size) model = await source.resolve(modelPath);
    else if (this.backend === "node" && !external.length) model = patched.get(modelPath) || (await source.read(modelPath));
    else if (this.backend === "node") {
      const fs = await import("node:fs/promises");
      const path = await import("node:path");
      const os = await import("node:os");
      temporary = await fs.mkdtemp(path.join(os.tmpdir(), "lcm-edge-adapter-"));
      for (const file of files) {
        const target = path.join(temporary, ...file.slice(folder.length).split("/"));
        await fs.mkdir(path.dirname(target), { recursive: true });
        if (patched.has(file)) await fs.writeFile(target, /** @type {Uint8Array} */ (patched.get(file)));
        else if (source.resolve) await fs.symlink(await source.resolve(file), target);
        else await fs.writeFile(target, await source.read(file));
      }
      model = path.join(temporary, ...modelPath.slice(folder.length).split("/"));
    } else {
      model = patched.get(modelPath) || (await source.read(modelPath));
      for (const file of external) {
        externalData.push({ path: file.slice(folder.length), data: patched.get(file) || (await source.read(file)) });
      }
    }
    let session;
    try {
      session = await this.backendImpl.createSession(model, externalData);
    } catch (error) {
      if (temporary) await removeFolder(temporary);
      throw new BundleError(`BUNDLE '${source.description}': ${modelPath} does not open on ${this.backend}: ${error.message}`);
    }
    if (source.bytes) for (const file of files) source.bytes.delete(file);
    return [session, temporary];
  }

  /**
   * Run a component: feeds {name: [dtype, data, dims]} with float data as Float32Array (cast to the variant's
   * io_dtype here), and in adapterMode "inputs" its weights ("factors": its adapters' factors); returns the
   * requested outputs as Float32Array.
   * @private
   */
  async run(name, feeds, outputs) {
    const ort = this.backendImpl.ort;
    const ioDtype = this.variants[name].variant.io_dtype;
    const tensors = { ...this.fedWeights[name] };
    for (const [input, [dtype, data, dims]] of Object.entries(feeds)) {
      if (dtype === "float32" && ioDtype === "float16") tensors[input] = new ort.Tensor("float16", toFloat16(data), dims);
      else tensors[input] = new ort.Tensor(dtype, data, dims);
    }
    const results = await this.sessions[name].run(tensors, outputs);
    /** @type {Record<string, {data: Float32Array, dims: number[]}>} */
    const out = {};
    for (const output of outputs) {
      const tensor = results[output];
      const data = tensor.type === "float16" ? fromFloat16(tensor.data) : Float32Array.from(tensor.data);
      out[output] = { data, dims: tensor.dims.map(Number) };
    }
    for (const tensor of Object.values(results)) tensor.dispose?.();
    return out;
  }

  /** The default guidance of the bundle. */
  get defaultGuidanceScale() {
    const p = this.manifest.pipeline;
    return p.default_guidance_scale ?? (p.guidance === "embedding" ? 8.5 : 1.0);
  }

  /** @private: every argument checked, the step table looked up */
  request(prompt, options, strength) {
    const p = this.manifest.pipeline;
    const prompts = checkPrompts(prompt);
    const images = checkInteger(options.numImagesPerPrompt ?? 1, "numImagesPerPrompt", 1);
    const steps = checkInteger(options.numInferenceSteps ?? 4, "numInferenceSteps", 1);
    const guidance = options.guidanceScale ?? this.defaultGuidanceScale;
    if (typeof guidance !== "number" || !Number.isFinite(guidance) || guidance < 0) {
      throw new UserError(`guidanceScale=${JSON.stringify(guidance)}: pass a finite number >= 0 (about 1-2 for LCM-LoRA bundles, 8.5 for distilled LCMs)`);
    }
    let seed = options.seed;
    if (seed === undefined || seed === null) seed = Math.floor(Math.random() * 2 ** 53);
    else seedKey(seed);
    const tables = this.manifest.scheduler.tables;
    let table;
    if (strength === undefined) {
      table = tables[String(steps)];
      if (!table) {
        const have = Object.keys(tables).filter((k) => /^\d+$/.test(k)).map(Number).sort((a, b) => a - b);
        throw new UserError(`numInferenceSteps=${steps}: this bundle has LCM schedules for ${have[0]}-${have[have.length - 1]} steps; pick one of those or re-export with --max-steps ${steps}`);
      }
    } else {
      if (typeof strength !== "number" || !Number.isFinite(strength) || !(strength > 0 && strength <= 1)) {
        throw new UserError(`strength=${JSON.stringify(strength)}: pass a number in (0, 1] (e.g. 0.5)`);
      }
      const key = strengthKey(steps, strength);
      table = tables[key];
      if (!table) {
        const have = Object.keys(tables).filter((k) => k.includes("@")).map((k) => k.replace("@", " steps at ")).join(", ");
        throw new UserError(`strength=${strength} with numInferenceSteps=${steps}: this bundle has image-to-image schedules for ${have || "no strength"}; pick one of those or re-export`);
      }
    }
    const negative = options.negativePrompt;
    let negatives = prompts.map(() => "");
    if (negative !== undefined && negative !== null) {
      if (p.guidance !== "cfg") throw new UserError("negativePrompt has no effect on this bundle: it is a distilled LCM (guidance is an embedding, there is no unconditional batch): drop the negative prompt");
      if (guidance <= 1) throw new UserError(`negativePrompt has no effect at guidanceScale=${guidance} (<= 1 runs no unconditional batch): raise the guidance or drop the negative prompt`);
      negatives = checkPrompts(negative, "negativePrompt");
      if (negatives.length === 1) negatives = prompts.map(() => negatives[0]);
      if (negatives.length !== prompts.length) throw new UserError(`negativePrompt: pass one, or one per prompt (${prompts.length}); got ${negatives.length}`);
    }
    const useCfg = p.guidance === "cfg" && guidance > 1;
    return { prompts, negatives, negativeGiven: negative !== undefined && negative !== null, images, steps, guidance, seed, table, useCfg, batch: prompts.length * images };
  }

  /** @private: a size the VAE can take */
  checkSize(height, width) {
    const multiple = this.manifest.pipeline.spatial_multiple;
    for (const [name, value] of [["height", height], ["width", width]]) {
      if (!Number.isInteger(value) || value <= 0 || value % multiple) {
        throw new UserError(`${name}=${JSON.stringify(value)}: must be a positive multiple of ${multiple} (manifest.json field pipeline.spatial_multiple: the VAE's scale factor ${this.manifest.pipeline.vae_scale_factor})`);
      }
    }
  }

  /** @private: a caller's tensor checked, or the next draw (tensor k of the draw order either way) */
  draw(name, given, size, generator, shape) {
    if (given === undefined || given === null) return generator.standardNormal(size);
    generator.skip();
    if (!(given instanceof Float32Array) || given.length !== size) {
      throw new UserError(`${name} has ${given?.length ?? "no"} values: expected a Float32Array of shape [${shape}] (${size} values)`);
    }
    for (let i = 0; i < size; i++) if (!Number.isFinite(given[i])) throw new UserError(`${name} contains NaN or inf: pass finite values`);
    return given;
  }

  /** @private */
  drawSteps(given, count, size, generator, shape) {
    if (given === undefined || given === null) return Array.from({ length: count }, () => generator.standardNormal(size));
    if (!Array.isArray(given) || given.length !== count || given.some((n) => !(n instanceof Float32Array) || n.length !== size)) {
      throw new UserError(`noise must be ${count} Float32Arrays of shape [${shape}] (one per step but the last); got ${Array.isArray(given) ? given.length : typeof given}`);
    }
    for (const n of given) for (let i = 0; i < size; i++) if (!Number.isFinite(n[i])) throw new UserError("noise contains NaN or inf: pass finite noise tensors");
    for (let i = 0; i < count; i++) generator.skip();
    return given;
  }

  /**
   * Text-to-image.
   * @param {string | string[]} prompt
   * A control image (ControlNet bundles) sets the size when height and width are not given.
   * @param {{negativePrompt?: string | string[], numInferenceSteps?: number, guidanceScale?: number,
   *          numImagesPerPrompt?: number, height?: number, width?: number, seed?: number | bigint,
   *          latents?: Float32Array, noise?: Float32Array[]} & ControlOptions} [options]
   * @returns {Promise<PipelineOutput>}
   */
  async generate(prompt, options = {}) {
    return this.guarded(() => this.runGenerate(prompt, options));
  }

  /** @private: generate on the current weights (guarded) */
  async runGenerate(prompt, options = {}) {
    const start = now();
    const timings = {};
    const p = this.manifest.pipeline;
    const request = this.request(prompt, options);
    const control = this.control(options);
    const height = options.height ?? (control ? control.images[0].height : p.default_height);
    const width = options.width ?? (control ? control.images[0].width : p.default_width);
    this.checkSize(height, width);
    this.checkControlSize(control, height, width);
    const shape = [request.batch, p.latent_channels, height / p.vae_scale_factor, width / p.vae_scale_factor];
    const size = shape.reduce((a, b) => a * b, 1);
    // 2. Random draws in the format's order: the latents, then one noise per step but the last.
    const generator = new PhiloxGenerator(request.seed);
    const initial = Float32Array.from(this.draw("latents", options.latents, size, generator, shape));
    const sigma = Math.fround(this.manifest.scheduler.init_noise_sigma);
    for (let i = 0; i < size; i++) initial[i] = Math.fround(initial[i] * sigma);
    const noise = this.drawSteps(options.noise, request.table.timesteps.length - 1, size, generator, shape);
    return this.denoise(request, initial, noise, shape, height, width, timings, start, control);
  }

  /**
   * A call's ControlNet arguments checked against the bundle (bundle-format.md, "ControlNet"); null without a
   * control image (then only the defaults may be passed).
   * @private
   * @param {ControlOptions} options
   * @returns {ControlRequest | null}
   */
  control(options) {
    const info = this.manifest.controlnet;
    const { controlImage, controlnetConditioningScale: scale } = options;
    const start = options.controlGuidanceStart ?? 0;
    const end = options.controlGuidanceEnd ?? 1;
    if (controlImage === undefined || controlImage === null) {
      if (scale !== undefined || start !== 0 || end !== 1) {
        throw new UserError("controlnetConditioningScale / controlGuidanceStart / controlGuidanceEnd apply to a control image: pass controlImage too");
      }
      return null;
    }
    if (!info) {
      throw new UserError(`controlImage: BUNDLE '${this.source.description}' has no ControlNet: re-export it with --controlnet CN, or drop the control image`);
    }
    const count = info.models.length;
    const given = Array.isArray(controlImage) ? controlImage : [controlImage];
    if (given.length !== count) {
      throw new UserError(`controlImage: the bundle has ${count} ControlNet(s) and ${given.length} image(s) were given: pass one control image per ControlNet (an array, in the bundle's order)`);
    }
    const images = given.map((image) => checkImageShape(image, "controlImage"));
    const scales = scale === undefined ? info.models.map((model) => model.conditioning_scale ?? 1) : perControlNet("controlnetConditioningScale", scale, count, 0, 100);
    const starts = perControlNet("controlGuidanceStart", start, count, 0, 1);
    const ends = perControlNet("controlGuidanceEnd", end, count, 0, 1);
    starts.forEach((first, k) => {
      if (first >= ends[k]) throw new UserError(`controlGuidanceStart ${first} must be below controlGuidanceEnd ${ends[k]} (fractions of the steps)`);
    });
    return { images, scales, starts, ends };
  }

  /** @private: the control images must be the output's size (refused, never resized) */
  checkControlSize(control, height, width) {
    if (!control) return;
    for (const image of control.images) {
      if (image.height !== height || image.width !== width) {
        throw new UserError(`controlImage is ${image.width}x${image.height} but the image is ${width}x${height}: pass a control image of ${width}x${height} (it is not resized), or leave height/width unset to take the control image's`);
      }
    }
  }

  /**
   * Image-to-image: `image` encoded by the bundle's VAE encoder, noised to the first timestep of the strength's
   * schedule, denoised from there.
   * @param {Image} image
   * @param {string | string[]} prompt
   * @param {{strength?: number, negativePrompt?: string | string[], numInferenceSteps?: number,
   *          guidanceScale?: number, numImagesPerPrompt?: number, seed?: number | bigint,
   *          sampleNoise?: Float32Array, imageNoise?: Float32Array, noise?: Float32Array[]} & ControlOptions} [options]
   *   ControlNet bundles: the control image must be the image's size.
   * @returns {Promise<PipelineOutput>}
   */
  async img2img(image, prompt, options = {}) {
    return this.guarded(() => this.runImg2img(image, prompt, options));
  }

  /** @private: img2img on the current weights (guarded) */
  async runImg2img(image, prompt, options = {}) {
    const start = now();
    const timings = {};
    const p = this.manifest.pipeline;
    const request = this.request(prompt, options, options.strength ?? 0.5);
    const control = this.control(options);
    await this.openEncoder();
    const { width, height } = this.checkImage(image, "image");
    this.checkControlSize(control, height, width);
    const tiny = p.vae === "autoencoder_tiny";
    if (tiny && options.sampleNoise) throw new UserError("sampleNoise: this bundle's tiny VAE encodes deterministically and draws no latent sample");
    const C = p.latent_channels;
    const shape = [request.batch, C, height / p.vae_scale_factor, width / p.vae_scale_factor];
    const size = shape.reduce((a, b) => a * b, 1);
    const generator = new PhiloxGenerator(request.seed);
    const sampleNoise = tiny ? null : this.draw("sampleNoise", options.sampleNoise, size, generator, shape);
    const imageNoise = this.draw("imageNoise", options.imageNoise, size, generator, shape);
    const noise = this.drawSteps(options.noise, request.table.timesteps.length - 1, size, generator, shape);

    const mark = now();
    const latents = await this.encodeImage(image, request.batch, request.table, sampleNoise, imageNoise, shape);
    timings.vae_encode = now() - mark;
    return this.denoise(request, latents, noise, shape, height, width, timings, start, control);
  }

  /**
   * A frame loop for frames of one size (FrameStream, stream.js): the prompt encoded, the table and the VAE
   * encoder prepared once, and the same draws for every frame, in image-to-image's order (a still input gives a
   * still output; the first frame equals `img2img` of it with the same seed). `batchSteps`: N frames in flight,
   * one U-Net batch per frame, each row at its own step (needs a U-Net with one timestep per row); default off.
   * @param {string} prompt
   * @param {import("./stream.js").StreamOptions} [options]
   * @returns {Promise<FrameStream>}
   */
  async stream(prompt, options = {}) {
    const { batchSteps, strength = 0.5, numInferenceSteps, guidanceScale, negativePrompt, seed } = options;
    if (batchSteps !== undefined && batchSteps !== null && typeof batchSteps !== "boolean") {
      throw new UserError(`batchSteps=${JSON.stringify(batchSteps)}: pass true, false or undefined (the default, off)`);
    }
    if (typeof prompt !== "string" || (negativePrompt !== undefined && negativePrompt !== null && typeof negativePrompt !== "string")) {
      throw new UserError("stream() takes one prompt (a string): start one stream per prompt");
    }
    const request = this.request(prompt, { numInferenceSteps, guidanceScale, negativePrompt, seed }, strength);
    let batch = batchSteps ?? DEFAULT_BATCH_STEPS;
    if (batch && !this.perRowTimesteps) {
      if (batchSteps === undefined || batchSteps === null) batch = false; // an older bundle: the unbatched loop
      else throw new UserError(`batchSteps: BUNDLE '${this.source.description}' has a U-Net that takes one timestep for the whole batch (exported before per-row timesteps): re-export it, or pass batchSteps: false`);
    }
    await this.openEncoder();
    const text = await this.encodeText(request, {});
    const stream = new FrameStream(this, request, text, batch);
    this.streams.add(new WeakRef(stream));
    return stream;
  }

  /** The VAE encoder's session (image-to-image, the frame loop), opened on first use. */
  async openEncoder() {
    if (!("vae_encoder" in this.manifest.components)) {
      throw new BundleError(`BUNDLE '${this.source.description}' has no vae_encoder: re-export it without --no-vae-encoder`);
    }
    if (!this.variants.vae_encoder) {
      const choice = chooseVariant("vae_encoder", this.manifest.components.vae_encoder, "onnx", this.precision, backendPreference(this.manifest, this.backendImpl));
      this.checkFp16([choice]);
      this.variants.vae_encoder = choice;
      await this.openSession("vae_encoder");
    }
  }

  /**
   * An input image checked: its shape, and a size the VAE can take.
   * @param {unknown} image @param {string} name
   * @returns {Image}
   */
  checkImage(image, name) {
    const { width, height } = checkImageShape(image, name);
    this.checkSize(height, width);
    return /** @type {Image} */ (image);
  }

  /** The text conditioning of the request (rows repeated per image; with CFG the unconditional first). */
  async encodeText(request, timings) {
    const c = this.manifest.conditioning;
    const zeros = request.useCfg && !request.negativeGiven && c.empty_negative === "zeros";
    const texts = request.useCfg && !zeros ? [...request.negatives, ...request.prompts] : request.prompts;
    const rows = texts.length;
    const hiddenParts = [];
    let pooled = null;
    let pooledSize = 0;
    let sequence = 0;
    let tokenize = 0;
    let encode = 0;
    for (const encoder of c.text_encoders) {
      let mark = now();
      const tokenizer = this.tokenizers[encoder.tokenizer];
      const ids = tokenizer.encode(texts);
      if (tokenizer.truncated.length) {
        console.warn(`lcm-edge: a prompt is longer than the text encoder's ${tokenizer.info.max_length} tokens: its end is ignored; shorten the prompt`);
      }
      sequence = tokenizer.info.max_length;
      tokenize += now() - mark;
      mark = now();
      const wanted = [encoder.hidden_state, ...(encoder.pooled ? [encoder.pooled] : [])];
      const out = await this.run(encoder.component, { input_ids: ["int64", ids, [rows, sequence]] }, wanted);
      encode += now() - mark;
      const hidden = out[encoder.hidden_state];
      checkFinite(hidden.data, `the text encoder ${encoder.component}`);
      hiddenParts.push({ data: hidden.data, width: hidden.dims[2] });
      if (encoder.pooled) {
        pooled = out[encoder.pooled].data;
        pooledSize = out[encoder.pooled].dims[1];
      }
    }
    timings.tokenize = tokenize;
    timings.text_encoder = encode;
    // Concatenate on the last axis: (rows, S, ΣD).
    const total = hiddenParts.reduce((n, part) => n + part.width, 0);
    let hidden = new Float32Array(rows * sequence * total);
    for (let r = 0; r < rows * sequence; r++) {
      let offset = 0;
      for (const part of hiddenParts) {
        hidden.set(part.data.subarray(r * part.width, (r + 1) * part.width), r * total + offset);
        offset += part.width;
      }
    }
    if (zeros) {
      hidden = concat([new Float32Array(hidden.length), hidden]);
      if (pooled) pooled = concat([new Float32Array(pooled.length), pooled]);
    }
    const allRows = zeros ? 2 * rows : rows;
    return {
      rows: allRows * request.images,
      sequence,
      width: total,
      hidden: repeatRows(hidden, allRows, sequence * total, request.images),
      pooledSize,
      pooled: pooled && repeatRows(pooled, allRows, pooledSize, request.images),
    };
  }

  /**
   * The U-Net's residual inputs for one call (bundle-format.md, "ControlNet"): each ControlNet with a non-zero
   * scale at step `index` of `steps` runs on the U-Net's feeds `run` (with CFG both halves, the control image on
   * every row), its outputs times the scale in float32, summed in the bundle's order; zeros where none runs.
   * @private
   */
  async controlResiduals(run, control, index, steps, rows, latentHeight, latentWidth) {
    const m = this.manifest;
    const info = m.controlnet;
    /** @type {Record<string, Float32Array>} */
    let total = null;
    /** @type {Record<string, number[]>} */
    const dims = {};
    for (let k = 0; control && k < info.models.length; k++) {
      const kept = index / steps < control.starts[k] || (index + 1) / steps > control.ends[k] ? 0 : 1;
      const scale = Math.fround(control.scales[k] * kept);
      if (scale === 0) continue;
      const component = info.models[k].component;
      const feeds = {};
      for (const tensor of m.components[component].inputs) if (tensor.name !== "controlnet_cond") feeds[tensor.name] = run[tensor.name];
      const { width, height, data } = control.images[k];
      const plane = width * height;
      const chw = new Float32Array(3 * plane); // (1, 3, H, W), not normalised (diffusers' do_normalize=False)
      for (let i = 0; i < plane; i++) for (let c = 0; c < 3; c++) chw[c * plane + i] = data[i * 3 + c];
      feeds.controlnet_cond = ["float32", repeatRows(chw, 1, chw.length, rows), [rows, 3, height, width]];
      const outputs = await this.run(component, feeds, info.residual_inputs);
      const first = total === null;
      total = total || {};
      for (const name of info.residual_inputs) {
        const values = outputs[name].data;
        dims[name] = outputs[name].dims;
        const sum = first ? new Float32Array(values.length) : total[name];
        for (let i = 0; i < values.length; i++) sum[i] = first ? Math.fround(values[i] * scale) : Math.fround(sum[i] + Math.fround(values[i] * scale));
        total[name] = sum;
      }
    }
    const residuals = {};
    for (const tensor of m.components[info.unet].inputs.filter((t) => info.residual_inputs.includes(t.name))) {
      if (total) residuals[tensor.name] = ["float32", total[tensor.name], dims[tensor.name]];
      else {
        const shape = tensor.shape.map((dim) => latentDim(dim, rows, latentHeight, latentWidth));
        residuals[tensor.name] = ["float32", new Float32Array(shape.reduce((a, b) => a * b, 1)), shape];
      }
    }
    return residuals;
  }

  /** @private: the LCM loop from `latents` over the request's table, then the decode */
  async denoise(request, latents, noise, shape, height, width, timings, start, control = null) {
    const text = await this.encodeText(request, timings);
    // 5. Conditioning feeds, built once.
    const feeds = this.conditioningFeeds(request, text, height, width);
    const table = request.table;
    let x = latents;
    let denoised = latents;
    for (let i = 0; i < table.timesteps.length; i++) {
      const t = table.timesteps[i];
      let mark = now();
      const epsilon = await this.predict(request, feeds, x, new Array(shape[0]).fill(t), shape, control, i, table.timesteps.length);
      checkFinite(epsilon, `the U-Net at step ${i + 1} (timestep ${t})`);
      timings[`unet[${i}]`] = now() - mark;
      mark = now();
      ({ x, denoised } = this.step(table, i, epsilon, x, noise[i] ?? null, shape));
      timings[`scheduler[${i}]`] = now() - mark;
    }
    checkFinite(denoised, `the LCM step at step ${table.timesteps.length}`);
    // 7. Decode.
    const images = await this.decode(denoised, shape, timings);
    timings.total = now() - start;
    return { images, timings, seed: request.seed };
  }


  // -- the shared stages: text-to-image, image-to-image and the frame loop (stream.js) all call these ----------

  /**
   * The latents image-to-image starts from, (B, C, h, w): `image` encoded by the VAE encoder, sampled (KL VAE),
   * scaled and noised to the table's first timestep (bundle-format.md, "Image-to-image").
   * @param {Image} image  checked by the caller
   * @param {number} batch
   * @param {object} table  the strength's step table
   * @param {Float32Array | null} sampleNoise  (B, C, h, w); null for a tiny VAE
   * @param {Float32Array} imageNoise  (B, C, h, w)
   * @param {number[]} shape  [B, C, h, w]
   * @returns {Promise<Float32Array>}
   */
  async encodeImage(image, batch, table, sampleNoise, imageNoise, shape) {
    const p = this.manifest.pipeline;
    const { width, height, data } = image;
    const tiny = p.vae === "autoencoder_tiny";
    const size = shape.reduce((a, b) => a * b, 1);
    // 1. Encode: (B, 3, H, W) in [-1, 1].
    const plane = width * height;
    const one = new Float32Array(3 * plane);
    for (let i = 0; i < plane; i++) for (let c = 0; c < 3; c++) one[c * plane + i] = Math.fround(data[i * 3 + c] * 2 - 1);
    const pixels = repeatRows(one, 1, one.length, batch);
    const outputName = tiny ? "latents" : "latent_parameters";
    const encoded = (await this.run("vae_encoder", { sample: ["float32", pixels, [batch, 3, height, width]] }, [outputName]))[outputName].data;
    const latentPlane = size / batch;
    const z = new Float32Array(size);
    if (tiny) z.set(encoded);
    else {
      for (let b = 0; b < batch; b++) {
        for (let i = 0; i < latentPlane; i++) {
          const mean = encoded[b * 2 * latentPlane + i];
          const logVariance = Math.min(20, Math.max(-30, encoded[b * 2 * latentPlane + latentPlane + i]));
          const std = Math.fround(Math.exp(Math.fround(0.5 * logVariance)));
          z[b * latentPlane + i] = Math.fround(mean + Math.fround(std * sampleNoise[b * latentPlane + i]));
        }
      }
    }
    checkFinite(z, "the VAE encoder");
    // 2. Noise it to the schedule's first timestep (the scheduler's add_noise).
    const shift = p.vae_shift_factor;
    const scaling = Math.fround(p.vae_scaling_factor);
    const sqrtAlpha = Math.fround(table.sqrt_alpha_prod[0]);
    const sqrtBeta = Math.fround(table.sqrt_beta_prod[0]);
    const latents = new Float32Array(size);
    for (let i = 0; i < size; i++) {
      let value = z[i];
      if (shift !== null && shift !== undefined) value = Math.fround(value - Math.fround(shift));
      value = Math.fround(value * scaling);
      latents[i] = Math.fround(Math.fround(sqrtAlpha * value) + Math.fround(sqrtBeta * imageNoise[i]));
    }
    return latents;
  }

  /**
   * Every U-Net input but `sample` and `timestep`, for the rows of `text` (from encodeText, repeated to the
   * latents: twice with CFG).
   * @returns {Record<string, [string, Float32Array, number[]]>}
   */
  conditioningFeeds(request, text, height, width) {
    const m = this.manifest;
    const R = text.rows;
    const feeds = {};
    for (const [input, source] of Object.entries(m.conditioning.unet_inputs)) {
      if (source === "text_hidden_states") feeds[input] = ["float32", text.hidden, [R, text.sequence, text.width]];
      else if (source === "pooled_text") feeds[input] = ["float32", text.pooled, [R, text.pooledSize]];
      else if (source === "guidance_embedding") {
        const d = m.pipeline.time_cond_proj_dim;
        const row = guidanceEmbedding(request.guidance, d, m.conditioning.guidance_frequencies);
        feeds[input] = ["float32", repeatRows(row, 1, d, R), [R, d]];
      } else {
        const ids = Float32Array.from([height, width, 0, 0, height, width]);
        feeds[input] = ["float32", repeatRows(ids, 1, 6, R), [R, 6]];
      }
    }
    return feeds;
  }

  /** Whether the U-Net takes one timestep per row, so that one call can hold rows at different steps. */
  get perRowTimesteps() {
    return this.manifest.components.unet.inputs.find((t) => t.name === "timestep").shape.length === 1;
  }

  /**
   * One U-Net call over `latents` (B rows of shape[1:]), row k at `timesteps[k]`; with CFG the batch is doubled
   * ([unconditional, conditional]) and combined. `feeds` from conditioningFeeds for these rows. On a ControlNet
   * bundle the ControlNets run first on the same feeds (`control`: the call's checked ControlNet arguments, at step
   * `index` of `steps`; null: zero residuals).
   * @param {number[]} timesteps  B values
   * @param {ControlRequest | null} [control]
   * @returns {Promise<Float32Array>} the guided prediction, (B, C, h, w)
   */
  async predict(request, feeds, latents, timesteps, shape, control = null, index = 0, steps = 1) {
    const rows = timesteps.length;
    const R = request.useCfg ? 2 * rows : rows;
    const both = request.useCfg ? [...timesteps, ...timesteps] : timesteps;
    let timestep;
    if (this.perRowTimesteps) timestep = ["float32", Float32Array.from(both), [R]];
    else if (both.every((t) => t === both[0])) timestep = ["float32", Float32Array.of(both[0]), []];
    else throw new Error("this U-Net takes one timestep for the whole batch"); // callers check it first
    const sample = request.useCfg ? concat([latents, latents]) : latents;
    const run = { ...feeds, sample: ["float32", sample, [R, ...shape.slice(1)]], timestep };
    if (this.manifest.controlnet) Object.assign(run, await this.controlResiduals(run, control, index, steps, R, shape[2], shape[3]));
    const epsilon = (await this.run("unet", run, ["out_sample"])).out_sample.data;
    if (!request.useCfg) return epsilon;
    const size = latents.length;
    const g = Math.fround(request.guidance);
    const guided = new Float32Array(size);
    for (let k = 0; k < size; k++) {
      const u = epsilon[k];
      guided[k] = Math.fround(u + Math.fround(g * Math.fround(epsilon[size + k] - u)));
    }
    return guided;
  }

  /**
   * Denoised latents (B, C, h, w) -> images; `timings` gets `vae_decode` (ms).
   * @param {Float32Array} denoised
   * @param {number[]} shape  [B, C, h, w]
   * @returns {Promise<Image[]>}
   */
  async decode(denoised, shape, timings) {
    const mark = now();
    const p = this.manifest.pipeline;
    const size = denoised.length;
    const scaling = Math.fround(p.vae_scaling_factor);
    const shift = p.vae_shift_factor;
    const latentSample = new Float32Array(size);
    for (let k = 0; k < size; k++) {
      let value = Math.fround(denoised[k] / scaling);
      if (shift !== null && shift !== undefined) value = Math.fround(value + Math.fround(shift));
      latentSample[k] = value;
    }
    const decoded = (await this.run("vae_decoder", { latent_sample: ["float32", latentSample, shape] }, ["sample"])).sample.data;
    checkFinite(decoded, "the VAE decoder");
    timings.vae_decode = now() - mark;
    const height = shape[2] * p.vae_scale_factor;
    const width = shape[3] * p.vae_scale_factor;
    const plane = height * width;
    const images = [];
    for (let b = 0; b < shape[0]; b++) {
      const image = new Float32Array(plane * 3);
      for (let c = 0; c < 3; c++) {
        const base = (b * 3 + c) * plane;
        for (let i = 0; i < plane; i++) {
          const value = Math.fround(Math.fround(decoded[base + i] / 2) + 0.5);
          image[i * 3 + c] = value < 0 ? 0 : value > 1 ? 1 : value;
        }
      }
      images.push({ width, height, data: image });
    }
    return images;
  }

  /**
   * One LCM step (bundle-format.md, "The LCM step"), numbered as diffusers' LCMScheduler.step.
   * @private
   */
  step(table, i, epsilon, x, z, shape) {
    const s = this.manifest.scheduler;
    const f = Math.fround;
    // 2. α, β of this timestep and the next (from the table).
    const sqrtAlpha = f(table.sqrt_alpha_prod[i]);
    const sqrtBeta = f(table.sqrt_beta_prod[i]);
    // 3. Boundary scalings.
    const cSkip = f(table.c_skip[i]);
    const cOut = f(table.c_out[i]);
    const size = x.length;
    // 4. Predicted original sample.
    let x0 = new Float32Array(size);
    for (let k = 0; k < size; k++) {
      if (s.prediction_type === "epsilon") x0[k] = f(f(x[k] - f(sqrtBeta * epsilon[k])) / sqrtAlpha);
      else if (s.prediction_type === "sample") x0[k] = epsilon[k];
      else x0[k] = f(f(sqrtAlpha * x[k]) - f(sqrtBeta * epsilon[k]));
    }
    // 5. Thresholding or clipping.
    if (s.thresholding) x0 = this.threshold(x0, shape[0]);
    else if (s.clip_sample) {
      const limit = s.clip_sample_range;
      for (let k = 0; k < size; k++) x0[k] = Math.min(limit, Math.max(-limit, x0[k]));
    }
    // 6. Denoised.
    const denoised = new Float32Array(size);
    for (let k = 0; k < size; k++) denoised[k] = f(f(cOut * x0[k]) + f(cSkip * x[k]));
    // 7. Noise for the next timestep, except after the last step.
    if (i === table.timesteps.length - 1) return { x: denoised, denoised };
    const sqrtAlphaNext = f(table.sqrt_alpha_prod_next[i]);
    const sqrtBetaNext = f(table.sqrt_beta_prod_next[i]);
    const next = new Float32Array(size);
    for (let k = 0; k < size; k++) next[k] = f(f(sqrtAlphaNext * denoised[k]) + f(sqrtBetaNext * z[k]));
    return { x: next, denoised };
  }

  /** @private: dynamic thresholding per row (linear-interpolation quantile of |x0|) */
  threshold(x0, rows) {
    const s = this.manifest.scheduler;
    const per = x0.length / rows;
    const out = new Float32Array(x0.length);
    for (let r = 0; r < rows; r++) {
      const row = x0.subarray(r * per, (r + 1) * per);
      const sorted = Float64Array.from(row, Math.abs).sort();
      const position = s.dynamic_thresholding_ratio * (per - 1);
      const low = Math.floor(position);
      const high = Math.min(per - 1, low + 1);
      let limit = sorted[low] + (sorted[high] - sorted[low]) * (position - low);
      limit = Math.min(s.sample_max_value, Math.max(1, limit));
      for (let k = 0; k < per; k++) out[r * per + k] = Math.min(limit, Math.max(-limit, row[k])) / limit;
    }
    return out;
  }
}
