/**
 * The frame loop: frames in, styled frames out, in order (`pipe.stream(prompt, …)` makes one). The Python
 * runtime's FrameStream (lcm_export/runtime/stream.py) in the JS runtime, on the pipeline's shared stages
 * (encodeText, conditioningFeeds, encodeImage, predict, step, decode), as text-to-image and image-to-image.
 *
 * It draws its random tensors once, in image-to-image's order (bundle-format.md, "Draw order": ε_s for a KL VAE,
 * ε_i, then z_0 … z_{N−2}, each (1, C, h, w)), and uses them for every frame: a still input gives a still output, and
 * its first frame equals `img2img` of that frame with the same seed. With `batchSteps` (StreamDiffusion's step
 * batching) N frames are in flight and each U-Net call holds the newest at its first step, the one before at its
 * second, and so on; a frame comes out N − 1 pushes later.
 * @module
 */

import { UserError } from "./errors.js";
import { PhiloxGenerator } from "./philox.js";
import { checkFinite, repeatText } from "./pipeline.js";

const now = () => globalThis.performance.now();

/**
 * @typedef {import("./pipeline.js").Image} Image
 *
 * @typedef {object} StreamOptions
 * @property {number} [strength]          default 0.5: which image-to-image table (bundle's strengths)
 * @property {number} [numInferenceSteps] default 4
 * @property {number} [guidanceScale]     default: the bundle's
 * @property {string} [negativePrompt]
 * @property {number | bigint} [seed]     the draws every frame shares (default: a fresh one, see `stream.seed`)
 * @property {boolean} [batchSteps]       step batching; default off (on a CPU a batch of N rows costs nearly N calls)
 *
 * @typedef {object} CallTiming  milliseconds of one push (or flush step): the work done for the frames in flight
 * @property {number} [vae_encode]  the pushed frame's encode (pushes only)
 * @property {number} unet          the one U-Net call (every frame in flight, each at its own step)
 * @property {number} scheduler     the LCM steps of those frames
 * @property {number} [vae_decode]  the finished frame's decode (when one finished)
 * @property {number} total
 */

/** Whether frame loops batch steps by default: off, as the Python runtime's DEFAULT_BATCH_STEPS. */
export const DEFAULT_BATCH_STEPS = false;

/** A frame inside the loop: its latents before its next step, and when it came in. */
class InFlight {
  /** @param {Float32Array} latents (1, C, h, w) @param {number} arrived now() at the push */
  constructor(latents, arrived) {
    this.latents = latents;
    this.step = 0; // index of the next step in the table
    this.arrived = arrived;
  }
}

/**
 * Frames in, styled frames out, in order.
 *
 * `push(frame)` takes one frame ({width, height, data} as img2img takes) and resolves to the frame that has been
 * through every step, or null while a step-batched stream fills (its first N − 1 pushes); `flush()` resolves to
 * the frames still in flight; `run(frames)` does both (an async generator). Without step batching every push
 * resolves to its own frame, and `process(frame)` is that push.
 *
 * `latencies`: milliseconds from each output frame's push to its output, in output order. `callTimings`: the
 * milliseconds of each push and flush step, per stage (frames per second: frames out over the sum of `total`).
 */
export class FrameStream {
  /**
   * Made by `Pipeline.stream`; the prompt is encoded there, once.
   * @param {import("./pipeline.js").Pipeline} pipeline
   * @param {object} request  the pipeline's checked request (one prompt, one image)
   * @param {object} text     the request's text conditioning (encodeText)
   * @param {boolean} batchSteps
   */
  constructor(pipeline, request, text, batchSteps) {
    this.pipeline = pipeline;
    this.request = request;
    this.text = text;
    this.batchSteps = batchSteps;
    this.table = request.table;
    /** the denoising steps each frame runs (the strength's table) */
    this.steps = request.table.timesteps.length;
    /** the seed the draws came from */
    this.seed = request.seed;
    /** @type {[number, number] | null} [height, width], fixed by the first frame */
    this.size = null;
    /** @type {number[] | null} one frame's latent shape [1, C, h, w], fixed by the first frame */
    this.shape = null;
    /** @type {{sampleNoise: Float32Array | null, imageNoise: Float32Array, noise: Float32Array[]} | null} */
    this.draws = null;
    /** @type {InFlight[]} the newest frame first */
    this.inFlight = [];
    this.framesIn = 0;
    /** @type {number[]} */
    this.latencies = [];
    /** @type {CallTiming[]} */
    this.callTimings = [];
    /** @type {Map<number, object>} U-Net rows -> conditioning feeds */
    this.feeds = new Map();
    /** the pipeline's weights the text was encoded on (run-time adapters: encoded again after a swap) */
    this.textWeights = pipeline.weightsVersion;
  }

