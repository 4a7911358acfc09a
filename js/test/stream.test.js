/**
 * The frame loop (`pipe.stream`) against the Python runtime's FrameStream (references written by
 * tests/js/test_node_runtime.py into $LCM_EDGE_REFERENCES): the same seed gives the same frames, in the same order,
 * unbatched and step-batched, on onnxruntime-node and WASM; and the stream's own rules (first frame = img2img with
 * the same seed, one-line errors for bad input).
 */
import assert from "node:assert/strict";
import { readFileSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { after, describe, test } from "node:test";
import { FrameStream, Pipeline, UserError } from "../src/index.js";
import { folder, read, maxAbs, seedOf } from "./references.js";

const TOLERANCE = 1e-4;
const results = { frames: {}, calls: {} };

const imageOf = (entry) => ({ height: entry.shape[0], width: entry.shape[1], data: read(entry) });

describe("the frame loop against the Python runtime", { skip: folder ? false : "LCM_EDGE_REFERENCES is not set (pytest tests/js sets it)" }, () => {
  const index = folder ? JSON.parse(readFileSync(join(folder, "index.json"), "utf8")) : { streams: [] };
  after(() => writeFileSync(join(folder, "stream-results.json"), JSON.stringify(results, null, 1)));
  const pipes = new Map();
  const load = async (bundle, backend) => {
    const key = `${bundle}/${backend}`;
    if (!pipes.has(key)) pipes.set(key, await Pipeline.load(bundle, { backend, verify: "cached" }));
    return pipes.get(key);
  };

  for (const backend of ["node", "wasm"]) {
    test(`stream frames equal Python's on ${backend}`, async () => {
      for (const c of index.streams) {
        const pipe = await load(c.bundle, backend);
        const stream = await pipe.stream(c.prompt, {
          strength: c.strength,
          numInferenceSteps: c.steps,
          guidanceScale: c.guidance ?? undefined,
          seed: seedOf(c.seed),
          batchSteps: c.batchSteps,
        });
        assert.ok(stream instanceof FrameStream);
        assert.equal(stream.steps, c.stepsRun);
        const frames = c.frames.map(imageOf);
        const pushed = [];
        for (const frame of frames) pushed.push(await stream.push(frame));
        assert.deepEqual(pushed.map((image) => image !== null), c.pushedFrame, `${c.name}: which pushes returned a frame`);
        const outputs = [...pushed.filter((image) => image !== null), ...(await stream.flush())];
        assert.equal(outputs.length, c.expected.length);
        const differences = outputs.map((image, i) => maxAbs(image.data, read(c.expected[i])));
        results.frames[`${c.name}/${backend}`] = differences;
        const worst = Math.max(...differences);
        assert.ok(worst <= TOLERANCE, `${c.name} on ${backend}: frames max abs ${differences}`);
        // Per-frame timings: one latency per output frame, one call timing per push and per flush step.
        assert.equal(stream.latencies.length, frames.length);
        const calls = frames.length + (c.batchSteps ? c.stepsRun - 1 : 0);
        assert.equal(stream.callTimings.length, calls);
        for (const [i, timing] of stream.callTimings.entries()) {
          assert.ok(timing.unet > 0 && timing.scheduler >= 0 && timing.total >= timing.unet, JSON.stringify(timing));
          assert.equal("vae_encode" in timing, i < frames.length, `call ${i}: a push encodes, a flush step does not`);
        }
        assert.equal(stream.callTimings.filter((t) => "vae_decode" in t).length, frames.length);
        assert.ok(stream.framesPerSecond > 0);
        results.calls[`${c.name}/${backend}`] = stream.callTimings.map((t) => Math.round(t.total));
      }
    });
  }

  test("a stream's first frame equals img2img of it with the same seed; a still input gives still frames", async () => {
    const c = index.streams.find((s) => !s.batchSteps);
    const pipe = await load(c.bundle, "node");
    const options = { strength: c.strength, numInferenceSteps: c.steps, seed: seedOf(c.seed) };
    const stream = await pipe.stream(c.prompt, options);
    const frame = imageOf(c.frames[0]);
    const first = await stream.process(frame);
    const again = await stream.process(frame);
    const alone = (await pipe.img2img(frame, c.prompt, options)).images[0];
    assert.equal(maxAbs(first.data, alone.data), 0);
    assert.equal(maxAbs(again.data, first.data), 0);
    const other = await stream.process(imageOf(c.frames[1]));
    assert.ok(maxAbs(other.data, first.data) > 1e-2, "another frame gives another image");
  });

  test("bad stream input is a UserError saying what to do", async () => {
    const c = index.streams.find((s) => !s.batchSteps);
    const pipe = await load(c.bundle, "node");
    await assert.rejects(pipe.stream(c.prompt, { batchSteps: "yes" }), { name: "UserError", message: 'batchSteps="yes": pass true, false or undefined (the default, off)' });
    await assert.rejects(pipe.stream(["a cat", "a dog"]), { message: "stream() takes one prompt (a string): start one stream per prompt" });
    await assert.rejects(pipe.stream(c.prompt, { strength: 2 }), /strength=2: pass a number in \(0, 1\]/);
    const batched = await pipe.stream(c.prompt, { numInferenceSteps: 2, batchSteps: true });
    await assert.rejects(batched.process(imageOf(c.frames[0])), /batches steps .* call push\(frame\) and flush\(\)/);
    const frame = imageOf(c.frames[0]);
    assert.equal(await batched.push(frame), null);
    const big = { width: frame.width * 2, height: frame.height * 2, data: new Float32Array(frame.width * frame.height * 12) };
    await assert.rejects(batched.push(big), (error) => {
      assert.ok(error instanceof UserError);
      assert.equal(error.message, `frame 2 is ${big.width}x${big.height} but the stream started at ${frame.width}x${frame.height}: pass frames of one size (start a new stream for another)`);
      return true;
    });
    await assert.rejects(batched.push({ width: 8, height: 8, data: new Float32Array(3) }), /frame 2 must be \{width, height, data/);
    assert.equal(batched.framesIn, 1);
    assert.equal((await batched.flush()).length, 1, "the refused frames changed nothing");

    // A bundle exported before per-row timesteps declares a scalar timestep: batching is an error, the default
    // runs unbatched.
    const timestep = pipe.manifest.components.unet.inputs.find((t) => t.name === "timestep");
    const declared = timestep.shape;
    timestep.shape = [];
    try {
      await assert.rejects(pipe.stream(c.prompt, { batchSteps: true }), /takes one timestep for the whole batch .* re-export it, or pass batchSteps: false/);
      assert.equal((await pipe.stream(c.prompt)).batchSteps, false);
    } finally {
      timestep.shape = declared;
    }
  });
});
