import assert from "node:assert/strict";
import { test } from "node:test";
import { backendPreference, chooseVariants } from "../src/variants.js";

// A web bundle's components as the manifest lists them (bundle-format.md, "Choosing a variant", rule 3).
const variant = (name, precision) => ({ name, precision, format: "onnx", path: `x/${name}.onnx`, files: [`x/${name}.onnx`] });
const manifest = {
  backend_variants: { webgpu: ["fp16", "fp32"], wasm: ["int8", "fp32"] },
  components: {
    text_encoder: { variants: [variant("fp32", "fp32"), variant("fp16", "fp16")] },
    unet: { variants: [variant("int8-qdq", "int8"), variant("fp32", "fp32"), variant("fp16", "fp16")] },
    vae_decoder: { variants: [variant("fp32", "fp32")] },
  },
};
const names = ["text_encoder", "unet", "vae_decoder"];
const backends = { webgpu: { name: "webgpu", fp16: true }, wasm: { name: "wasm", fp16: true }, node: { name: "node", fp16: true } };
const picked = (precision, backend, m = manifest) =>
  Object.fromEntries(
    Object.entries(chooseVariants(m, names, "onnx", precision, "b", backendPreference(m, backends[backend]))).map(([n, c]) => [n, c.variant.name]),
  );

test("auto follows backend_variants: fp16 on webgpu, the INT8 U-Net on wasm, the first listed elsewhere", () => {
  assert.deepEqual(picked("auto", "webgpu"), { text_encoder: "fp16", unet: "fp16", vae_decoder: "fp32" });
  assert.deepEqual(picked("auto", "wasm"), { text_encoder: "fp32", unet: "int8-qdq", vae_decoder: "fp32" });
  assert.deepEqual(picked("auto", "node"), { text_encoder: "fp32", unet: "int8-qdq", vae_decoder: "fp32" });
  const reasons = chooseVariants(manifest, names, "onnx", "auto", "b", ["fp16"]);
  assert.equal(reasons.unet.reason, "fp16: the bundle's choice for this backend");
  assert.equal(reasons.vae_decoder.reason, "no fp16 variant: the bundle's preferred");
});

test("a precision asked for wins over backend_variants; a bundle without it runs the first listed", () => {
  assert.deepEqual(picked("fp32", "webgpu"), { text_encoder: "fp32", unet: "fp32", vae_decoder: "fp32" });
  const plain = { components: manifest.components };
  assert.deepEqual(picked("auto", "webgpu", plain), { text_encoder: "fp32", unet: "int8-qdq", vae_decoder: "fp32" });
});

test("a WebGPU adapter without shader-f16 tries fp32 only: the float U-Net, never the INT8 one", () => {
  assert.deepEqual(backendPreference(manifest, { name: "webgpu", fp16: false }), ["fp32"]);
  assert.deepEqual(backendPreference(manifest, { name: "wasm", fp16: true }), ["int8", "fp32"]);
  assert.equal(backendPreference(manifest, { name: "node", fp16: true }), undefined);
  const gpu = chooseVariants(manifest, names, "onnx", "auto", "b", ["fp32"]);
  assert.deepEqual(Object.values(gpu).map((c) => c.variant.name), ["fp32", "fp32", "fp32"]);
});