  /** Frames pushed whose steps are not all done (0 between pushes without step batching). */
  get framesInFlight() {
    return this.inFlight.length;
  }

  /** @private: after a weight swap (setAdapters) the prompt encoded again and the feeds rebuilt */
  async followWeights() {
    if (this.pipeline.weightsVersion === this.textWeights) return;
    if (this.inFlight.length) {
      throw new UserError(`the pipeline's adapters changed while ${this.inFlight.length} frame(s) of this stream were in flight: flush() a step-batched stream before setAdapters`);
    }
    this.text = await this.pipeline.encodeText(this.request, {});
    this.textWeights = this.pipeline.weightsVersion;
    this.feeds.clear();
  }

  /** Frames out per second of work (pushes and flush steps), 0 before the first frame comes out. */
  get framesPerSecond() {
    const spent = this.callTimings.reduce((sum, t) => sum + t.total, 0);
    return this.latencies.length && spent > 0 ? (1000 * this.latencies.length) / spent : 0;
  }

  /**
   * One frame in, the same frame styled out: the unbatched loop only (a step-batched one returns frames later:
   * use push and flush).
   * @param {Image} frame
   * @returns {Promise<Image>}
   */
  async process(frame) {
    if (this.batchSteps) throw new UserError("this stream batches steps (frames come out later): call push(frame) and flush()");
    return /** @type {Promise<Image>} */ (this.push(frame));
  }

  /**
   * One frame in; the oldest frame in flight out once it has run every step (null while filling).
   * @param {Image} frame
   * @returns {Promise<Image | null>}
   */
  async push(frame) {
    return this.pipeline.guarded(() => this.pushOnOneWeightSet(frame));
  }

  /** @private: push as one call of the pipeline (setAdapters waits for it) */
  async pushOnOneWeightSet(frame) {
    await this.followWeights();
    const start = now();
    const timing = /** @type {CallTiming} */ ({});
    const latents = await this.encode(frame, timing);
    this.inFlight.unshift(new InFlight(latents, start));
    this.framesIn += 1;
    let image = await this.advance(timing);
    while (image === null && !this.batchSteps) image = await this.advance(timing); // unbatched: all steps now
    timing.total = now() - start;
    this.callTimings.push(timing);
    return image;
  }

  /**
   * The frames still in flight, each after its remaining steps, oldest first (none without step batching).
   * @returns {Promise<Image[]>}
   */
  async flush() {
    const images = [];
    while (this.inFlight.length) {
      const start = now();
      const timing = /** @type {CallTiming} */ ({});
      const image = await this.pipeline.guarded(async () => {
        await this.followWeights();
        return this.advance(timing);
      });
      if (image !== null) images.push(image);
      timing.total = now() - start;
      this.callTimings.push(timing);
    }
    return images;
  }

  /**
   * Every frame of `frames` styled, in order, one output per input (flushed at the end).
   * @param {Iterable<Image> | AsyncIterable<Image>} frames
   * @returns {AsyncGenerator<Image>}
   */
  async *run(frames) {
    for await (const frame of frames) {
      const image = await this.push(frame);
      if (image !== null) yield image;
    }
    yield* await this.flush();
  }

