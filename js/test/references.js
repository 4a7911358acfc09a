/**
 * What the tests that read the Python runtime's references share (no tests here): the references folder that
 * pytest's tests/js/test_node_runtime.py writes (LCM_EDGE_REFERENCES), reading its float32 files, the max abs
 * difference of two arrays, and a seed as written in index.json.
 * @module
 */

import assert from "node:assert/strict";
import { readFileSync } from "node:fs";
import { join } from "node:path";

/** The references folder, or undefined outside pytest (the tests then skip). */
export const folder = process.env.LCM_EDGE_REFERENCES;

/** One float32 file of the folder (an index.json entry: {file, shape}). */
export const read = (entry) => {
  const bytes = readFileSync(join(folder, entry.file));
  return new Float32Array(bytes.buffer, bytes.byteOffset, bytes.byteLength / 4).slice();
};

/** The largest |a[i] - b[i]|; the lengths must be equal. */
export const maxAbs = (a, b) => {
  assert.equal(a.length, b.length);
  let worst = 0;
  for (let i = 0; i < a.length; i++) worst = Math.max(worst, Math.abs(a[i] - b[i]));
  return worst;
};

/** A seed written as decimal text: a number where it is exact, else a bigint. */
export const seedOf = (text) => (BigInt(text) <= BigInt(Number.MAX_SAFE_INTEGER) ? Number(text) : BigInt(text));
