import assert from "node:assert/strict";
import { readFileSync } from "node:fs";
import { test } from "node:test";
import { BundleError, parseManifest, strengthKey } from "../src/index.js";
import { parseStrictJson } from "../src/json.js";

const here = new URL(".", import.meta.url);

test("js/src/manifest.schema.json is docs/manifest.schema.json", () => {
  const shipped = readFileSync(new URL("../src/manifest.schema.json", here), "utf8");
  const documented = readFileSync(new URL("../../docs/manifest.schema.json", here), "utf8");
  assert.deepEqual(JSON.parse(shipped), JSON.parse(documented));
});

test("the strict JSON reader refuses repeated keys and records float-spelled integers", () => {
  assert.throws(() => parseStrictJson('{"a": {"b": 1, "b": 2}}'), /'b' appears twice in a/);
  assert.deepEqual(parseStrictJson('{"a": [2.0, 1e3, 1.5]}').floatSpelled, [["a", 0], ["a", 1]]);
  assert.throws(() => parseStrictJson('{"a": NaN}'));
});

test("a format-1 manifest is upgraded and validates", () => {
  const text = readFileSync(new URL("../../tests/fixtures/manifest-v1-tiny-lcm.json", here), "utf8");
  const manifest = parseManifest(text, "format-1");
  assert.equal(manifest.formatVersionRead, 1);
  assert.deepEqual(manifest.components.unet.variants.map((v) => [v.name, v.files]), [["fp32", ["unet/model.onnx"]]]);
  assert.deepEqual(manifest.conditioning.unet_inputs, { encoder_hidden_states: "text_hidden_states", timestep_cond: "guidance_embedding" });
  const bad = JSON.parse(text);
  bad.conditioning = {};
  assert.throws(() => parseManifest(JSON.stringify(bad), "x"), (e) => e instanceof BundleError && /conditioning/.test(e.message));
  bad.format_version = 3;
  assert.throws(() => parseManifest(JSON.stringify(bad), "x"), /format_version/);
  assert.throws(() => parseManifest('{"format": "other"}', "x"), /not an lcm-export manifest/);
});

test("strength keys follow the format's rule", () => {
  assert.equal(strengthKey(4, 0.5), "4@0.5");
  assert.equal(strengthKey(4, 0.25), "4@0.25");
  assert.equal(strengthKey(4, 1), "4");
  assert.equal(strengthKey(4, 0.1234567), "4@0.123457");
});

test("backend_variants: a backend it names and a precision some onnx variant has (X15)", () => {
  const text = readFileSync(new URL("../../tests/fixtures/manifest-v1-tiny-lcm.json", here), "utf8");
  const manifest = JSON.parse(text);
  manifest.backend_variants = { webgpu: ["fp32"] };
  assert.deepEqual(parseManifest(JSON.stringify(manifest), "x").backend_variants, { webgpu: ["fp32"] });
  manifest.backend_variants = { wasm: ["int8", "fp32"] };
  assert.throws(() => parseManifest(JSON.stringify(manifest), "x"), /backend_variants\.wasm\[0\] is 'int8', which no onnx variant has \(they have fp32\)/);
  manifest.backend_variants = { wasm: "fp32" };
  assert.throws(() => parseManifest(JSON.stringify(manifest), "x"), (e) => e instanceof BundleError && /backend_variants/.test(e.message));
  manifest.backend_variants = { gpu: ["fp16"] };
  assert.throws(() => parseManifest(JSON.stringify(manifest), "x"), (e) => e instanceof BundleError && /backend_variants/.test(e.message));
});
