/**
 * Run-time adapters against the Python runtime (references written by tests/js/test_node_runtime.py into
 * $LCM_EDGE_REFERENCES): the image with an adapter equals Python's on onnxruntime-node and WASM, fp32 (weights fed
 * as inputs, and rebuilt) and INT8 (rebuilt); A -> base -> A gives each one's image exactly; in "inputs" mode a
 * switch keeps the one open session; an adapter made for another bundle, a bad adapterMode: one error naming it.
 * adapterMode "factors" against the Python runtime's own factors mode (test/factors_reference.py, run here with
 * $LCM_EDGE_PYTHON, else the repository's .venv/bin/python, else python3): its image on node and WASM (fp32, fp16),
 * the factor-inputs graph cut to the touched branches bit for bit (cutFactorBranches against cut_factor_branches),
 * one session per set of touched weights (a switch keeps it or opens the new cut), the factor inputs (stacked, rank 0
 * for untouched layers, which are cut and not fed) bit for bit, the shares "auto" decides on.
 */
import assert from "node:assert/strict";
import { execFileSync } from "node:child_process";
import { cpSync, existsSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";
import { after, describe, test } from "node:test";
import { AdapterError, BundleError, Pipeline, UserError } from "../src/index.js";
import { FACTOR_SHARE_AUTO, factorInputs, factorShares, factorSignature } from "../src/adapters.js";
import { cutFactorBranches } from "../src/factorgraph.js";
import { folder, read, maxAbs } from "./references.js";

const REPOSITORY = join(dirname(fileURLToPath(import.meta.url)), "..", "..");

const TOLERANCE = 1e-4;
const results = {};

const image = async (pipe, c) => (await pipe.generate("a cat", { numInferenceSteps: c.steps, seed: c.seed })).images[0].data;
/**
 * The adapter modes each case runs in, and how each component then runs its adapters: a float variant's weights fed
 * as inputs ("auto" on fp32 and fp16) or rebuilt; the INT8 bundle's U-Net and (int8 weights by default) text encoder
 * rebuilt.
 */
const MODES = {
  fp32: { auto: { text_encoder: "inputs", unet: "inputs" }, rebuild: { text_encoder: "rebuild", unet: "rebuild" } },
  int8: { auto: { text_encoder: "rebuild", unet: "rebuild" } },
  fp16: { auto: { text_encoder: "inputs", unet: "inputs" }, rebuild: { text_encoder: "rebuild", unet: "rebuild" } },
};

/** The second adapter's weight in the stacked-factors check (a copy of the first adapter's file). */
const SECOND_WEIGHT = -0.4;
/** The float cases (the INT8 variant cannot run factors). */
const floatCases = (index) => index.adapters.filter((c) => c.name !== "int8");

/** A copy of the case's adapter file under another name (a second adapter to stack). */
function secondAdapter(c) {
  const copy = join(folder, `factors-second-${c.name}.adapter`);
  if (!existsSync(copy)) cpSync(c.adapter, copy);
  return copy;
}

/** The Python interpreter that runs test/factors_reference.py. */
function python() {
  if (process.env.LCM_EDGE_PYTHON) return process.env.LCM_EDGE_PYTHON;
  const venv = join(REPOSITORY, ".venv", "bin", "python");
  return existsSync(venv) ? venv : "python3";
}

let pythonFactorsRun = null;
/** The Python runtime's factors mode for the float cases (test/factors_reference.py, run once): {out, index}. */
function pythonFactors(cases) {
  if (pythonFactorsRun) return pythonFactorsRun;
  const out = join(folder, "factors-python");
  const spec = {
    out,
    cases: cases.map((c) => ({ name: c.name, bundle: c.bundle, adapter: c.adapter, second: secondAdapter(c), weight: c.weight, second_weight: SECOND_WEIGHT, seed: c.seed, steps: c.steps })),
  };
  const env = { ...process.env, PYTHONPATH: [REPOSITORY, process.env.PYTHONPATH].filter(Boolean).join(":") };
  const script = join(REPOSITORY, "js", "test", "factors_reference.py");
  const stdout = execFileSync(python(), [script, JSON.stringify(spec)], { env, encoding: "utf8", maxBuffer: 1 << 26, timeout: 180_000 });
  pythonFactorsRun = { out, index: JSON.parse(stdout.trim().split("\n").at(-1)) };
  return pythonFactorsRun;
}

/** A file factors_reference.py wrote: float32 values. */
const readFloats = (out, entry) => {
  const bytes = readFileSync(join(out, entry.file));
  return new Float32Array(bytes.buffer, bytes.byteOffset, bytes.byteLength / 4).slice();
};

/** The bytes of a typed array. */
const bytesOf = (data) => Buffer.from(data.buffer, data.byteOffset, data.byteLength);

/**
 * An adapter file holding only the tensors of `source` whose keys `keep` accepts (same metadata): a smaller adapter
 * for the same bundle.
 */
function subsetAdapter(source, target, keep) {
  const bytes = readFileSync(source);
  const size = Number(bytes.readBigUInt64LE(0));
  const header = JSON.parse(bytes.subarray(8, 8 + size).toString("utf8"));
  const data = bytes.subarray(8 + size);
  const written = { __metadata__: header.__metadata__ };
  const parts = [];
  let at = 0;
  for (const key of Object.keys(header).filter((k) => k !== "__metadata__" && keep(k)).sort()) {
    const [start, end] = header[key].data_offsets;
    parts.push(data.subarray(start, end));
    written[key] = { ...header[key], data_offsets: [at, at + end - start] };
    at += end - start;
  }
  let text = JSON.stringify(written);
  text += " ".repeat((8 - (Buffer.byteLength(text) % 8)) % 8);
  const length = Buffer.alloc(8);
  length.writeBigUInt64LE(BigInt(Buffer.byteLength(text)));
  writeFileSync(target, Buffer.concat([length, Buffer.from(text, "utf8"), ...parts]));
  return target;
}

describe("run-time adapters against the Python runtime", { skip: folder ? false : "LCM_EDGE_REFERENCES is not set (pytest tests/js sets it)" }, () => {
  const index = folder ? JSON.parse(readFileSync(join(folder, "index.json"), "utf8")) : { adapters: [] };
  after(() => writeFileSync(join(folder, "adapters-results.json"), JSON.stringify(results, null, 1)));

  for (const backend of ["node", "wasm"]) {
    test(`an adapter gives Python's image on ${backend}, as inputs and rebuilt; A -> base -> A is exact`, async () => {
      for (const c of index.adapters) {
        for (const [adapterMode, modes] of Object.entries(MODES[c.name])) {
          const label = `${backend}/${c.name}/${adapterMode}`;
          const tolerance = c.tolerance?.[backend] ?? TOLERANCE;
          const expected = read(c.expected);
          const base = read(c.base);
          assert.ok(maxAbs(expected, base) > 1e-2, `${c.name}: the adapter changes the image (the check can fail)`);
          const pipe = await Pipeline.load(c.bundle, { backend, precision: c.name, adapterMode, adapters: { [c.adapter]: c.weight } });
          assert.deepEqual(pipe.adapters, { [c.adapter]: c.weight });
          assert.deepEqual(pipe.adapterModes, modes, label);
          results[`${label}/modes`] = pipe.adapterModes;
          const adapted = await image(pipe, c);
          const difference = maxAbs(adapted, expected);
          results[label] = difference;
          assert.ok(difference <= tolerance, `${label}: max abs ${difference} against Python's`);
          await pipe.setAdapters({});
          assert.deepEqual(pipe.adapterModes, {});
          const plain = await image(pipe, c);
          results[`${label}/base`] = maxAbs(plain, base);
          assert.ok(maxAbs(plain, base) <= tolerance, `${label}: the base image after {}`);
          await pipe.setAdapters({ [c.adapter]: c.weight });
          assert.equal(maxAbs(await image(pipe, c), adapted), 0, `${label}: A -> base -> A`);
        }
      }
    });
  }

  test("adapterMode inputs: a switch keeps the one open session; back to the base reopens the component's own", async () => {
    const c = index.adapters.find((entry) => entry.name === "fp32");
    const options = { backend: "node", precision: c.name };
    const pipe = await Pipeline.load(c.bundle, { ...options, adapterMode: "inputs", adapters: { [c.adapter]: c.weight } });
    assert.deepEqual(pipe.adapterModes, { text_encoder: "inputs", unet: "inputs" });
    const graphs = { unet: pipe.sessions.unet, text_encoder: pipe.sessions.text_encoder };
    for (const [name, session] of Object.entries(graphs)) {
      // the weight-inputs graph: its mapped weights are inputs beside the component's own
      assert.ok(session.inputNames.length > pipe.manifest.components[name].inputs.length, `${name}: a weight-inputs session`);
    }
    const first = await image(pipe, c);
    await pipe.setAdapters({ [c.adapter]: 0.3 });
    assert.equal(pipe.sessions.unet, graphs.unet, "the same U-Net session after a switch");
    assert.equal(pipe.sessions.text_encoder, graphs.text_encoder, "the same text encoder session after a switch");
    const low = await image(pipe, c);
    assert.ok(maxAbs(low, first) > 1e-3, "another weight gives another image on the same session");
    // the same weights rebuilt into a session of their own give the same image
    const rebuilt = await Pipeline.load(c.bundle, { ...options, adapterMode: "rebuild", adapters: { [c.adapter]: 0.3 } });
    assert.deepEqual(rebuilt.adapterModes, { text_encoder: "rebuild", unet: "rebuild" });
    results["inputs/0.3-against-rebuild"] = maxAbs(low, await image(rebuilt, c));
    assert.ok(results["inputs/0.3-against-rebuild"] <= TOLERANCE, `inputs against rebuild at 0.3: ${results["inputs/0.3-against-rebuild"]}`);
    await pipe.setAdapters({});
    assert.notEqual(pipe.sessions.unet, graphs.unet, "the base runs the U-Net's own session");
    assert.deepEqual(pipe.adapterModes, {});
    assert.ok(maxAbs(await image(pipe, c), read(c.base)) <= TOLERANCE, "the base image after {}");
    await pipe.setAdapters({ [c.adapter]: c.weight });
    assert.equal(pipe.sessions.unet, graphs.unet, "the weight-inputs session was kept through the base");
    assert.equal(maxAbs(await image(pipe, c), first), 0, "A -> 0.3 -> base -> A");
  });

  test("a weight-inputs graph is verified before it opens: a changed byte is a BundleError naming it", async () => {
    const c = index.adapters.find((entry) => entry.name === "fp32");
    const copy = join(mkdtempSync(join(tmpdir(), "lcm-edge-test-")), "bundle");
    try {
      cpSync(c.bundle, copy, { recursive: true });
      const graph = join(copy, "unet", "model.weight-inputs.onnx");
      const bytes = readFileSync(graph);
      bytes[bytes.length >> 1] ^= 1;
      writeFileSync(graph, bytes);
      const pipe = await Pipeline.load(copy, { backend: "node", precision: c.name, verify: "full" }); // not opened yet
      await assert.rejects(
        pipe.setAdapters({ [c.adapter]: c.weight }),
        (error) => error instanceof BundleError && /unet\/model\.weight-inputs\.onnx has sha256 .*the file is modified or corrupted$/.test(error.message),
      );
      assert.deepEqual(pipe.adapters, {});
      assert.deepEqual(pipe.adapterModes, {});
    } finally {
      rmSync(join(copy, ".."), { recursive: true, force: true });
    }
  });

  test("a factor-inputs graph is verified before it is cut and opens: a changed byte is a BundleError naming it", async () => {
    const c = index.adapters.find((entry) => entry.name === "fp32");
    const copy = join(mkdtempSync(join(tmpdir(), "lcm-edge-test-")), "bundle");
    try {
      cpSync(c.bundle, copy, { recursive: true });
      const graph = join(copy, "unet", "model.factor-inputs.onnx");
      const bytes = readFileSync(graph);
      bytes[bytes.length >> 1] ^= 1;
      writeFileSync(graph, bytes);
      const pipe = await Pipeline.load(copy, { backend: "node", precision: c.name, verify: "full", adapterMode: "factors" }); // not opened yet
      await assert.rejects(
        pipe.setAdapters({ [c.adapter]: c.weight }),
        (error) => error instanceof BundleError && /unet\/model\.factor-inputs\.onnx has sha256 .*the file is modified or corrupted$/.test(error.message),
      );
      assert.deepEqual(pipe.adapters, {});
      assert.deepEqual(pipe.adapterModes, {});
    } finally {
      rmSync(join(copy, ".."), { recursive: true, force: true });
    }
  });

  for (const backend of ["node", "wasm"]) {
    test(`adapterMode factors gives the Python runtime's factors-mode image on ${backend}; A -> base -> A is exact`, async () => {
      const { out, index: python } = pythonFactors(floatCases(index));
      for (const c of floatCases(index)) {
        const label = `${backend}/${c.name}/factors`;
        const tolerance = c.tolerance?.[backend] ?? TOLERANCE;
        const expected = readFloats(out, python[c.name].image);
        assert.deepEqual(python[c.name].modes, { text_encoder: "factors", unet: "factors" }, `${c.name}: Python ran factors`);
        assert.ok(maxAbs(expected, read(c.base)) > 1e-2, `${c.name}: the adapter changes the image (the check can fail)`);
        const pipe = await Pipeline.load(c.bundle, { backend, precision: c.name, adapterMode: "factors", adapters: { [c.adapter]: c.weight } });
        assert.deepEqual(pipe.adapterModes, { text_encoder: "factors", unet: "factors" }, label);
        const graphs = { unet: pipe.sessions.unet, text_encoder: pipe.sessions.text_encoder };
        for (const [name, session] of Object.entries(graphs)) {
          const map = /** @type {any} */ (pipe.weightMaps)[name];
          const branched = map.variants[pipe.variants[name].variant.name].factor_inputs;
          const { kept } = python[c.name].cuts[name];
          assert.deepEqual(pipe.factorGraphs[name].kept, kept, `${label}: the ${name} session keeps the branches Python's does`);
          assert.ok(kept.length > 0 && kept.length < branched.length, `${label}: the adapter leaves some ${name} weights (the cut can fail)`);
          const factors = session.inputNames.filter((input) => /\.(down|up)$/.test(input));
          assert.deepEqual(factors.sort(), kept.flatMap((weight) => [`${weight}.down`, `${weight}.up`]).sort(), `${label}: the ${name} session is its cut factor-inputs graph's`);
          const fed = pipe.fedWeights[name];
          assert.deepEqual(Object.keys(fed).sort(), factors, `${label}: ${name} is fed the kept branches' factors only`);
          assert.ok(Object.values(fed).every((tensor) => !tensor.dims.includes(0)), `${label}: ${name} is fed no rank 0`);
          results[`${label}/${name}/branches-kept`] = `${kept.length} of ${branched.length}`;
        }
        const adapted = await image(pipe, c);
        results[label] = maxAbs(adapted, expected);
        results[`${label}/against-python-auto`] = maxAbs(adapted, read(c.expected));
        assert.ok(results[label] <= tolerance, `${label}: max abs ${results[label]} against Python's factors image`);
        if (c.name === "fp32") {
          assert.ok(results[`${label}/against-python-auto`] <= tolerance, `${label}: max abs ${results[`${label}/against-python-auto`]} against Python's merged image`);
        }
        await pipe.setAdapters({});
        assert.deepEqual(pipe.adapterModes, {});
        assert.deepEqual(Object.keys(pipe.factorGraphs).sort(), ["text_encoder", "unet"], `${label}: back to the base keeps the factor-inputs sessions`);
        assert.equal(pipe.sessions.unet, graphs.unet, `${label}: the base runs on the U-Net's factor-inputs session`);
        assert.ok(Object.values(pipe.fedWeights.unet).every((tensor) => tensor.data.every((value) => value === 0)), `${label}: fed zero factors`);
        const plain = await image(pipe, c);
        const own = await Pipeline.load(c.bundle, { backend, precision: c.name });
        results[`${label}/base`] = maxAbs(plain, read(c.base));
        assert.equal(maxAbs(plain, await image(own, c)), 0, `${label}: zero factors give the base session's image bit for bit`);
        assert.ok(results[`${label}/base`] <= tolerance, `${label}: the base image after {}`);
        await pipe.setAdapters({ [c.adapter]: c.weight });
        assert.deepEqual(pipe.adapterModes, { text_encoder: "factors", unet: "factors" }, label);
        assert.equal(maxAbs(await image(pipe, c), adapted), 0, `${label}: A -> base -> A`);
        const reopened = { unet: pipe.sessions.unet, text_encoder: pipe.sessions.text_encoder };
        await pipe.setAdapters({ [c.adapter]: 0.3 });
        assert.equal(pipe.sessions.unet, reopened.unet, `${label}: a switch touching the same weights keeps the U-Net's factor-inputs session`);
        assert.equal(pipe.sessions.text_encoder, reopened.text_encoder, `${label}: ... and the text encoder's`);
        assert.equal(pipe.sessions.unet, pipe.factorGraphs.unet.session);
        assert.ok(maxAbs(await image(pipe, c), adapted) > 1e-3, `${label}: another weight gives another image on the same session`);
        // an adapter of one U-Net layer: another set of touched weights, another cut graph; the text encoder's own
        const map = /** @type {any} */ (pipe.weightMaps).unet;
        const stored = map.variants[pipe.variants.unet.variant.name];
        const [[adapter]] = pipe.activeAdapters;
        const [layer] = adapter.layers.filter((l) => l.component === "unet" && map.weights[l.weight].kind === "conv");
        const keys = [`unet/${layer.weight}.down`, `unet/${layer.weight}.up`];
        const one = subsetAdapter(c.adapter, join(folder, `factors-one-conv-${c.name}.adapter`), (key) => keys.includes(key));
        await pipe.setAdapters({ [one]: 2 });
        assert.deepEqual(pipe.adapterModes, { unet: "factors" }, label);
        assert.notEqual(pipe.sessions.unet, reopened.unet, `${label}: other touched weights open another cut graph`);
        assert.deepEqual(pipe.factorGraphs.unet.kept, [stored.tensors[layer.weight].name], `${label}: the one conv's branch kept`);
        assert.deepEqual(Object.keys(pipe.factorGraphs).sort(), ["text_encoder", "unet"], `${label}: the text encoder on its factor session, fed zeros`);
        assert.ok(Object.values(pipe.fedWeights.text_encoder).every((tensor) => tensor.data.every((value) => value === 0)));
        assert.deepEqual(pipe.sessions.unet.inputNames.filter((input) => /\.(down|up)$/.test(input)).length, 2);
        const oneConv = await image(pipe, c);
        const merged = await Pipeline.load(c.bundle, { backend, precision: c.name, adapterMode: "inputs", adapters: { [one]: 2 } });
        results[`${label}/one-conv-against-inputs`] = maxAbs(oneConv, await image(merged, c));
        results[`${label}/one-conv-against-base`] = maxAbs(oneConv, read(c.base));
        assert.ok(results[`${label}/one-conv-against-base`] > 1e-3, `${label}: the one conv changes the image`);
        assert.ok(results[`${label}/one-conv-against-inputs`] <= tolerance, `${label}: one conv as factors against merged: ${results[`${label}/one-conv-against-inputs`]}`);
        await pipe.setAdapters({ [c.adapter]: c.weight });
        assert.deepEqual(pipe.factorGraphs.unet.kept, python[c.name].cuts.unet.kept);
        assert.equal(maxAbs(await image(pipe, c), adapted), 0, `${label}: A -> 0.3 -> one conv -> A`);
      }
    });
  }

  test("onnxruntime-node opens a cut graph of a variant with external data from a temporary folder, removed with it", async () => {
    const c = index.adapters.find((entry) => entry.name === "fp32");
    const { index: python } = pythonFactors(floatCases(index));
    const pipe = await Pipeline.load(c.bundle, { backend: "node", precision: c.name, adapterMode: "factors" });
    // the tiny variant holds its weights inline: one more file of its folder stands for external data (linked beside)
    const choice = pipe.variants.unet;
    const variant = choice.variant;
    const folderOf = variant.path.slice(0, variant.path.lastIndexOf("/") + 1);
    pipe.variants.unet = { ...choice, variant: { ...variant, files: [...variant.files, `${folderOf}config.json`] } };
    await pipe.setAdapters({ [c.adapter]: c.weight });
    const first = pipe.factorGraphs.unet;
    assert.ok(first.folder && existsSync(join(first.folder, "config.json")), "a temporary folder with the link beside the cut graph");
    assert.deepEqual(first.kept, python[c.name].cuts.unet.kept);
    const adapted = await image(pipe, c);
    results["node/fp32/factors/temporary-folder"] = maxAbs(adapted, readFloats(pythonFactors(floatCases(index)).out, python[c.name].image));
    assert.ok(results["node/fp32/factors/temporary-folder"] <= TOLERANCE, "the cut graph from the folder gives Python's image");
    await pipe.setAdapters({ [c.adapter]: 0.3 });
    assert.equal(pipe.factorGraphs.unet, first, "the same touched weights: the same session and folder");
    const [[adapter]] = pipe.activeAdapters;
    await pipe.setAdapters({});
    assert.equal(pipe.factorGraphs.unet, first, "back to the base: the factor session kept (fed zeros), its folder too");
    assert.ok(existsSync(first.folder));
    const [layer] = adapter.layers.filter((l) => l.component === "unet");
    const keys = [`unet/${layer.weight}.down`, `unet/${layer.weight}.up`];
    const one = subsetAdapter(c.adapter, join(folder, "temporary-folder-one-layer.adapter"), (key) => keys.includes(key));
    await pipe.setAdapters({ [one]: 1 });
    assert.notEqual(pipe.factorGraphs.unet, first, "other touched weights: another cut graph");
    assert.ok(!existsSync(first.folder), "the replaced cut graph's folder is removed");
  });

  test("the factor-inputs graph cut equals the Python runtime's cut bit for bit (the adapter's untouched branches; every branch)", async () => {
    const { out, index: python } = pythonFactors(floatCases(index));
    for (const c of floatCases(index)) {
      for (const [component, cuts] of Object.entries(python[c.name].cuts)) {
        const graph = readFileSync(cuts.graph);
        for (const label of ["adapter", "every"]) {
          const expected = readFileSync(join(out, cuts[label].file));
          const cut = cutFactorBranches(new Uint8Array(graph), cuts[label].cut);
          assert.ok(cuts[label].cut.length > 0, `${c.name}/${component}/${label}: something is cut`);
          assert.ok(Buffer.from(cut).equals(expected), `${c.name}/${component}/${label}: ${cut.length} bytes against Python's ${expected.length}`);
          results[`${c.name}/${component}/cut-${label}`] = `${cuts[label].cut.length} branches cut, ${graph.length} -> ${cut.length} bytes`;
        }
      }
    }
  });

  test("factor inputs equal the Python runtime's bit for bit (two adapters stacked, rank 0 elsewhere); the shares auto decides on", async () => {
    const { out, index: python } = pythonFactors(floatCases(index));
    for (const c of floatCases(index)) {
      const second = secondAdapter(c);
      const pipe = await Pipeline.load(c.bundle, { backend: "node", precision: c.name, adapterMode: "factors" });
      await pipe.setAdapters({ [c.adapter]: c.weight, [second]: SECOND_WEIGHT });
      const maps = /** @type {any} */ (pipe.weightMaps);
      let stacked = 0;
      let empty = 0;
      let emptyConvs = 0;
      for (const [component, tensors] of Object.entries(python[c.name].inputs)) {
        const fed = pipe.fedWeights[component];
        const variant = pipe.variants[component].variant;
        const computed = factorInputs(maps[component], variant, pipe.activeAdapters);
        assert.deepEqual(Object.keys(computed).sort(), Object.keys(tensors).sort(), `${c.name}/${component}: the factor inputs`);
        // what setAdapters feeds is factorInputs' result for the kept branches (the others are cut)
        const { kept } = factorSignature(computed);
        assert.deepEqual(pipe.factorGraphs[component].kept, kept, `${c.name}/${component}: the session's branches`);
        assert.deepEqual(Object.keys(fed).sort(), kept.flatMap((weight) => [`${weight}.down`, `${weight}.up`]).sort(), `${c.name}/${component}: fed`);
        for (const [key, entry] of Object.entries(tensors)) {
          const label = `${c.name}/${component} ${key}`;
          const conv = entry.shape.length === 4;
          const at = key.endsWith(".down") ? (conv ? 0 : 1) : conv ? 1 : 0; // where the rank is in the shape
          const rank = entry.shape[at];
          assert.equal(computed[key].dtype, entry.dtype, label);
          assert.deepEqual(computed[key].dims, entry.shape, label);
          assert.ok(bytesOf(computed[key].data).equals(readFileSync(join(out, entry.file))), `${label}: the bytes Python feeds`);
          if (rank === 6) {
            stacked++; // 3 + 3: both adapters' factors
            assert.equal(fed[key].type, entry.dtype, label);
            assert.ok(bytesOf(computed[key].data).equals(bytesOf(fed[key].data)), `${label}: fed as factorInputs gives it`);
          } else {
            assert.equal(rank, 0, `${label}: rank ${rank}`);
            assert.equal(fed[key], undefined, `${label}: a cut branch's factors are not fed`);
            empty++;
            if (conv) emptyConvs++;
          }
        }
        const [[adapter]] = pipe.activeAdapters;
        const share = factorShares(maps[component], [[adapter, c.weight]]);
        results[`${c.name}/${component}/factor-share`] = share;
        assert.equal(share, python[c.name].shares[component], `${c.name}/${component}: Python's factor_shares`);
        assert.ok(share > FACTOR_SHARE_AUTO, `${c.name}/${component}: the test LoRA is above the share auto runs as factors (${share})`);
        assert.equal(factorShares(maps[component], [[adapter, 0]]), 0, "an adapter at weight 0 adds no factors");
      }
      results[`${c.name}/factor-inputs`] = { stacked_rank_6: stacked, rank_0: empty, conv_rank_0: emptyConvs };
      assert.ok(stacked > 0 && empty > 0 && emptyConvs > 0, `${c.name}: ${stacked} inputs of rank 6 (stacked), ${empty} of rank 0 (${emptyConvs} of convs)`);
    }
  });

  test("auto runs a small adapter as factors (<= 1% of the weights) and a large one merged; modeFor's one-line refusals", async () => {
    const c = index.adapters.find((entry) => entry.name === "fp32");
    const options = { backend: "node", precision: c.name };
    const full = await Pipeline.load(c.bundle, { ...options, adapters: { [c.adapter]: c.weight } });
    const maps = /** @type {any} */ (full.weightMaps);
    const [[adapter]] = full.activeAdapters;
    const size = (l) => l.up.length + l.down.length;
    const [layer] = adapter.layers.filter((l) => l.component === "unet").sort((a, b) => size(a) - size(b)); // the smallest
    const keys = [`unet/${layer.weight}.down`, `unet/${layer.weight}.up`];
    const small = subsetAdapter(c.adapter, join(folder, "factors-one-layer.adapter"), (key) => keys.includes(key));
    const pipe = await Pipeline.load(c.bundle, { ...options, adapters: { [small]: 2 } });
    const [[one]] = pipe.activeAdapters;
    assert.equal(one.layers.length, 1);
    const share = factorShares(maps.unet, [[one, 2]]);
    results["auto/one-layer-share"] = share;
    assert.ok(share > 0 && share <= FACTOR_SHARE_AUTO, `one rank-3 layer: ${share} of the U-Net's weights`);
    assert.deepEqual(pipe.adapterModes, { unet: "factors" }, "auto: the small adapter as factors");
    assert.deepEqual(full.adapterModes, { text_encoder: "inputs", unet: "inputs" }, "auto: the large one merged");
    const auto = await image(pipe, c);
    const asked = await Pipeline.load(c.bundle, { ...options, adapterMode: "factors", adapters: { [small]: 2 } });
    assert.equal(maxAbs(auto, await image(asked, c)), 0, "auto's factors are adapterMode factors");
    const merged = await Pipeline.load(c.bundle, { ...options, adapterMode: "inputs", adapters: { [small]: 2 } });
    results["auto/one-layer-against-inputs"] = maxAbs(auto, await image(merged, c));
    results["auto/one-layer-against-base"] = maxAbs(auto, read(c.base));
    assert.ok(results["auto/one-layer-against-base"] > 1e-3, `the one layer changes the image: ${results["auto/one-layer-against-base"]}`);
    assert.ok(results["auto/one-layer-against-inputs"] <= TOLERANCE, `factors against the merge: ${results["auto/one-layer-against-inputs"]}`);
    // A large adapter with a small one: the share is of both, so auto merges; back to the small one, factors again.
    await pipe.setAdapters({ [small]: 2, [c.adapter]: c.weight });
    assert.deepEqual(pipe.adapterModes, { text_encoder: "inputs", unet: "inputs" });
    assert.deepEqual(Object.keys(pipe.factorGraphs), [], "a component that leaves factors drops its factor-inputs session");
    await pipe.setAdapters({ [small]: 2 });
    assert.deepEqual(pipe.adapterModes, { unet: "factors" });
    assert.equal(maxAbs(await image(pipe, c), auto), 0, "small -> both -> small");
    // modeFor's refusals, each one line, and where auto then goes
    const unet = /** @type {any} */ (pipe).modeFor.bind(pipe, "unet");
    const terms = [[one, 2]];
    const stored = maps.unet.variants[pipe.variants.unet.variant.name];
    const withVariant = (changes) => ({ ...maps.unet, variants: { ...maps.unet.variants, [pipe.variants.unet.variant.name]: { ...stored, ...changes } } });
    const refusals = [
      [withVariant({ factor_inputs_graph: undefined }), "the bundle has no factor-inputs graph for its unet: re-export it"],
      [withVariant({ factor_inputs: stored.factor_inputs.filter((name) => name !== layer.weight) }), "the bundle's unet factor-inputs graph has no branch for some weights they adapt"],
    ];
    for (const [map, reason] of refusals) {
      assert.equal(unet(map, terms), "inputs", `auto without factors: ${reason}`);
      pipe.adapterMode = "factors";
      assert.throws(() => unet(map, terms), (error) => error instanceof AdapterError && error.message === `adapterMode="factors": ${reason}, or pass adapterMode "auto"`);
      pipe.adapterMode = "auto";
    }
    assert.throws(
      () => factorInputs(refusals[1][0], pipe.variants.unet.variant, terms),
      (error) => error instanceof AdapterError && error.message === `the unet weight '${layer.weight}' (${maps.unet.weights[layer.weight].module}) has no factor branch in this bundle: pass adapterMode "auto" (or "inputs" / "rebuild")`,
    );
    pipe.backend = "webgpu"; // what modeFor decides on WebGPU: factors refused, auto falls through to rebuild
    try {
      assert.equal(unet(maps.unet, terms), "rebuild");
      pipe.adapterMode = "factors";
      assert.throws(() => unet(maps.unet, terms), (error) => error instanceof AdapterError && error.message === `adapterMode="factors": backend "webgpu" does not run adapters as factor inputs: load with backend "node" or "wasm", or pass adapterMode "auto"`);
    } finally {
      pipe.backend = "node";
      pipe.adapterMode = "auto";
    }
  });

  test("a bad adapterMode, adapterMode inputs or factors on an INT8 variant: one line each", async () => {
    const c = index.adapters.find((entry) => entry.name === "fp32");
    for (const adapterMode of ["merge", "", null, 1]) {
      await assert.rejects(
        Pipeline.load(c.bundle, { backend: "node", adapterMode }),
        (error) => error instanceof UserError && error.message === `adapterMode=${JSON.stringify(adapterMode)}: pick one of auto, factors, inputs, rebuild`,
      );
    }
    const int8 = index.adapters.find((entry) => entry.name === "int8");
    await assert.rejects(
      Pipeline.load(int8.bundle, { backend: "node", precision: "int8", adapterMode: "inputs", adapters: { [int8.adapter]: int8.weight } }),
      (error) => error instanceof AdapterError && /^adapterMode="inputs": the text_encoder runs an int8 variant: load with precision "fp32", or pass adapterMode "auto"$/.test(error.message),
    );
    await assert.rejects(
      Pipeline.load(int8.bundle, { backend: "node", precision: "int8", adapterMode: "factors", adapters: { [int8.adapter]: int8.weight } }),
      (error) => error instanceof AdapterError && error.message === 'adapterMode="factors": the text_encoder runs an int8 variant: load with precision "fp32", or pass adapterMode "auto"',
    );
  });

  test("the frame loop switches between frames only; a batched stream with frames in flight refuses", async () => {
    const c = index.adapters[0];
    const options = { strength: 0.5, numInferenceSteps: 4, seed: 3 };
    const adapted = await Pipeline.load(c.bundle, { backend: "node", precision: c.name, adapters: { [c.adapter]: c.weight } });
    const { default_height: height, default_width: width } = adapted.manifest.pipeline;
    const frames = [1, 2].map((k) => ({ width, height, data: Float32Array.from({ length: height * width * 3 }, (_, i) => ((i * 7 + k * 13) % 17) / 16) }));
    const expected = (await (await adapted.stream("a cat", options)).process(frames[1])).data;
    const pipe = await Pipeline.load(c.bundle, { backend: "node", precision: c.name });
    const plain = (await (await pipe.stream("a cat", options)).process(frames[1])).data;
    assert.ok(maxAbs(expected, plain) > 1e-2, "the adapter changes the frame (the check can fail)");
    const stream = await pipe.stream("a cat", options);
    await stream.process(frames[0]);
    await pipe.setAdapters({ [c.adapter]: c.weight });
    results["stream/switched"] = maxAbs((await stream.process(frames[1])).data, expected);
    assert.ok(results["stream/switched"] <= TOLERANCE, `the frame after a switch: max abs ${results["stream/switched"]}`);
    await pipe.setAdapters({});
    assert.equal(maxAbs((await stream.process(frames[1])).data, plain), 0, "back to the base");
    const batched = await pipe.stream("a cat", { ...options, batchSteps: true });
    assert.equal(await batched.push(frames[0]), null);
    await assert.rejects(pipe.setAdapters({ [c.adapter]: c.weight }), (error) => error instanceof AdapterError && /^setAdapters: 1 frame\(s\) of a step-batched stream are in flight/.test(error.message));
    assert.deepEqual(pipe.adapters, {});
    assert.equal((await batched.flush()).length, 1);
    await pipe.setAdapters({ [c.adapter]: c.weight });
    assert.deepEqual(pipe.adapters, { [c.adapter]: c.weight });
  });

  test("an adapter made for another bundle, a bad weight: one AdapterError naming the file", async () => {
    const c = index.adapters[0];
    await assert.rejects(
      Pipeline.load(index.adapters_other_bundle, { backend: "node", adapters: { [c.adapter]: 1 } }),
      (error) => error instanceof AdapterError && error.message.startsWith(`adapter '${c.adapter}' was made for another bundle (its `),
    );
    const pipe = await Pipeline.load(c.bundle, { backend: "node", precision: c.name });
    for (const weight of [NaN, Infinity, "0.5", true]) {
      await assert.rejects(pipe.setAdapters({ [c.adapter]: weight }), (error) => error instanceof AdapterError && /is not a finite number: pass e\.g\. 0\.8$/.test(error.message));
    }
    await assert.rejects(pipe.setAdapters([c.adapter]), (error) => error instanceof AdapterError && /pass an object/.test(error.message));
    await assert.rejects(pipe.setAdapters({ [join(folder, "index.json")]: 1 }), (error) => error instanceof AdapterError && /is not a safetensors file/.test(error.message));
    assert.deepEqual(pipe.adapters, {});
  });
});
