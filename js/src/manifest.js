/**
 * The bundle contract (docs/bundle-format.md): read manifest.json, upgrade format 1, validate it with
 * manifest.schema.json and the checks beyond the schema (X1–X15, those a runtime needs), verify every listed file's
 * size and sha256. What comes out is trusted by the rest of the runtime.
 * @module
 */

import Ajv2020 from "ajv/dist/2020.js";
import { BundleError } from "./errors.js";
import { parseStrictJson } from "./json.js";
import schema from "./manifest.schema.json" with { type: "json" };

export const FORMAT_VERSIONS = [1, 2];
export const VERIFY_MODES = ["full", "cached", "size"];
const FOLDER_FORMATS = ["mlpackage"];
const FLOAT_DTYPES = ["float32", "float16"];

/** @type {import("ajv").ValidateFunction | null} */
let compiled = null;
function schemaValidator() {
  if (!compiled) {
    const ajv = new Ajv2020({ allErrors: true, strict: false });
    compiled = ajv.compile(schema);
  }
  return compiled;
}

/** @param {Array<string|number>} path */
export function fieldName(path) {
  return path.map((p) => (typeof p === "number" ? `[${p}]` : `.${p}`)).join("").replace(/^\./, "");
}

/** ajv's "/a/0/b" as "a[0].b" */
function pointerField(pointer) {
  const parts = pointer
    .split("/")
    .slice(1)
    .map((p) => p.replace(/~1/g, "/").replace(/~0/g, "~"))
    .map((p) => (/^\d+$/.test(p) ? Number(p) : p));
  return fieldName(parts);
}

/**
 * The `tables` key of an N-step run at strength s (bundle-format.md, "scheduler"): "N", or "N@S" with S to six
 * decimals without trailing zeros.
 * @param {number} steps @param {number} strength
 */
export function strengthKey(steps, strength) {
  const rounded = Math.round(strength * 1e6) / 1e6;
  if (rounded >= 1) return String(steps);
  return `${steps}@${rounded.toFixed(6).replace(/0+$/, "")}`;
}

/**
 * A format-1 manifest as format 2, in memory (bundle-format.md, "Format 1 and the upgrade").
 * @param {any} data @returns {any}
 */
export function upgradeFormat1(data) {
  const upgraded = { ...data };
  const listed = Array.isArray(data.files) ? data.files.filter((e) => e && typeof e === "object").map((e) => e.path) : [];
  if (data.components && typeof data.components === "object" && !Array.isArray(data.components)) {
    upgraded.components = {};
    for (const [name, original] of Object.entries(data.components)) {
      if (!original || typeof original !== "object" || !original.artifacts || typeof original.artifacts !== "object") {
        upgraded.components[name] = original;
        continue;
      }
      const entry = { ...original };
      const tensors = ["inputs", "outputs"].flatMap((key) => (Array.isArray(entry[key]) ? entry[key] : []));
      const dtypes = tensors.filter((t) => t && typeof t === "object").map((t) => t.dtype);
      const ioDtype = dtypes.includes("float16") ? "float16" : "float32";
      for (const key of ["inputs", "outputs"]) {
        if (Array.isArray(entry[key])) {
          entry[key] = entry[key].map((t) =>
            t && typeof t === "object" && FLOAT_DTYPES.includes(t.dtype) ? { ...t, dtype: "float32" } : t,
          );
        }
      }
      const variants = [];
      for (const [format, artifact] of Object.entries(entry.artifacts)) {
        if (!artifact || typeof artifact !== "object") {
          variants.push(artifact);
          continue;
        }
        const path = artifact.path;
        let files;
        if (FOLDER_FORMATS.includes(format) && typeof path === "string") {
          files = listed.filter((p) => typeof p === "string" && p.startsWith(`${path}/`));
        } else {
          files = [path, `${path}_data`].filter((p) => listed.includes(p));
        }
        if (!files.length) files = [path];
        variants.push({
          ...artifact,
          name: artifact.precision,
          io_dtype: ioDtype,
          files,
          produced_by: { tool: "lcm-export (bundle format 1)" },
        });
      }
      delete entry.artifacts;
      entry.variants = variants;
      upgraded.components[name] = entry;
    }
  }
  if (data.pipeline && typeof data.pipeline === "object") {
    const inputs = { encoder_hidden_states: "text_hidden_states" };
    if (data.pipeline.time_cond_proj_dim !== null && data.pipeline.time_cond_proj_dim !== undefined) {
      inputs.timestep_cond = "guidance_embedding";
    }
    upgraded.conditioning = {
      text_encoders: [{ component: "text_encoder", tokenizer: "tokenizer", hidden_state: "last_hidden_state" }],
      unet_inputs: inputs,
      empty_negative: "encode",
    };
  }
  return upgraded;
}

