import assert from "node:assert/strict";
import { test } from "node:test";
import { PhiloxGenerator, philox4x32, standardNormal } from "../src/philox.js";

test("philox4x32-10 gives Random123's known answers", () => {
  const hex = (words) => words.map((w) => w.toString(16).padStart(8, "0")).join(" ");
  assert.equal(hex(philox4x32([0, 0, 0, 0], [0, 0])), "6627e8d5 e169c58d bc57ac4c 9b00dbd8");
  assert.equal(hex(philox4x32([0xffffffff, 0xffffffff, 0xffffffff, 0xffffffff], [0xffffffff, 0xffffffff])), "408f276d 41c83b0e a20bc7c6 6d5451fd");
  assert.equal(
    hex(philox4x32([0x243f6a88, 0x85a308d3, 0x13198a2e, 0x03707344], [0xa4093822, 0x299f31d0])),
    "d16cfe09 94fdcceb 5001e420 24126ea1",
  );
});

test("draws are deterministic, counter-based and standard normal", () => {
  assert.deepEqual(standardNormal(0, 0, 64), standardNormal(0, 0, 64));
  assert.notDeepEqual(standardNormal(0, 0, 64), standardNormal(1, 0, 64));
  assert.notDeepEqual(standardNormal(0, 0, 64), standardNormal(0, 1, 64));
  assert.deepEqual(standardNormal(7, 2, 7), standardNormal(7, 2, 100).subarray(0, 7));
  const small = new PhiloxGenerator(9), large = new PhiloxGenerator(9);
  small.standardNormal(4);
  large.standardNormal(4096);
  assert.deepEqual(small.standardNormal(64), large.standardNormal(64));
  standardNormal(2n ** 64n - 1n, 0, 4);
  for (const bad of [-1, 2n ** 64n, 1.5, 2 ** 60, "3"]) assert.throws(() => standardNormal(bad, 0, 4), /seed/);
  const values = standardNormal(123, 0, 200000);
  let sum = 0, squares = 0;
  for (const v of values) {
    sum += v;
    squares += v * v;
  }
  const mean = sum / values.length;
  assert.ok(Math.abs(mean) < 0.01, `mean ${mean}`);
  assert.ok(Math.abs(Math.sqrt(squares / values.length - mean * mean) - 1) < 0.01);
});
