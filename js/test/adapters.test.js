/**
 * Run-time adapters against the Python runtime (references written by tests/js/test_node_runtime.py into
 * $LCM_EDGE_REFERENCES): the image with an adapter equals Python's on onnxruntime-node and WASM, fp32 (weights fed
 * as inputs, and rebuilt) and INT8 (rebuilt); A -> base -> A gives each one's image exactly; in "inputs" mode a
 * switch keeps the one open session; an adapter made for another bundle, a bad adapterMode: one error naming it.
 */
import assert from "node:assert/strict";
import { cpSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, describe, test } from "node:test";
import { AdapterError, BundleError, Pipeline, UserError } from "../src/index.js";
import { folder, read, maxAbs } from "./references.js";

const TOLERANCE = 1e-4;
const results = {};

const image = async (pipe, c) => (await pipe.generate("a cat", { numInferenceSteps: c.steps, seed: c.seed })).images[0].data;
/**
 * The adapter modes each case runs in, and how each component then runs its adapters: a float variant's weights fed
 * as inputs ("auto" on fp32 and fp16) or rebuilt; the INT8 bundle's U-Net rebuilt, its fp32 text encoder as inputs.
 */
const MODES = {
  fp32: { auto: { text_encoder: "inputs", unet: "inputs" }, rebuild: { text_encoder: "rebuild", unet: "rebuild" } },
  int8: { auto: { text_encoder: "inputs", unet: "rebuild" } },
  fp16: { auto: { text_encoder: "inputs", unet: "inputs" }, rebuild: { text_encoder: "rebuild", unet: "rebuild" } },
};