/**
 * Parse and validate manifest text (no file checks).
 * @param {string} text @param {string} where the bundle, for messages
 * @returns {any} the manifest as format 2 (with `formatVersionRead` 1 or 2)
 */
export function parseManifest(text, where) {
  const refuse = (message) => {
    throw new BundleError(`BUNDLE '${where}' manifest.json ${message}`);
  };
  let parsed;
  try {
    parsed = parseStrictJson(text);
  } catch (error) {
    refuse(`is not valid JSON: ${error.message}`);
  }
  let data = parsed.value;
  if (!data || typeof data !== "object" || Array.isArray(data) || data.format !== "lcm-export-bundle") {
    refuse("is not an lcm-export manifest (field format must be \"lcm-export-bundle\")");
  }
  const version = data.format_version;
  if (!FORMAT_VERSIONS.includes(version) || parsed.floatSpelled.some((p) => p.length === 1 && p[0] === "format_version")) {
    refuse(`field format_version is ${JSON.stringify(version)}: this runtime reads format versions 1 and 2`);
  }
  if (version === 1) {
    if ("conditioning" in data) refuse("field conditioning: a format-1 manifest has none (is it format 2?)");
    data = { ...upgradeFormat1(data), format_version: 2 };
  }
  const validate = schemaValidator();
  if (!validate(data)) refuse(describeSchemaErrors(validate.errors || []));
  // X1: an integer field written as 2.0 (ajv's "integer" accepts it): validate again with those numbers made
  // fractional, and refuse where that breaks an integer type.
  if (parsed.floatSpelled.length && version === 2) {
    const probe = structuredClone(data);
    for (const path of parsed.floatSpelled) {
      let node = probe;
      for (const part of path.slice(0, -1)) node = node[part];
      node[path[path.length - 1]] += 0.5;
    }
    validate(probe);
    const spelled = new Set(parsed.floatSpelled.map((p) => fieldName(p)));
    const bad = (validate.errors || []).find(
      (e) => e.keyword === "type" && String(e.params.type).includes("integer") && spelled.has(pointerField(e.instancePath)),
    );
    if (bad) refuse(`field ${pointerField(bad.instancePath)} must be an integer written without a fraction (not 2.0)`);
  }
  checkBeyondSchema(data, refuse);
  Object.defineProperty(data, "formatVersionRead", { value: version, enumerable: false });
  return data;
}

/** The most specific schema error, as one line naming the field. */
function describeSchemaErrors(errors) {
  const useful = errors.filter((e) => !["if", "anyOf", "oneOf", "allOf", "not"].includes(e.keyword));
  const pool = useful.length ? useful : errors;
  pool.sort((a, b) => b.instancePath.split("/").length - a.instancePath.split("/").length);
  const error = pool[0];
  let field = pointerField(error.instancePath) || "(top level)";
  let detail = error.message || "is invalid";
  if (error.keyword === "required") {
    field = [field === "(top level)" ? "" : field, error.params.missingProperty].filter(Boolean).join(".");
    detail = "is missing";
  } else if (error.keyword === "additionalProperties") {
    field = [field === "(top level)" ? "" : field, error.params.additionalProperty].filter(Boolean).join(".");
    detail = "is not a known field";
  } else if (error.keyword === "enum") {
    detail = `must be one of ${error.params.allowedValues.map((v) => JSON.stringify(v)).join(", ")}`;
  } else if (error.keyword === "const") {
    detail = `must be ${JSON.stringify(error.params.allowedValue)}`;
  }
  return `field ${field} ${detail}`.trim();
}

