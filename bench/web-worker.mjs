/**
 * One engine of bench/web.py in its own process: the JS runtime (js/src) in Node on onnxruntime-node ("node") or
 * onnxruntime-web's WASM ("wasm"), or the demo page in headless Chromium ("chromium": `lcm-run serve` at --url, driven
 * with playwright-core). Reads one JSON command a line on stdin, answers one JSON line on stdout:
 *
 *   {"cmd": "load"}               -> {"load_s", "backend", "variants"}   (Chromium: the page's loadPipeline())
 *   {"cmd": "run"}                -> {"seconds", "timings"}  one image (prompt, seed, steps, size from argv)
 *   {"cmd": "image", "path": P}   -> {}                     the last image as float32 (H, W, 3) raw bytes at P
 *   {"cmd": "memory"}             -> {...}                  Chromium: performance.memory, measureUserAgentSpecificMemory
 *
 *   node bench/web-worker.mjs ENGINE --bundle DIR | --url URL --prompt P --seed N --steps N --size N --threads N
 *                             [--precision auto|fp32|fp16|int8]
 */

import fs from "node:fs";
import readline from "node:readline";
import { createRequire } from "node:module";

const JS = new URL("../js/", import.meta.url);
const argv = process.argv.slice(2);
const engine = argv[0];
const arg = (name) => argv[argv.indexOf(`--${name}`) + 1];
const prompt = arg("prompt");
const seed = Number(arg("seed"));
const steps = Number(arg("steps"));
const size = Number(arg("size"));
const threads = Number(arg("threads"));
const precision = argv.includes("--precision") ? arg("precision") : "auto"; // which stored variant: auto, fp32, int8

let pipe = null;
let page = null;
let browser = null;
let lastImage = null;

async function load() {
  const started = performance.now();
  if (engine === "chromium") {
    const require = createRequire(new URL("package.json", JS));
    const { chromium } = require("playwright-core");
    browser = await chromium.launch({
      executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
      args: ["--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--js-flags=--max-old-space-size=8192",
        ...(process.env.WEBGPU ? ["--enable-unsafe-webgpu"] : [])],
      headless: true,
    });
    page = await (await browser.newContext()).newPage();
    page.on("pageerror", (error) => process.stderr.write(`pageerror: ${error.message}\n`));
    const query = new URLSearchParams({ prompt, seed: String(seed), steps: String(steps), height: String(size),
      width: String(size), threads: String(threads), backend: process.env.WEBGPU ? "webgpu" : "wasm", precision });
    await page.goto(new URL(`/demo/index.html?${query}`, arg("url")).href);
    const backend = await page.evaluate(() => window.loadPipeline());
    return {
      load_s: (performance.now() - started) / 1000,
      backend,
      variants: await page.evaluate(() => window.lastVariants),
      crossOriginIsolated: await page.evaluate(() => crossOriginIsolated),
    };
  }
  const { Pipeline } = await import(new URL("src/index.js", JS).href);
  pipe = await Pipeline.load(arg("bundle"), { backend: engine, precision, ...(engine === "wasm" ? { threads } : {}) });
  return {
    load_s: (performance.now() - started) / 1000,
    backend: pipe.backend,
    variants: Object.fromEntries(Object.entries(pipe.variants).map(([k, v]) => [k, v.variant.precision])),
  };
}

async function run() {
  const started = performance.now();
  if (engine === "chromium") {
    await page.evaluate(() => {
      document.body.dataset.status = "";
      document.getElementById("generate").click();
    });
    await page.waitForFunction(() => /^(done|error)/.test(document.body.dataset.status || ""), null, { timeout: 0, polling: 200 });
    const seconds = (performance.now() - started) / 1000;
    const status = await page.evaluate(() => document.body.dataset.status);
    if (status !== "done") throw new Error(status);
    return { seconds, timings: await page.evaluate(() => window.lastTimings), backend: await page.evaluate(() => window.lastBackend) };
  }
  const out = await pipe.generate(prompt, { numInferenceSteps: steps, seed, height: size, width: size });
  const seconds = (performance.now() - started) / 1000;
  lastImage = out.images[0].data;
  return { seconds, timings: out.timings };
}

async function image(path) {
  let data = lastImage;
  if (engine === "chromium") data = Float32Array.from(await page.evaluate(() => Array.from(window.lastImage.data)));
  fs.writeFileSync(path, Buffer.from(data.buffer, data.byteOffset, data.byteLength));
  return {};
}

async function memory() {
  if (engine !== "chromium") return {};
  return page.evaluate(async () => {
    const result = {};
    if (performance.memory) {
      result.performance_memory = { usedJSHeapSize: performance.memory.usedJSHeapSize, totalJSHeapSize: performance.memory.totalJSHeapSize };
    }
    if (performance.measureUserAgentSpecificMemory) {
      try {
        const measured = await performance.measureUserAgentSpecificMemory();
        result.measureUserAgentSpecificMemory = measured.bytes;
      } catch (error) {
        result.measureUserAgentSpecificMemory = `failed: ${error.message}`;
      }
    } else result.measureUserAgentSpecificMemory = "not available";
    return result;
  });
}

const lines = readline.createInterface({ input: process.stdin });
for await (const line of lines) {
  const command = JSON.parse(line);
  let answer;
  try {
    if (command.cmd === "load") answer = await load();
    else if (command.cmd === "run") answer = await run();
    else if (command.cmd === "image") answer = await image(command.path);
    else if (command.cmd === "memory") answer = await memory();
    else if (command.cmd === "quit") break;
  } catch (error) {
    answer = { error: String(error && error.message ? error.message : error).slice(0, 2000) };
  }
  process.stdout.write(`${JSON.stringify(answer)}\n`);
}
if (browser) await browser.close();
process.exit(0);
