/**
 * Run-time adapters against the Python runtime (references written by tests/js/test_node_runtime.py into
 * $LCM_EDGE_REFERENCES): the image with an adapter equals Python's on onnxruntime-node and WASM, fp32 and INT8;
 * A -> base -> A gives each one's image exactly; an adapter made for another bundle is an AdapterError naming it.
 */
import assert from "node:assert/strict";
import { readFileSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { after, describe, test } from "node:test";
import { AdapterError, Pipeline } from "../src/index.js";
import { folder, read, maxAbs } from "./references.js";

const TOLERANCE = 1e-4;
const results = {};

const image = async (pipe, c) => (await pipe.generate("a cat", { numInferenceSteps: c.steps, seed: c.seed })).images[0].data;

describe("run-time adapters against the Python runtime", { skip: folder ? false : "LCM_EDGE_REFERENCES is not set (pytest tests/js sets it)" }, () => {
  const index = folder ? JSON.parse(readFileSync(join(folder, "index.json"), "utf8")) : { adapters: [] };
  after(() => writeFileSync(join(folder, "adapters-results.json"), JSON.stringify(results, null, 1)));

  for (const backend of ["node", "wasm"]) {
    test(`an adapter gives Python's image on ${backend}; A -> base -> A is exact`, async () => {
      for (const c of index.adapters) {
        const tolerance = c.tolerance?.[backend] ?? TOLERANCE;
        const expected = read(c.expected);
        const base = read(c.base);
        assert.ok(maxAbs(expected, base) > 1e-2, `${c.name}: the adapter changes the image (the check can fail)`);
        const pipe = await Pipeline.load(c.bundle, { backend, precision: c.name, adapters: { [c.adapter]: c.weight } });
        assert.deepEqual(pipe.adapters, { [c.adapter]: c.weight });
        const adapted = await image(pipe, c);
        const difference = maxAbs(adapted, expected);
        results[`${backend}/${c.name}`] = difference;
        assert.ok(difference <= tolerance, `${backend}/${c.name}: max abs ${difference} against Python's`);
        await pipe.setAdapters({});
        const plain = await image(pipe, c);
        results[`${backend}/${c.name}/base`] = maxAbs(plain, base);
        assert.ok(maxAbs(plain, base) <= tolerance, `${backend}/${c.name}: the base image after {}`);
        await pipe.setAdapters({ [c.adapter]: c.weight });
        assert.equal(maxAbs(await image(pipe, c), adapted), 0, `${backend}/${c.name}: A -> base -> A`);
      }
    });
  }

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