/** X2, X4–X8, X10 (the runtime's tensors), X14, X15. @param {any} m @param {(message: string) => never} refuse */
/** X16 (lcm_export/runtime/manifest/control.py: check_controlnet): the declared ControlNets and the residual U-Net. */
function checkControlNet(m, refuse) {
  const control = m.controlnet;
  const declared = control.models.map((model) => model.component);
  control.models.forEach((model, index) => {
    const expected = index === 0 ? "controlnet" : `controlnet_${index}`;
    if (model.component !== expected) refuse(`field controlnet.models[${index}].component must be '${expected}': ControlNets are numbered in order`);
  });
  for (const name of Object.keys(m.components)) {
    if (/^controlnet(_[1-9][0-9]?)?$/.test(name) && !declared.includes(name)) refuse(`field components.${name} is a ControlNet that controlnet.models does not declare`);
  }
  const unet = m.components[control.unet];
  if (!unet) return;
  const unetInputs = new Map(unet.inputs.map((t) => [t.name, t]));
  for (const name of control.residual_inputs) if (!unetInputs.has(name)) refuse(`field components.${control.unet}.inputs must include the residual input ${name}`);
  control.models.forEach((model, index) => {
    const spec = m.components[model.component];
    const at = `components.${model.component}`;
    if (!spec) refuse(`field controlnet.models[${index}].component names no component of this bundle`);
    if (!spec.inputs.some((t) => t.name === "controlnet_cond")) refuse(`field ${at}.inputs must include the control image controlnet_cond`);
    const outputs = spec.outputs.map((t) => t.name);
    if ([...outputs].sort().join() !== [...control.residual_inputs].sort().join()) {
      refuse(`field ${at}.outputs must be exactly the U-Net's residual inputs ${control.residual_inputs.join(", ")} (got ${outputs.join(", ")})`);
    }
    spec.outputs.forEach((tensor, outputIndex) => {
      if (JSON.stringify(tensor.shape) !== JSON.stringify(unetInputs.get(tensor.name).shape)) {
        refuse(`field ${at}.outputs[${outputIndex}].shape must be the U-Net's ${tensor.name} shape`);
      }
    });
    spec.inputs.forEach((tensor, inputIndex) => {
      if (tensor.name !== "controlnet_cond" && !unetInputs.has(tensor.name)) refuse(`field ${at}.inputs[${inputIndex}].name must be controlnet_cond or an input of the U-Net`);
    });
  });
}

