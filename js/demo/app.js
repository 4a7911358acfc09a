/**
 * The demo page: a bundle served by `lcm-run serve` (at /bundle/) run with lcm-edge on onnxruntime-web.
 * For automated checks: ?prompt=…&seed=…&steps=…&guidance=…&height=…&width=…&threads=…&backend=auto|wasm|webgpu
 * [&precision=auto|fp32|fp16|int8]&autorun=1 generates at once (height/width: the image's size, default the bundle's;
 * threads: WASM threads, default onnxruntime-web's; precision: a stored variant, "auto" runs what the bundle's
 * backend_variants says); document.body.dataset.status becomes "done" or "error: <message>"; window.lastImage holds
 * the last image's floats ({width, height, data}), window.lastTimings its stage timings (ms), window.lastVariants the
 * precision each component ran ({unet: "int8", …}) and window.lastBackend the backend that ran.
 * @module
 */

import * as ort from "onnxruntime-web";
import { Pipeline } from "lcm-edge";

// onnxruntime-web fetches its .wasm from here (served locally), not from a CDN.
ort.env.wasm.wasmPaths = new URL("/node_modules/onnxruntime-web/dist/", location.href).href;
ort.env.logLevel = "error"; // not the per-session "nodes not assigned to the preferred provider" warnings

const $ = (id) => /** @type {HTMLInputElement} */ (document.getElementById(id));
const BUNDLE = new URL("/bundle/", location.href).href;
const query = new URLSearchParams(location.search);
/** @param {string} name @returns {number | undefined} a positive integer query parameter */
function queryInteger(name) {
  const value = Number(query.get(name));
  return query.has(name) && Number.isInteger(value) && value >= 1 ? value : undefined;
}

/** @type {Map<string, Promise<Pipeline>>} one pipeline per backend asked for, loaded once */
const pipelines = new Map();

function setStatus(text, isError = false) {
  $("status").textContent = text;
  $("status").className = isError ? "error" : "";
  document.body.dataset.status = text;
}

/** @param {string} backend */
function pipeline(backend) {
  if (!pipelines.has(backend)) {
    const threads = queryInteger("threads");
    // ?precision=fp32|fp16|int8 forces a stored variant; "auto" runs what the bundle's backend_variants says.
    const precision = new URLSearchParams(location.search).get("precision") || "auto";
    const loading = Pipeline.load(BUNDLE, { backend, precision, ...(threads ? { threads } : {}) });
    loading.catch(() => pipelines.delete(backend)); // a failed load is retried next time
    pipelines.set(backend, loading);
  }
  return pipelines.get(backend);
}

/** Draw (H, W, 3) floats in [0, 1] at the image's size, rounded to bytes as lcm-run writes PNGs. */
function draw(image) {
  const canvas = /** @type {HTMLCanvasElement} */ (document.getElementById("image"));
  canvas.width = image.width;
  canvas.height = image.height;
  canvas.style.width = `${Math.max(image.width, 256)}px`;
  const context = canvas.getContext("2d");
  const pixels = context.createImageData(image.width, image.height);
  for (let i = 0, j = 0; i < image.data.length; i += 3, j += 4) {
    for (let c = 0; c < 3; c++) pixels.data[j + c] = Math.round(Math.min(1, Math.max(0, image.data[i + c])) * 255);
    pixels.data[j + 3] = 255;
  }
  context.putImageData(pixels, 0, 0);
}

/** One bar per stage, as wide as its share of the total. @param {Record<string, number>} timings */
function showTimings(timings) {
  const box = $("timings");
  box.replaceChildren();
  const total = timings.total || 1;
  for (const [stage, ms] of Object.entries(timings)) {
    const row = document.createElement("div");
    row.className = stage === "total" ? "stage total" : "stage";
    const name = document.createElement("span");
    name.textContent = stage;
    const bar = document.createElement("div");
    bar.className = "bar";
    bar.style.width = `${(100 * ms) / total}%`;
    const value = document.createElement("span");
    value.textContent = `${ms.toFixed(1)} ms`;
    row.append(name, bar, value);
    box.append(row);
  }
}

async function generate() {
  $("generate").disabled = true;
  try {
    const backend = $("backend").value;
    setStatus(`loading the bundle (${backend})…`);
    const pipe = await pipeline(backend);
    $("backend-name").textContent = pipe.backend;
    window.lastBackend = pipe.backend;
    window.lastVariants = variantsOf(pipe);
    setStatus(`generating on ${pipe.backend}…`);
    const guidance = $("guidance").value.trim();
    const out = await pipe.generate($("prompt").value, {
      numInferenceSteps: Number($("steps").value),
      seed: Number($("seed").value),
      ...(queryInteger("height") ? { height: queryInteger("height") } : {}),
      ...(queryInteger("width") ? { width: queryInteger("width") } : {}),
      ...(guidance ? { guidanceScale: Number(guidance) } : {}),
    });
    const image = out.images[0];
    draw(image);
    showTimings(out.timings);
    window.lastImage = { width: image.width, height: image.height, data: image.data };
    window.lastTimings = out.timings;
    setStatus("done");
  } catch (error) {
    console.error(error);
    setStatus(`error: ${error && error.message ? error.message : error}`, true);
  } finally {
    $("generate").disabled = false;
  }
}

/** Load the pipeline for the chosen backend without generating (bench/web.py times it); resolves to the backend. */
/** The precision each open component runs, e.g. {text_encoder: "fp32", unet: "int8", vae_decoder: "fp32"}. */
function variantsOf(pipe) {
  return Object.fromEntries(Object.entries(pipe.variants).map(([name, choice]) => [name, choice.variant.precision]));
}

window.loadPipeline = () =>
  pipeline($("backend").value).then((pipe) => {
    window.lastVariants = variantsOf(pipe);
    return pipe.backend;
  });

$("isolated").textContent = String(globalThis.crossOriginIsolated);
$("form").addEventListener("submit", (event) => {
  event.preventDefault();
  generate();
});

for (const name of ["prompt", "seed", "steps", "guidance", "backend"]) {
  if (query.has(name)) $(name).value = query.get(name);
}
if (query.get("autorun") === "1") generate();