describe("run-time adapters against the Python runtime", { skip: folder ? false : "LCM_EDGE_REFERENCES is not set (pytest tests/js sets it)" }, () => {
  const index = folder ? JSON.parse(readFileSync(join(folder, "index.json"), "utf8")) : { adapters: [] };
  after(() => writeFileSync(join(folder, "adapters-results.json"), JSON.stringify(results, null, 1)));

  for (const backend of ["node", "wasm"]) {
    test(`an adapter gives Python's image on ${backend}, as inputs and rebuilt; A -> base -> A is exact`, async () => {
      for (const c of index.adapters) {
        for (const [adapterMode, modes] of Object.entries(MODES[c.name])) {
          const label = `${backend}/${c.name}/${adapterMode}`;
          const tolerance = c.tolerance?.[backend] ?? TOLERANCE;
          const expected = read(c.expected);
          const base = read(c.base);
          assert.ok(maxAbs(expected, base) > 1e-2, `${c.name}: the adapter changes the image (the check can fail)`);
          const pipe = await Pipeline.load(c.bundle, { backend, precision: c.name, adapterMode, adapters: { [c.adapter]: c.weight } });
          assert.deepEqual(pipe.adapters, { [c.adapter]: c.weight });
          assert.deepEqual(pipe.adapterModes, modes, label);
          results[`${label}/modes`] = pipe.adapterModes;
          const adapted = await image(pipe, c);
          const difference = maxAbs(adapted, expected);
          results[label] = difference;
          assert.ok(difference <= tolerance, `${label}: max abs ${difference} against Python's`);
          await pipe.setAdapters({});
          assert.deepEqual(pipe.adapterModes, {});
          const plain = await image(pipe, c);
          results[`${label}/base`] = maxAbs(plain, base);
          assert.ok(maxAbs(plain, base) <= tolerance, `${label}: the base image after {}`);
          await pipe.setAdapters({ [c.adapter]: c.weight });
          assert.equal(maxAbs(await image(pipe, c), adapted), 0, `${label}: A -> base -> A`);
        }
      }
    });
  }

  test("adapterMode inputs: a switch keeps the one open session; back to the base reopens the component's own", async () => {
    const c = index.adapters.find((entry) => entry.name === "fp32");
    const options = { backend: "node", precision: c.name };
    const pipe = await Pipeline.load(c.bundle, { ...options, adapterMode: "inputs", adapters: { [c.adapter]: c.weight } });
    assert.deepEqual(pipe.adapterModes, { text_encoder: "inputs", unet: "inputs" });
    const graphs = { unet: pipe.sessions.unet, text_encoder: pipe.sessions.text_encoder };
    for (const [name, session] of Object.entries(graphs)) {
      // the weight-inputs graph: its mapped weights are inputs beside the component's own
      assert.ok(session.inputNames.length > pipe.manifest.components[name].inputs.length, `${name}: a weight-inputs session`);
    }
    const first = await image(pipe, c);
    await pipe.setAdapters({ [c.adapter]: 0.3 });
    assert.equal(pipe.sessions.unet, graphs.unet, "the same U-Net session after a switch");
    assert.equal(pipe.sessions.text_encoder, graphs.text_encoder, "the same text encoder session after a switch");
    const low = await image(pipe, c);
    assert.ok(maxAbs(low, first) > 1e-3, "another weight gives another image on the same session");
    // the same weights rebuilt into a session of their own give the same image
    const rebuilt = await Pipeline.load(c.bundle, { ...options, adapterMode: "rebuild", adapters: { [c.adapter]: 0.3 } });
    assert.deepEqual(rebuilt.adapterModes, { text_encoder: "rebuild", unet: "rebuild" });
    results["inputs/0.3-against-rebuild"] = maxAbs(low, await image(rebuilt, c));
    assert.ok(results["inputs/0.3-against-rebuild"] <= TOLERANCE, `inputs against rebuild at 0.3: ${results["inputs/0.3-against-rebuild"]}`);
    await pipe.setAdapters({});
    assert.notEqual(pipe.sessions.unet, graphs.unet, "the base runs the U-Net's own session");
    assert.deepEqual(pipe.adapterModes, {});
    assert.ok(maxAbs(await image(pipe, c), read(c.base)) <= TOLERANCE, "the base image after {}");
    await pipe.setAdapters({ [c.adapter]: c.weight });
    assert.equal(pipe.sessions.unet, graphs.unet, "the weight-inputs session was kept through the base");
    assert.equal(maxAbs(await image(pipe, c), first), 0, "A -> 0.3 -> base -> A");
  });

  test("a weight-inputs graph is verified before it opens: a changed byte is a BundleError naming it", async () => {
    const c = index.adapters.find((entry) => entry.name === "fp32");
    const copy = join(mkdtempSync(join(tmpdir(), "lcm-edge-test-")), "bundle");
    try {
      cpSync(c.bundle, copy, { recursive: true });
      const graph = join(copy, "unet", "model.weight-inputs.onnx");
      const bytes = readFileSync(graph);
      bytes[bytes.length >> 1] ^= 1;
      writeFileSync(graph, bytes);
      const pipe = await Pipeline.load(copy, { backend: "node", precision: c.name, verify: "full" }); // not opened yet
      await assert.rejects(
        pipe.setAdapters({ [c.adapter]: c.weight }),
        (error) => error instanceof BundleError && /unet\/model\.weight-inputs\.onnx has sha256 .*the file is modified or corrupted$/.test(error.message),
      );
      assert.deepEqual(pipe.adapters, {});
      assert.deepEqual(pipe.adapterModes, {});
    } finally {
      rmSync(join(copy, ".."), { recursive: true, force: true });
    }
  });

  test("a bad adapterMode, adapterMode inputs on an INT8 variant: one line each", async () => {
    const c = index.adapters.find((entry) => entry.name === "fp32");
    for (const adapterMode of ["merge", "", null, 1]) {
      await assert.rejects(
        Pipeline.load(c.bundle, { backend: "node", adapterMode }),
        (error) => error instanceof UserError && error.message === `adapterMode=${JSON.stringify(adapterMode)}: pick one of auto, inputs, rebuild`,
      );
    }
    const int8 = index.adapters.find((entry) => entry.name === "int8");
    await assert.rejects(
      Pipeline.load(int8.bundle, { backend: "node", precision: "int8", adapterMode: "inputs", adapters: { [int8.adapter]: int8.weight } }),
      (error) => error instanceof AdapterError && /^adapterMode="inputs": the unet runs an int8 variant: load with precision "fp32", or pass adapterMode "auto"$/.test(error.message),
    );
  });

  test("the frame loop switches between frames only; a batched stream with frames in flight refuses", async () => {
    const c = index.adapters[0];
    const options = { strength: 0.5, numInferenceSteps: 4, seed: 3 };
    const adapted = await Pipeline.load(c.bundle, { backend: "node", precision: c.name, adapters: { [c.adapter]: c.weight } });
    const { default_height: height, default_width: width } = adapted.manifest.pipeline;
    const frames = [1, 2].map((k) => ({ width, height, data: Float32Array.from({ length: height * width * 3 }, (_, i) => ((i * 7 + k * 13) % 17) / 16) }));
    const expected = (await (await adapted.stream("a cat", options)).process(frames[1])).data;
    const pipe = await Pipeline.load(c.bundle, { backend: "node", precision: c.name });
    const plain = (await (await pipe.stream("a cat", options)).process(frames[1])).data;
    assert.ok(maxAbs(expected, plain) > 1e-2, "the adapter changes the frame (the check can fail)");
    const stream = await pipe.stream("a cat", options);
    await stream.process(frames[0]);
    await pipe.setAdapters({ [c.adapter]: c.weight });
    results["stream/switched"] = maxAbs((await stream.process(frames[1])).data, expected);
    assert.ok(results["stream/switched"] <= TOLERANCE, `the frame after a switch: max abs ${results["stream/switched"]}`);
    await pipe.setAdapters({});
    assert.equal(maxAbs((await stream.process(frames[1])).data, plain), 0, "back to the base");
    const batched = await pipe.stream("a cat", { ...options, batchSteps: true });
    assert.equal(await batched.push(frames[0]), null);
    await assert.rejects(pipe.setAdapters({ [c.adapter]: c.weight }), (error) => error instanceof AdapterError && /^setAdapters: 1 frame\(s\) of a step-batched stream are in flight/.test(error.message));
    assert.deepEqual(pipe.adapters, {});
    assert.equal((await batched.flush()).length, 1);
    await pipe.setAdapters({ [c.adapter]: c.weight });
    assert.deepEqual(pipe.adapters, { [c.adapter]: c.weight });
  });

  test("an adapter made for another bundle, a bad weight: one AdapterError naming the file", async () => {
    const c = index.adapters[0];
    await assert.rejects(
      Pipeline.load(index.adapters_other_bundle, { backend: "node", adapters: { [c.adapter]: 1 } }),
      (error) => error instanceof AdapterError && error.message.startsWith(`adapter '${c.adapter}' was made for another bundle (its `),
    );
    const pipe = await Pipeline.load(c.bundle, { backend: "node", precision: c.name });
    for (const weight of [NaN, Infinity, "0.5", true]) {
      await assert.rejects(pipe.setAdapters({ [c.adapter]: weight }), (error) => error instanceof AdapterError && /is not a finite number: pass e\.g\. 0\.8$/.test(error.message));
    }
    await assert.rejects(pipe.setAdapters([c.adapter]), (error) => error instanceof AdapterError && /pass an object/.test(error.message));
    await assert.rejects(pipe.setAdapters({ [join(folder, "index.json")]: 1 }), (error) => error instanceof AdapterError && /is not a safetensors file/.test(error.message));
    assert.deepEqual(pipe.adapters, {});
  });
});