function checkBeyondSchema(m, refuse) {
  // X2: unique entries.
  const paths = new Set();
  m.files.forEach((entry, index) => {
    if (paths.has(entry.path)) refuse(`field files[${index}].path repeats '${entry.path}'`);
    paths.add(entry.path);
  });
  const tokenizerNames = new Set();
  m.tokenizers.forEach((t, index) => {
    if (tokenizerNames.has(t.name)) refuse(`field tokenizers[${index}].name repeats '${t.name}'`);
    tokenizerNames.add(t.name);
    // X4: what is used is hashed.
    if (!paths.has(t.path)) refuse(`field tokenizers[${index}].path '${t.path}' is not listed in files`);
  });
  for (const [name, component] of Object.entries(m.components)) {
    const tensorNames = new Set();
    for (const key of ["inputs", "outputs"]) {
      component[key].forEach((tensor, index) => {
        if (tensorNames.has(tensor.name)) refuse(`field components.${name}.${key}[${index}].name repeats '${tensor.name}'`);
        tensorNames.add(tensor.name);
      });
    }
    const variantKeys = new Set();
    component.variants.forEach((variant, index) => {
      const at = `components.${name}.variants[${index}]`;
      const key = `${variant.format}/${variant.name}`;
      if (variantKeys.has(key)) refuse(`field ${at}.name repeats '${variant.name}' for format ${variant.format}`);
      variantKeys.add(key);
      variant.files.forEach((file, fileIndex) => {
        if (!paths.has(file)) refuse(`field ${at}.files[${fileIndex}] '${file}' is not listed in files`);
      });
      if (!FOLDER_FORMATS.includes(variant.format)) {
        if (!paths.has(variant.path)) refuse(`field ${at}.path '${variant.path}' is not listed in files`);
        if (!variant.files.includes(variant.path)) refuse(`field ${at}.path '${variant.path}' is not one of its files`);
      }
    });
  }
  // X5: sizes.
  const p = m.pipeline;
  if (p.spatial_multiple % p.vae_scale_factor) {
    refuse(`field pipeline.spatial_multiple ${p.spatial_multiple} must be a multiple of vae_scale_factor ${p.vae_scale_factor}`);
  }
  for (const key of ["default_height", "default_width"]) {
    if (p[key] % p.spatial_multiple) refuse(`field pipeline.${key} ${p[key]} must be a multiple of spatial_multiple`);
  }
  // X6: tables.
  const tables = m.scheduler.tables;
  const full = Object.keys(tables).filter((k) => /^\d+$/.test(k)).map(Number);
  const largest = Math.max(0, ...full);
  for (let n = 1; n <= largest; n++) if (!(String(n) in tables)) refuse(`field scheduler.tables is missing "${n}" (keys 1..${largest} must all be present)`);
  const trainSteps = m.scheduler.config.num_train_timesteps;
  const columns = ["timesteps", "c_skip", "c_out", "sqrt_alpha_prod", "sqrt_beta_prod", "sqrt_alpha_prod_next", "sqrt_beta_prod_next"];
  for (const [key, table] of Object.entries(tables)) {
    const at = `scheduler.tables.${key}`;
    const rows = table.timesteps.length;
    const steps = Number(key.split("@")[0]);
    if (key.includes("@") ? rows > steps : rows !== steps) refuse(`field ${at}.timesteps has ${rows} entries for ${steps} steps`);
    for (const column of columns) {
      if (table[column].length !== rows) refuse(`field ${at}.${column} has ${table[column].length} entries: expected ${rows}`);
    }
    for (let i = 0; i < rows; i++) {
      if (table.timesteps[i] >= trainSteps) refuse(`field ${at}.timesteps[${i}] must be below num_train_timesteps ${trainSteps}`);
      if (i && table.timesteps[i] >= table.timesteps[i - 1]) refuse(`field ${at}.timesteps must strictly decrease`);
      if (Math.abs(table.sqrt_alpha_prod[i] ** 2 + table.sqrt_beta_prod[i] ** 2 - 1) > 1e-5) {
        refuse(`field ${at}.sqrt_alpha_prod[${i}]: sqrt_alpha_prod² + sqrt_beta_prod² must be 1`);
      }
      if (Math.abs(table.c_skip[i] + table.c_out[i] ** 2 - 1) > 1e-5) refuse(`field ${at}.c_skip[${i}]: c_skip + c_out² must be 1`);
      if (i + 1 < rows) {
        for (const column of ["sqrt_alpha_prod", "sqrt_beta_prod"]) {
          if (table[`${column}_next`][i] !== table[column][i + 1]) refuse(`field ${at}.${column}_next[${i}] must equal ${column}[${i + 1}]`);
        }
      }
    }
  }
  // X7.
  const c = m.conditioning;
  if (Array.isArray(c.guidance_frequencies) && c.guidance_frequencies.length !== Math.floor(p.time_cond_proj_dim / 2)) {
    refuse(`field conditioning.guidance_frequencies has ${c.guidance_frequencies.length} entries: expected time_cond_proj_dim/2`);
  }
  // X8 and X10 (the tensors this runtime feeds and reads).
  const declared = c.text_encoders.map((e) => e.component);
  for (const name of ["text_encoder", "text_encoder_2"]) {
    if (name in m.components && !declared.includes(name)) refuse(`field components.${name}: the conditioning declares no such text encoder`);
  }
  const find = (list, name) => list.find((t) => t.name === name);
  let hiddenSum = 0;
  for (const encoder of c.text_encoders) {
    const component = m.components[encoder.component];
    if (!component) continue;
    const hidden = find(component.outputs, encoder.hidden_state);
    if (!hidden) refuse(`field components.${encoder.component}.outputs has no '${encoder.hidden_state}' (conditioning's hidden_state)`);
    if (encoder.pooled && !find(component.outputs, encoder.pooled)) refuse(`field components.${encoder.component}.outputs has no '${encoder.pooled}' (conditioning's pooled)`);
    if (!find(component.inputs, "input_ids")) refuse(`field components.${encoder.component}.inputs has no input_ids`);
    hiddenSum += Number(hidden.shape[2]);
  }
  const unet = m.components.unet;
  if (unet) {
    const residuals = m.controlnet ? m.controlnet.residual_inputs : []; // X16: the residual U-Net's inputs
    const expected = new Set(["sample", "timestep", ...Object.keys(c.unet_inputs), ...residuals]);
    const names = new Set(unet.inputs.map((t) => t.name));
    for (const name of expected) if (!names.has(name)) refuse(`field components.unet.inputs has no '${name}'`);
    for (const name of names) if (!expected.has(name)) refuse(`field components.unet.inputs has '${name}', which the conditioning does not feed`);
    if (!find(unet.outputs, "out_sample")) refuse("field components.unet.outputs has no out_sample");
    const textInput = Object.entries(c.unet_inputs).find(([, source]) => source === "text_hidden_states");
    const allEncoders = c.text_encoders.every((e) => e.component in m.components);
    if (textInput && allEncoders && Number(find(unet.inputs, textInput[0]).shape[2]) !== hiddenSum) {
      refuse(`field components.unet.inputs: ${textInput[0]} shape[2] must be ${hiddenSum}, the encoders' hidden sizes summed`);
    }
  }
  if (m.components.vae_decoder) {
    if (!find(m.components.vae_decoder.inputs, "latent_sample")) refuse("field components.vae_decoder.inputs has no latent_sample");
    if (!find(m.components.vae_decoder.outputs, "sample")) refuse("field components.vae_decoder.outputs has no sample");
  }
  if (m.components.vae_encoder) {
    const output = p.vae === "autoencoder_tiny" ? "latents" : "latent_parameters";
    if (!find(m.components.vae_encoder.outputs, output)) refuse(`field components.vae_encoder.outputs has no ${output} (pipeline.vae ${p.vae})`);
  }
  // X16: the ControlNets give exactly the residuals the U-Net takes, with the same shapes.
  if (m.controlnet) checkControlNet(m, refuse);
  // X14: copies in scheduler.config equal the scheduler's fields.
  for (const key of ["prediction_type", "clip_sample", "clip_sample_range", "thresholding", "dynamic_thresholding_ratio", "sample_max_value"]) {
    if (key in m.scheduler.config && m.scheduler.config[key] !== m.scheduler[key]) {
      refuse(`field scheduler.config.${key} must equal scheduler.${key}`);
    }
  }
  // X15: a backend's precisions are ones some onnx variant has.
  const have = [...new Set(Object.values(m.components).flatMap((c) => c.variants.filter((v) => v.format === "onnx").map((v) => v.precision)))].sort();
  for (const [backend, precisions] of Object.entries(m.backend_variants || {})) {
    precisions.forEach((precision, index) => {
      if (!have.includes(precision)) refuse(`field backend_variants.${backend}[${index}] is '${precision}', which no onnx variant has (they have ${have.join(", ")})`);
    });
  }
}

