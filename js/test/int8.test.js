/**
 * INT8 on onnxruntime-web's WASM backend against the Python runtime (references from tests/js/test_node_runtime.py,
 * `_int8_probe`): not a max abs bound but what the difference is made of (docs/design-notes.md, "JavaScript
 * runtime"). With Python's feeds, one U-Net call at a time, the QDQ graph run as its ops say on both engines: every
 * quantiser agrees up to the first one that differs, and there the differences are a few values, each one
 * quantisation step, each from a float that sits on a rounding boundary and agrees between the engines far below a
 * step; the fp32 U-Net on the same feeds agrees to 1e-5. And the WASM INT8 image is as close to the fp32 image as
 * the float QDQ reference is.
 */
import assert from "node:assert/strict";
import { readFileSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { after, describe, test } from "node:test";
import * as ort from "onnxruntime-web";
import { Pipeline } from "../src/index.js";
import { folder, maxAbs } from "./references.js";

const index = folder ? JSON.parse(readFileSync(join(folder, "index.json"), "utf8")) : {};
const results = { calls: [], psnr_db: {} };

const bytes = (file) => readFileSync(join(folder, file));
const floats = (entry) => {
  const b = bytes(entry.file ?? entry);
  return new Float32Array(b.buffer, b.byteOffset, b.byteLength / 4).slice();
};
const integers = (file, dtype) => {
  const b = bytes(file);
  return dtype === "int8" ? new Int8Array(b.buffer, b.byteOffset, b.byteLength) : new Uint8Array(b.buffer, b.byteOffset, b.byteLength);
};
/** PSNR in dB of images in [0, 1] (peak 1), as tests/helpers.image_psnr. */
const psnr = (a, b) => {
  let squares = 0;
  for (let i = 0; i < a.length; i++) squares += (a[i] - b[i]) ** 2;
  return 10 * Math.log10(1 / (squares / a.length));
};
/** How far x / scale is from the nearest rounding boundary (k + 0.5), in quantisation steps. */
const fromBoundary = (x, scale) => {
  const t = x / scale;
  return Math.abs(t - Math.floor(t) - 0.5);
};

const FLIPPED_FRACTION = 0.01; // of a quantiser's values
const BOUNDARY_STEPS = 1e-3; // a flipped value's distance to the rounding boundary, in steps
const FLOAT_STEPS = 1e-3; // the engines' float inputs of a quantiser apart, in steps
const FP32_TOLERANCE = 1e-5;
const PSNR_MARGIN_DB = 1;

describe("INT8 on WASM against the Python runtime", { skip: index.int8 ? false : "LCM_EDGE_REFERENCES is not set (pytest tests/js sets it)" }, () => {
  const probe = index.int8;
  after(() => writeFileSync(join(folder, "int8-results.json"), JSON.stringify(results, null, 1)));

  test("one U-Net call with Python's feeds differs only where a float on a rounding boundary tips a quantiser", async () => {
    ort.env.wasm.numThreads = 1;
    const open = (model, level) => ort.InferenceSession.create(model, { executionProviders: ["wasm"], graphOptimizationLevel: level });
    const session = await open(bytes(probe.model), "disabled");
    const fp32 = await open(readFileSync(join(index.cases.find((c) => c.name === "lcm").bundle, "unet", "model.onnx")), "all");
    for (const [number, call] of probe.calls.entries()) {
      const feeds = {};
      for (const [name, entry] of Object.entries(call.feeds)) feeds[name] = new ort.Tensor("float32", floats(entry), entry.shape);
      const fp32Difference = maxAbs((await fp32.run(feeds)).out_sample.data, floats(call.fp32_out));
      assert.ok(fp32Difference <= FP32_TOLERANCE, `call ${number}: fp32 U-Net max abs ${fp32Difference}`);
      const outputs = await session.run(feeds);
      const report = { call: number, fp32_max_abs: fp32Difference, quantizers_differing: 0, first: null };
      probe.quantizers.forEach((quantizer, k) => {
        const reference = call.quantizers[k];
        const python = integers(reference.file, reference.dtype);
        const wasm = outputs[quantizer.output].data;
        assert.equal(wasm.length, python.length);
        const flipped = [];
        for (let i = 0; i < wasm.length; i++) if (wasm[i] !== python[i]) flipped.push(i);
        if (!flipped.length) return;
        report.quantizers_differing += 1;
        if (report.first) return; // past the first difference the flips propagate: nothing more to prove there
        const pythonInput = floats(reference.input);
        const wasmInput = outputs[quantizer.input].data;
        const steps = Math.max(...flipped.map((i) => Math.abs(wasm[i] - python[i])));
        const boundary = Math.max(...flipped.flatMap((i) => [fromBoundary(pythonInput[i], quantizer.scale), fromBoundary(wasmInput[i], quantizer.scale)]));
        const apart = maxAbs(wasmInput, pythonInput) / quantizer.scale;
        report.first = { quantizer: quantizer.output, flipped: flipped.length, of: wasm.length, steps, boundary_steps: boundary, float_apart_steps: apart };
        const where = `call ${number}, ${quantizer.output}`;
        assert.ok(flipped.length <= FLIPPED_FRACTION * wasm.length, `${where}: ${flipped.length} of ${wasm.length} values differ`);
        assert.equal(steps, 1, `${where}: a value differs by ${steps} quantisation steps`);
        assert.ok(boundary <= BOUNDARY_STEPS, `${where}: a differing value is ${boundary} steps from a rounding boundary`);
        assert.ok(apart <= FLOAT_STEPS, `${where}: the float inputs are ${apart} steps apart`);
      });
      const qdqDifference = maxAbs(outputs.out_sample.data, floats(call.qdq_out));
      report.qdq_out_max_abs = qdqDifference;
      if (!report.first) assert.ok(qdqDifference <= FP32_TOLERANCE, `call ${number}: every quantiser equal, yet the output is ${qdqDifference} off`);
      results.calls.push(report);
    }
  });

  test("the WASM INT8 image is as close to the fp32 image as the float QDQ reference", async () => {
    const c = index.cases.find((entry) => entry.name === "int8");
    const pipe = await Pipeline.load(c.bundle, { backend: "wasm", verify: "cached" });
    assert.equal(pipe.variants.unet.variant.precision, "int8");
    const wasm = (await pipe.generate(c.prompt, { numInferenceSteps: c.steps, seed: Number(c.seed) })).images[0].data;
    const fp32 = floats(probe.images.fp32);
    const reference = floats(probe.images.reference);
    const fused = floats(probe.images.fused);
    Object.assign(results.psnr_db, {
      wasm_vs_fp32: psnr(wasm, fp32),
      float_qdq_reference_vs_fp32: psnr(reference, fp32),
      python_fused_kernels_vs_fp32: psnr(fused, fp32),
      wasm_vs_float_qdq_reference: psnr(wasm, reference),
    });
    results.max_abs = { wasm_vs_float_qdq_reference: maxAbs(wasm, reference), wasm_vs_python_fused: maxAbs(wasm, fused) };
    const gap = Math.abs(results.psnr_db.wasm_vs_fp32 - results.psnr_db.float_qdq_reference_vs_fp32);
    assert.ok(gap <= PSNR_MARGIN_DB, `PSNR vs fp32: WASM ${results.psnr_db.wasm_vs_fp32} dB, float QDQ reference ${results.psnr_db.float_qdq_reference_vs_fp32} dB`);
  });
});
