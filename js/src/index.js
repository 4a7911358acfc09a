/**
 * lcm-edge: a JavaScript runtime for lcm-export bundles (docs/bundle-format.md), in Node and browsers.
 * @module
 */

export { Pipeline, guidanceEmbedding } from "./pipeline.js";
export { FrameStream } from "./stream.js";
export { UserError, BundleError, NonFiniteError, AdapterError } from "./errors.js";
export { PhiloxGenerator, philox4x32, standardNormal } from "./philox.js";
export { parseManifest, loadManifest, upgradeFormat1, strengthKey } from "./manifest.js";
export { PromptTokenizer } from "./tokenizer.js";
export { BACKENDS } from "./backends.js";