/**
 * Check every listed file against the folder (X3, X9): present, regular, its size and (verify "full"/"cached") its
 * sha256. "cached" remembers (path, size, mtime/ETag) -> sha256 so that a second load does not hash again.
 * `hashed`: the paths whose sha256 is checked now (default: every listed file). The format asks a runtime to check a
 * file "before using" it: a pipeline hashes the files of the variants it opens (a web bundle's fp32, fp16 and INT8
 * U-Nets are 6 GB, of which a browser opens one), and only the sizes of the rest.
 * @param {any} manifest @param {import("./source.js").FolderSource | import("./source.js").UrlSource} source
 * @param {"full" | "cached" | "size"} verify
 * @param {Set<string>} [hashed]
 */
export async function verifyFiles(manifest, source, verify, hashed) {
  const where = source.description;
  const cache = verify === "cached" ? await source.loadHashCache() : {};
  let changed = false;
  for (const entry of manifest.files) {
    const info = await source.stat(entry.path);
    if (!info.exists) throw new BundleError(`BUNDLE '${where}' is missing ${entry.path} (listed in manifest.json files): re-export it or copy the whole folder`);
    if (!info.regular) throw new BundleError(`BUNDLE '${where}': ${entry.path} is not a regular file`);
    if (info.size !== undefined && info.size !== entry.size) {
      throw new BundleError(`BUNDLE '${where}': ${entry.path} has ${info.size} bytes, manifest.json says ${entry.size}: the file is modified or corrupted`);
    }
    if (verify === "size" || (hashed && !hashed.has(entry.path))) continue;
    const key = await source.cacheKey(entry.path);
    const known = cache[key];
    if (verify === "cached" && info.stamp && known && known.stamp === info.stamp && known.size === entry.size && known.sha256 === entry.sha256) continue;
    const digest = await source.hash(entry.path);
    if (digest !== entry.sha256) {
      throw new BundleError(`BUNDLE '${where}': ${entry.path} has sha256 ${digest.slice(0, 12)}…, manifest.json says ${entry.sha256.slice(0, 12)}…: the file is modified or corrupted`);
    }
    if (verify === "cached" && info.stamp) {
      cache[key] = { stamp: info.stamp, size: entry.size, sha256: digest };
      changed = true;
    }
  }
  if (changed) await source.saveHashCache(cache);
}

