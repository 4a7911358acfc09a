/**
 * The shared seeded generator: counter-based Philox4x32-10 and the Box–Muller transform
 * (docs/bundle-format.md, "The shared generator"). Tensor k of a seed is a pure function of (seed, k, size), so
 * every runtime draws the same tensors; the Python twin is lcm_export/runtime/philox.py.
 * @module
 */

import { UserError } from "./errors.js";

const M0 = 0xd2511f53;
const M1 = 0xcd9e8d57;
const W0 = 0x9e3779b9;
const W1 = 0xbb67ae85;
const TWO_POW_32 = 4294967296;
const SEED_LIMIT = 1n << 64n;

/**
 * The high 32 bits of the 64-bit product of two unsigned 32-bit words (the low half is Math.imul).
 * @param {number} a @param {number} b @returns {number}
 */
function mulhi32(a, b) {
  const al = a & 0xffff, ah = a >>> 16, bl = b & 0xffff, bh = b >>> 16;
  const ll = al * bl, lh = al * bh, hl = ah * bl, hh = ah * bh;
  const mid = (ll >>> 16) + (lh & 0xffff) + (hl & 0xffff);
  return (hh + (lh >>> 16) + (hl >>> 16) + Math.floor(mid / 65536)) >>> 0;
}

/**
 * Random123's philox4x32_R(rounds, counter, key): four unsigned 32-bit output words.
 * @param {number[]} counter four words @param {number[]} key two words @param {number} [rounds=10]
 * @returns {number[]}
 */
export function philox4x32(counter, key, rounds = 10) {
  let [c0, c1, c2, c3] = counter.map((word) => word >>> 0);
  let k0 = key[0] >>> 0, k1 = key[1] >>> 0;
  for (let round = 0; round < rounds; round++) {
    if (round > 0) {
      k0 = (k0 + W0) >>> 0;
      k1 = (k1 + W1) >>> 0;
    }
    const hi0 = mulhi32(M0, c0), lo0 = Math.imul(M0, c0) >>> 0;
    const hi1 = mulhi32(M1, c2), lo1 = Math.imul(M1, c2) >>> 0;
    [c0, c1, c2, c3] = [(hi1 ^ c1 ^ k0) >>> 0, lo1, (hi0 ^ c3 ^ k1) >>> 0, lo0];
  }
  return [c0, c1, c2, c3];
}

/**
 * A seed in [0, 2^64) as its key words; a Number must be a safe integer, larger seeds are BigInts.
 * @param {number | bigint} seed @returns {[number, number]}
 */
export function seedKey(seed) {
  let big;
  if (typeof seed === "bigint") big = seed;
  else if (typeof seed === "number" && Number.isSafeInteger(seed)) big = BigInt(seed);
  else throw new UserError(`seed=${String(seed)}: pass an integer in [0, 2**64) (a BigInt above 2**53)`);
  if (big < 0n || big >= SEED_LIMIT) throw new UserError(`seed=${String(seed)}: pass an integer in [0, 2**64)`);
  return [Number(big & 0xffffffffn), Number(big >> 32n)];
}

/**
 * Tensor `tensorIndex` (0-based, in the call's draw order) of `seed`: `size` float32 standard normals, row-major.
 * @param {number | bigint} seed @param {number} tensorIndex @param {number} size @returns {Float32Array}
 */
export function standardNormal(seed, tensorIndex, size) {
  const key = seedKey(seed);
  const out = new Float32Array(size);
  const blocks = Math.ceil(size / 4);
  for (let j = 0; j < blocks; j++) {
    const x = philox4x32([j % TWO_POW_32, tensorIndex, Math.floor(j / TWO_POW_32), 0], key);
    for (let pair = 0; pair < 2; pair++) {
      const base = 4 * j + 2 * pair;
      if (base >= size) break;
      const u1 = (x[2 * pair] + 1) / TWO_POW_32; // (0, 1]: the log stays finite
      const u2 = x[2 * pair + 1] / TWO_POW_32; // [0, 1)
      const radius = Math.sqrt(-2 * Math.log(u1));
      const angle = 2 * Math.PI * u2;
      out[base] = radius * Math.cos(angle);
      if (base + 1 < size) out[base + 1] = radius * Math.sin(angle);
    }
  }
  return out;
}

/** The draws of one call: each `standardNormal` is the next tensor index of the seed. */
export class PhiloxGenerator {
  /** @param {number | bigint} seed */
  constructor(seed) {
    seedKey(seed);
    this.seed = seed;
    this.tensorIndex = 0;
  }

  /** @param {number} size @returns {Float32Array} */
  standardNormal(size) {
    return standardNormal(this.seed, this.tensorIndex++, size);
  }

  /** Count a tensor the caller passed, so the following draws keep their indices. */
  skip() {
    this.tensorIndex++;
  }
}
