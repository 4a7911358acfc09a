/**
 * Open the demo page served by `lcm-run serve` in the system Chromium (playwright-core, no browser download), wait
 * for it to finish and print one JSON object: status, backend, variants, crossOriginIsolated, the canvas's RGBA bytes,
 * window.lastImage's floats and the paths the page fetched. Used by tests/js/test_browser.py.
 *
 *   node tools/run-page.mjs URL [--webgpu] [--timeout SECONDS]
 *
 * (Outside test/: `node --test test/` runs every .mjs under a folder named test.)
 *
 * --webgpu launches Chromium with --enable-unsafe-webgpu (and the GPU process: SwiftShader where there is no GPU);
 * when navigator.gpu gives no adapter the page is not run and the JSON says {"skip": reason}.
 */

import { chromium } from "playwright-core";

const args = process.argv.slice(2);
const url = args.find((a) => !a.startsWith("--"));
const webgpu = args.includes("--webgpu");
const timeoutIndex = args.indexOf("--timeout");
const timeout = 1000 * (timeoutIndex >= 0 ? Number(args[timeoutIndex + 1]) : 120);
const executablePath = process.env.CHROMIUM || "/usr/bin/chromium";

const flags = [
  "--headless=new",
  "--no-sandbox",
  "--disable-quic",
  "--no-first-run",
  "--disable-background-networking",
  "--disable-component-update",
  "--disable-sync",
  ...(webgpu ? ["--enable-unsafe-webgpu"] : ["--disable-gpu"]),
];

const browser = await chromium.launch({ executablePath, args: flags, headless: true, timeout: 60000 });
const result = {};
try {
  const context = await browser.newContext();
  const page = await context.newPage();
  const logs = [];
  page.on("console", (message) => logs.push(`${message.type()}: ${message.text()}`));
  page.on("pageerror", (error) => logs.push(`pageerror: ${error.message}`));
  // Offline: anything not on the page's own server fails (and is counted).
  const origin = new URL(url).origin;
  const external = [];
  const fetched = []; // the paths the page GETs from its server (HEAD requests, size checks, are not counted)
  await context.route("**/*", (route) => {
    const request = route.request();
    if (request.url().startsWith(origin)) {
      if (request.method() === "GET") fetched.push(new URL(request.url()).pathname);
      return route.continue();
    }
    external.push(route.request().url());
    return route.abort();
  });
  if (webgpu) {
    await page.goto(new URL("/demo/index.html", url).href);
    const adapter = await page.evaluate(async () => {
      if (!navigator.gpu) return null;
      const found = await navigator.gpu.requestAdapter();
      return found ? { fallback: !!found.isFallbackAdapter || !!found.info?.isFallbackAdapter, vendor: found.info?.vendor ?? "" } : null;
    });
    if (!adapter) {
      result.skip = "navigator.gpu.requestAdapter() gives null in this Chromium (no WebGPU adapter)";
    } else result.adapter = adapter;
  }
  if (!result.skip) {
    const started = Date.now();
    await page.goto(url);
    try {
      await page.waitForFunction(() => /^(done|error)/.test(document.body.dataset.status || ""), null, { timeout });
    } catch (error) {
      if (error.name !== "TimeoutError") throw error;
      result.timedOut = true; // the page's status (where it stopped) and its logs still say what happened
    }
    result.seconds = (Date.now() - started) / 1000;
    Object.assign(
      result,
      await page.evaluate(() => {
        const canvas = /** @type {HTMLCanvasElement} */ (document.getElementById("image"));
        const image = /** @type {any} */ (window).lastImage;
        const pixels = canvas.width ? canvas.getContext("2d").getImageData(0, 0, canvas.width, canvas.height).data : [];
        return {
          status: document.body.dataset.status,
          shown: document.getElementById("status").textContent,
          backend: /** @type {any} */ (window).lastBackend ?? null,
          variants: /** @type {any} */ (window).lastVariants ?? null,
          crossOriginIsolated: globalThis.crossOriginIsolated,
          width: canvas.width,
          height: canvas.height,
          canvas: Array.from(pixels),
          lastImage: image ? { width: image.width, height: image.height, data: Array.from(image.data) } : null,
          timings: Array.from(document.querySelectorAll("#timings .stage span:first-child"), (e) => e.textContent),
        };
      }),
    );
  }
  result.external = external;
  result.fetched = fetched;
  result.logs = logs.slice(-20);
} finally {
  await browser.close();
}
process.stdout.write(`${JSON.stringify(result)}\n`);