/**
 * The size and sha256 of the listed files among `paths` (a pipeline's check before it uses them, after loadManifest
 * checked every listed file's presence and size).
 * @param {any} manifest @param {import("./source.js").FolderSource | import("./source.js").UrlSource} source
 * @param {"full" | "cached" | "size"} verify
 * @param {Iterable<string>} paths
 */
export async function verifyUsedFiles(manifest, source, verify, paths) {
  const wanted = new Set(paths);
  await verifyFiles({ files: manifest.files.filter((entry) => wanted.has(entry.path)) }, source, verify);
}

/**
 * Read, validate and verify a bundle's manifest.
 * @param {import("./source.js").FolderSource | import("./source.js").UrlSource} source
 * @param {"full" | "cached" | "size"} verify
 * @param {Set<string>} [hashed] the files whose sha256 is checked now (default: all; see verifyFiles)
 */
export async function loadManifest(source, verify, hashed) {
  const info = await source.stat("manifest.json").catch(() => ({ exists: false }));
  if (!info.exists) throw new BundleError(`BUNDLE '${source.description}' has no manifest.json: is it an lcm-export bundle folder?`);
  const text = new TextDecoder("utf-8", { fatal: true });
  let decoded;
  try {
    decoded = text.decode(await source.read("manifest.json"));
  } catch (error) {
    if (error instanceof BundleError) throw error;
    throw new BundleError(`BUNDLE '${source.description}' manifest.json is not UTF-8`);
  }
  const manifest = parseManifest(decoded, source.description);
  await verifyFiles(manifest, source, verify, hashed);
  return manifest;
}