  /** @private: the frame's latents at the first step (1, C, h, w); the first frame fixes the size and the draws */
  async encode(frame, timing) {
    const pipe = this.pipeline;
    const p = pipe.manifest.pipeline;
    const { width, height } = pipe.checkImage(frame, `frame ${this.framesIn + 1}`);
    const shape = [1, p.latent_channels, height / p.vae_scale_factor, width / p.vae_scale_factor];
    if (this.size === null) {
      const size = shape.reduce((a, b) => a * b, 1);
      const generator = new PhiloxGenerator(this.request.seed);
      const sampleNoise = p.vae === "autoencoder_tiny" ? null : generator.standardNormal(size);
      const imageNoise = generator.standardNormal(size);
      const noise = Array.from({ length: this.steps - 1 }, () => generator.standardNormal(size));
      this.draws = { sampleNoise, imageNoise, noise };
      this.size = [height, width];
      this.shape = shape;
    } else if (height !== this.size[0] || width !== this.size[1]) {
      throw new UserError(`frame ${this.framesIn + 1} is ${width}x${height} but the stream started at ${this.size[1]}x${this.size[0]}: pass frames of one size (start a new stream for another)`);
    }
    const mark = now();
    const draws = /** @type {NonNullable<FrameStream["draws"]>} */ (this.draws);
    const latents = await pipe.encodeImage(frame, 1, this.table, draws.sampleNoise, draws.imageNoise, shape);
    timing.vae_encode = now() - mark;
    return latents;
  }

  /**
   * @private: one U-Net call over every frame in flight, each at its own step (one row each; the unconditional
   * half too with CFG), then each frame's LCM step; resolves to the frame that ran its last step, decoded, if any.
   */
  async advance(timing) {
    const pipe = this.pipeline;
    const rows = this.inFlight;
    const shape = /** @type {number[]} */ (this.shape);
    const draws = /** @type {NonNullable<FrameStream["draws"]>} */ (this.draws);
    const plane = shape[1] * shape[2] * shape[3];
    const latents = rows.length === 1 ? rows[0].latents : new Float32Array(rows.length * plane); // (R, C, h, w)
    if (rows.length > 1) rows.forEach((row, r) => latents.set(row.latents, r * plane));
    const timesteps = rows.map((row) => this.table.timesteps[row.step]);
    let mark = now();
    const prediction = await pipe.predict(this.request, this.feedsFor(rows.length), latents, timesteps, [rows.length, ...shape.slice(1)]);
    timing.unet = (timing.unet ?? 0) + now() - mark;
    checkFinite(prediction, `the U-Net at step ${rows.map((row) => row.step + 1).join(", ")} (timestep ${timesteps.join(", ")})`);
    mark = now();
    /** @type {[number, Float32Array] | null} */
    let finished = null;
    rows.forEach((row, index) => {
      const noise = row.step < this.steps - 1 ? draws.noise[row.step] : null;
      const own = prediction.subarray(index * plane, (index + 1) * plane);
      const { x, denoised } = pipe.step(this.table, row.step, own, row.latents, noise, shape);
      row.latents = x;
      row.step += 1;
      if (row.step === this.steps) finished = [index, denoised];
    });
    timing.scheduler = (timing.scheduler ?? 0) + now() - mark;
    if (finished === null) return null;
    const [index, denoised] = finished;
    const [row] = rows.splice(index, 1); // the oldest: every push adds one at step 0 and every call moves all by one
    checkFinite(denoised, `the LCM step at step ${this.steps}`);
    const decodeTimings = {};
    const [image] = await pipe.decode(denoised, shape, decodeTimings);
    timing.vae_decode = decodeTimings.vae_decode;
    this.latencies.push(now() - row.arrived);
    return image;
  }

  /** @private: the conditioning feeds of a `rows`-row U-Net call, built once per row count */
  feedsFor(rows) {
    if (!this.feeds.has(rows)) {
      const [height, width] = /** @type {[number, number]} */ (this.size);
      this.feeds.set(rows, this.pipeline.conditioningFeeds(this.request, repeatText(this.text, rows), height, width));
    }
    return this.feeds.get(rows);
  }
}
