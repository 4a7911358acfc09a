/**
 * Which stored variant of each component runs (bundle-format.md, "Choosing a variant"); the Python twin is
 * lcm_export/runtime/variants.py. `precision` here is the caller's choice of stored weights ("auto", "fp32",
 * "fp16", "int8"), as the Python runtime's `variant=`.
 * @module
 */

import { BundleError, UserError } from "./errors.js";

export const VARIANT_PRECISIONS = ["int8", "fp16", "fp32"];
export const VARIANT_CHOICES = ["auto", ...VARIANT_PRECISIONS];

/** @typedef {{component: string, variant: any, reason: string}} VariantChoice */

/** @param {unknown} precision @returns {string} */
export function checkVariant(precision) {
  if (typeof precision !== "string" || !VARIANT_CHOICES.includes(precision)) {
    throw new UserError(`precision=${JSON.stringify(precision)}: pick one of ${VARIANT_CHOICES.join(", ")}`);
  }
  return precision;
}

const rank = (precision) => {
  const index = VARIANT_PRECISIONS.indexOf(precision);
  return index < 0 ? VARIANT_PRECISIONS.length : index;
};

/**
 * @param {string} name @param {any} component the manifest's entry @param {string} format @param {string} precision
 * @param {string[]} [preferred] the precisions "auto" tries on this backend (backendPreference)
 * @returns {VariantChoice}
 */
export function chooseVariant(name, component, format, precision, preferred) {
  const ofFormat = component.variants.filter((v) => v.format === format);
  if (!ofFormat.length) {
    const formats = [...new Set(component.variants.map((v) => v.format))].sort().join(", ");
    throw new BundleError(`component '${name}' has no ${format} variant in this bundle (it has: ${formats}): re-export it for onnx`);
  }
  if (precision === "auto" && preferred) {
    // Rule 3, backend_variants: the first listed variant of the first of the backend's precisions the component
    // has, else the bundle's preferred.
    for (const p of preferred) {
      const forBackend = ofFormat.find((v) => v.precision === p);
      if (forBackend) return { component: name, variant: forBackend, reason: `${p}: the bundle's choice for this backend` };
    }
    return { component: name, variant: ofFormat[0], reason: `no ${preferred.join(" or ")} variant: the bundle's preferred` };
  }
  if (precision === "auto") {
    return { component: name, variant: ofFormat[0], reason: ofFormat.length > 1 ? "the bundle's preferred" : "the only one" };
  }
  const exact = ofFormat.find((v) => v.precision === precision);
  if (exact) return { component: name, variant: exact, reason: `${precision} as asked` };
  const wider = ofFormat.filter((v) => rank(v.precision) > rank(precision)).sort((a, b) => rank(a.precision) - rank(b.precision));
  if (wider.length) return { component: name, variant: wider[0], reason: `no ${precision} variant: the closest more precise one` };
  const have = ofFormat.map((v) => v.name).join(", ");
  throw new UserError(
    `precision '${precision}': component '${name}' has no ${precision} variant or a more precise one (it has ${have}): ask for one of those, or re-export`,
  );
}

/**
 * The precisions "auto" tries on `backend`, in order, by the bundle's `backend_variants` (rule 3); undefined where it
 * names none. fp16 is left out on a WebGPU adapter without the shader-f16 feature (onnxruntime-web's fp16 kernels
 * need it; measured on SwiftShader: validation errors and a wrong image, no exception).
 * @param {any} manifest @param {{name: string, fp16: boolean}} backend
 * @returns {string[] | undefined}
 */
export function backendPreference(manifest, backend) {
  const preferred = manifest.backend_variants?.[backend.name];
  return preferred && preferred.filter((p) => p !== "fp16" || backend.fp16);
}

/**
 * @param {any} manifest @param {string[]} names @param {string} format @param {string} precision @param {string} where
 * @param {string[]} [preferred] the precisions "auto" tries on this backend (backendPreference)
 * @returns {Record<string, VariantChoice>}
 */
export function chooseVariants(manifest, names, format, precision, where, preferred) {
  checkVariant(precision);
  /** @type {Record<string, VariantChoice>} */
  const choices = {};
  for (const name of names) choices[name] = chooseVariant(name, manifest.components[name], format, precision, preferred);
  if (precision !== "auto" && !Object.values(choices).some((c) => c.variant.precision === precision)) {
    const have = [...new Set(Object.values(manifest.components).flatMap((c) => c.variants.map((v) => v.precision)))].sort();
    throw new UserError(`precision '${precision}': BUNDLE '${where}' has no ${precision} variant (it has ${have.join(", ")}): pick one of those, or re-export with --precision ${precision}`);
  }
  return choices;
}
