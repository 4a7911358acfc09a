/**
 * The JavaScript runtime against the Python runtime's references (written by tests/js/test_node_runtime.py into
 * $LCM_EDGE_REFERENCES): images on onnxruntime-node and WASM (ControlNet bundles too), the shared generator, tokenizer
 * ids, bad bundles, bad control images.
 */
import assert from "node:assert/strict";
import { readFileSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { after, describe, test } from "node:test";
import { Pipeline, PromptTokenizer, standardNormal } from "../src/index.js";
import { folder, read, maxAbs, seedOf } from "./references.js";

const TOLERANCE = 1e-4;
const results = { images: {}, draws: {}, tokenizers: {}, bad_bundles: {}, control_errors: {}, timings_ms: {} };


describe("against the Python runtime", { skip: folder ? false : "LCM_EDGE_REFERENCES is not set (pytest tests/js sets it)" }, () => {
  const index = folder ? JSON.parse(readFileSync(join(folder, "index.json"), "utf8")) : { cases: [] };
  after(() => writeFileSync(join(folder, "results.json"), JSON.stringify(results, null, 1)));

  test("the shared generator draws Python's tensors", () => {
    for (const entry of index.draws) {
      const js = standardNormal(seedOf(entry.seed), entry.tensor, entry.shape[0]);
      const difference = maxAbs(js, read(entry));
      results.draws[`${entry.seed}/${entry.tensor}`] = difference;
      assert.ok(difference <= 1e-5, `seed ${entry.seed} tensor ${entry.tensor}: max abs ${difference}`);
    }
  });

  test("tokenizer ids equal Python's", () => {
    for (const entry of index.tokenizers) {
      const tokenizer = new PromptTokenizer(JSON.parse(readFileSync(entry.path, "utf8")), entry);
      let equal = 0;
      entry.prompts.forEach((prompt, row) => {
        const ids = tokenizer.encodeOne(prompt);
        if (JSON.stringify(ids) === JSON.stringify(entry.ids[row])) equal++;
        else assert.deepEqual(ids, entry.ids[row], `prompt ${JSON.stringify(prompt)} (${entry.path})`);
      });
      results.tokenizers[entry.path] = `${equal}/${entry.prompts.length}`;
    }
  });

  for (const backend of ["node", "wasm"]) {
    test(`images equal Python's on ${backend}`, async () => {
      const pipes = new Map();
      for (const c of index.cases) {
        if (c.backends && !c.backends.includes(backend)) continue; // INT8 on WASM: int8.test.js
        if (!pipes.has(c.bundle)) pipes.set(c.bundle, await Pipeline.load(c.bundle, { backend, verify: "cached" }));
        const pipe = pipes.get(c.bundle);
        assert.equal(pipe.backend, backend);
        const options = { numInferenceSteps: c.steps, guidanceScale: c.guidance };
        if (c.seed !== undefined) options.seed = seedOf(c.seed);
        if (c.latents) options.latents = read(c.latents);
        if (c.noise) options.noise = c.noise.map(read);
        if (c.sampleNoise) options.sampleNoise = read(c.sampleNoise);
        if (c.imageNoise) options.imageNoise = read(c.imageNoise);
        if (c.control) {
          options.controlImage = c.control.images.map((entry) => ({ width: entry.shape[1], height: entry.shape[0], data: read(entry) }));
          if (c.control.scale !== undefined) options.controlnetConditioningScale = c.control.scale;
          if (c.control.start !== undefined) options.controlGuidanceStart = c.control.start;
          if (c.control.end !== undefined) options.controlGuidanceEnd = c.control.end;
        }
        const expected = read(c.expected);
        const [, height, width] = c.expected.shape;
        let out;
        if (c.mode === "txt2img") out = await pipe.generate(c.prompt, options);
        else {
          const image = { width: c.image.shape[1], height: c.image.shape[0], data: read(c.image) };
          out = await pipe.img2img(image, c.prompt, { ...options, strength: c.strength });
        }
        assert.equal(out.images.length, 1);
        assert.equal(out.images[0].width, width);
        assert.equal(out.images[0].height, height);
        const difference = maxAbs(out.images[0].data, expected);
        results.images[`${c.name}/${backend}`] = difference;
        results.timings_ms[`${c.name}/${backend}`] = Math.round(out.timings.total);
        const tolerance = c.tolerance?.[backend] ?? TOLERANCE;
        assert.ok(difference <= tolerance, `${c.name} on ${backend}: max abs ${difference} > ${tolerance}`);
      }
    });
  }

  test("bad control images give a UserError naming the input", async () => {
    for (const bad of index.control_errors ?? []) {
      const pipe = await Pipeline.load(bad.bundle, { backend: "node", verify: "size" });
      const size = bad.size ?? pipe.manifest.pipeline.default_height;
      const image = { width: size, height: size, data: new Float32Array(size * size * 3) };
      const controlImage = Array(bad.images).fill(image);
      await assert.rejects(pipe.generate("a cat", { controlImage, height: pipe.manifest.pipeline.default_height }), (error) => {
        results.control_errors[bad.match] = error.message;
        assert.equal(error.name, "UserError");
        assert.ok(error.message.includes(bad.match), `'${error.message}' does not say ${bad.match}`);
        return true;
      });
    }
  });

  test("bad bundles give an Error naming the file or field", async () => {
    for (const bad of index.bad_bundles) {
      await assert.rejects(
        async () => {
          const pipe = await Pipeline.load(bad.bundle, { backend: "node", verify: bad.verify });
          await pipe.generate("a cat", { height: bad.height });
        },
        (error) => {
          results.bad_bundles[bad.name] = error.message;
          assert.ok(error instanceof Error);
          assert.ok(error.message.includes(bad.match), `${bad.name}: '${error.message}' does not name ${bad.match}`);
          return true;
        },
      );
    }
  });
});
