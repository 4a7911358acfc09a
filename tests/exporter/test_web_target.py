"""``--target web`` (issue 25): an ONNX bundle with the variants onnxruntime-web's backends want, no file too big.

The tiny model's weights are a few MB, so the file limit is made small here (``MAX_FILE_BYTES`` below, patched into
the web target) to force what a full-size model gets: external data split over several files. The bundle must hold
fp32 everywhere, fp16 text encoder and U-Net (the tiny VAE sets force_upcast: it stays fp32), the INT8 U-Net with
``--precision int8``; validate against docs/manifest.schema.json; run on the Python runtime as the ONNX target's
bundle does; and make the JavaScript runtime's ``auto`` run what ``backend_variants`` says (onnxruntime-web's WASM
backend in Node, external data passed as ``externalData``).
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
from pathlib import Path

import jsonschema
import numpy as np
import pytest

import lcm_export.targets.web as web_target
from lcm_export.errors import BundleError
from lcm_export.runtime import Pipeline
from lcm_export.runtime.manifest import MANIFEST_NAME, load_manifest
from tests.helpers import PROMPT, TOLERANCE, export, random_inputs

REPOSITORY = Path(__file__).resolve().parents[2]
JS = REPOSITORY / "js"
MAX_FILE_BYTES = 300_000  # the tiny model's components are 0.3-6.4 MB: every one gets external data
FP16_IMAGE_TOLERANCE = 0.05  # max abs of an fp16 (or INT8 on WASM) image against the fp32 / CPU one
NODE_TIMEOUT = 240


@pytest.fixture(scope="module")
def small_files():
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(web_target, "TARGET", dataclasses.replace(web_target.TARGET, max_file_bytes=MAX_FILE_BYTES))
        yield


@pytest.fixture(scope="module")
def web_bundle(small_files, tiny_lcm_dir, tmp_path_factory) -> Path:
    return export(tiny_lcm_dir, tmp_path_factory.mktemp("web") / "fp32", target="web")


@pytest.fixture(scope="module")
def web_int8_bundle(small_files, tiny_lcm_dir, tmp_path_factory) -> Path:
    return export(
        tiny_lcm_dir,
        tmp_path_factory.mktemp("web") / "int8",
        target="web",
        precision="int8",
        calibration_size=2,
        calibration_resolution=32,
    )


def _variants(bundle: Path) -> dict[str, list[str]]:
    manifest = load_manifest(bundle)
    return {name: [variant.name for variant in c.variants] for name, c in manifest.components.items()}


def _largest_tensor(onnx_path: Path) -> int:
    """Bytes of the largest external tensor of ``onnx_path`` (a tensor is never split over files)."""
    import onnx
    from onnx.external_data_helper import ExternalDataInfo, _get_all_tensors, uses_external_data

    model = onnx.load(str(onnx_path), load_external_data=False)
    sizes = [ExternalDataInfo(t).length for t in _get_all_tensors(model) if uses_external_data(t)]
    return max(sizes, default=0)


def test_the_web_bundle_has_the_variants_each_backend_wants(web_bundle, web_int8_bundle) -> None:
    assert _variants(web_bundle) == {
        "text_encoder": ["fp32", "fp16"],
        "unet": ["fp32", "fp16"],
        "vae_decoder": ["fp32"],  # force_upcast: the fp16 rule keeps it fp32
        "vae_encoder": ["fp32"],
    }
    assert _variants(web_int8_bundle)["unet"] == ["int8-qdq", "fp32", "fp16"]
    assert _variants(web_int8_bundle)["vae_decoder"] == ["fp32"]  # the INT8 decoder is the CPU targets' (onnx)
    fp32 = json.loads((web_bundle / MANIFEST_NAME).read_text())
    int8 = json.loads((web_int8_bundle / MANIFEST_NAME).read_text())
    assert (fp32["target"], fp32["precision"]) == ("web", "fp32")
    assert fp32["backend_variants"] == {"webgpu": ["fp16", "fp32"], "wasm": ["fp32"]}
    assert (int8["precision"], int8["backend_variants"]) == (
        "int8",
        {"webgpu": ["fp16", "fp32"], "wasm": ["int8", "fp32"]},
    )
    assert "kept_fp32" in fp32["components"]["vae_decoder"]["variants"][0]["produced_by"]
    schema = json.loads((REPOSITORY / "docs" / "manifest.schema.json").read_text())
    for manifest in (fp32, int8):
        jsonschema.Draft202012Validator(schema).validate(manifest)


@pytest.mark.parametrize("which", ["float", "int8"])
def test_no_file_passes_the_limit_and_weights_are_external_data(which, web_bundle, web_int8_bundle) -> None:
    bundle = web_bundle if which == "float" else web_int8_bundle
    manifest = load_manifest(bundle)
    for name, component in manifest.components.items():
        for variant in component.variants:
            data_files = [file for file in variant.files if file != variant.path]
            assert data_files, f"{name} {variant.name}: no external data"
            limit = max(MAX_FILE_BYTES, _largest_tensor(bundle / variant.path))
            for file in data_files:
                assert (bundle / file).stat().st_size <= limit, file
            # The graph and the tensors under 1 KB stay in the protobuf (an SD U-Net's: about 1 MB).
            assert (bundle / variant.path).stat().st_size <= 2 * MAX_FILE_BYTES, variant.path
    listed = {entry.path for entry in manifest.files}
    on_disk = {path.relative_to(bundle).as_posix() for path in bundle.rglob("*") if path.name != MANIFEST_NAME}
    assert listed == {path for path in on_disk if (bundle / path).is_file()}  # the quantizer's data file is gone
    unet = manifest.components["unet"].variants[1 if which == "int8" else 0]
    assert unet.files[:3] == ("unet/model.onnx", "unet/model.onnx_data", "unet/model.onnx_data_2")


def test_a_backend_preference_no_variant_meets_is_refused(web_bundle, tmp_path) -> None:
    bundle = tmp_path / "bundle"
    shutil.copytree(web_bundle, bundle)
    data = json.loads((bundle / MANIFEST_NAME).read_text())
    data["backend_variants"] = {"wasm": ["int8", "fp32"]}
    (bundle / MANIFEST_NAME).write_text(json.dumps(data))
    with pytest.raises(BundleError, match=r"backend_variants\.wasm\[0\].*no onnx variant has \(they have fp16, fp32\)"):
        load_manifest(bundle)
    data["backend_variants"] = {"wasm": ["fp32", "fp32"]}
    (bundle / MANIFEST_NAME).write_text(json.dumps(data))
    with pytest.raises(BundleError, match=r"backend_variants\.wasm\[1\].*repeats"):
        load_manifest(bundle)
    data["backend_variants"] = {"onnxruntime": ["fp16"]}
    (bundle / MANIFEST_NAME).write_text(json.dumps(data))
    with pytest.raises(BundleError, match=r"backend_variants\.onnxruntime.*is not a backend"):
        load_manifest(bundle)


def _image(bundle: Path, variant: str = "auto") -> np.ndarray:
    pipe = Pipeline.load(bundle, backend="onnxruntime", variant=variant, precision="fp32")
    info = pipe.manifest.pipeline
    shape = (1, info.latent_channels, info.default_height // 8, info.default_width // 8)
    latents, noise = random_inputs(shape, 4)
    return pipe(PROMPT, num_inference_steps=4, latents=latents, noise=noise).images


def test_the_python_runtime_runs_it_as_the_onnx_bundle(web_bundle, tiny_lcm_bundle) -> None:
    reference = _image(tiny_lcm_bundle)
    assert Pipeline.load(web_bundle, backend="onnxruntime").variants["unet"].name == "fp32"  # auto: the first
    assert np.abs(_image(web_bundle) - reference).max() <= 1e-6
    fp16 = _image(web_bundle, "fp16")
    assert np.isfinite(fp16).all() and np.abs(fp16 - reference).max() <= FP16_IMAGE_TOLERANCE


NODE_SCRIPT = """
import { writeFileSync } from "node:fs";
import { Pipeline, parseManifest } from "./src/index.js";
import { backendPreference, chooseVariants } from "./src/variants.js";
import { readFileSync } from "node:fs";
const [bundle, out] = process.argv.slice(2);
const manifest = parseManifest(readFileSync(`${bundle}/manifest.json`, "utf8"), bundle);
const names = ["text_encoder", "unet", "vae_decoder"];
const result = { chosen: {} };
for (const backend of ["webgpu", "wasm", "node"]) {
  // as openBackend opens each (fp16: a WebGPU adapter with shader-f16)
  const preferred = backendPreference(manifest, { name: backend, fp16: true });
  if (backend === "webgpu") result.noF16 = backendPreference(manifest, { name: backend, fp16: false });
  const choices = chooseVariants(manifest, names, "onnx", "auto", bundle, preferred);
  result.chosen[backend] = Object.fromEntries(names.map((n) => [n, choices[n].variant.name]));
}
for (const precision of ["auto", "fp16"]) {
  const pipe = await Pipeline.load(bundle, { backend: "wasm", precision });
  const image = (await pipe.generate("a photo of a cat", { numInferenceSteps: 4, seed: 0 })).images[0];
  writeFileSync(`${out}-${precision}.f32`, Buffer.from(image.data.buffer));
  result[precision] = Object.fromEntries(names.map((n) => [n, pipe.variants[n].variant.name]));
}
console.log(JSON.stringify(result));
"""


def _node(bundle: Path, folder: Path) -> dict:
    if not (JS / "node_modules").is_dir() or shutil.which("node") is None:
        pytest.skip("node or js/node_modules is missing (make setup-all)")
    folder.mkdir(parents=True, exist_ok=True)
    script = JS / f".web-target-test-{folder.name}.mjs"  # beside src/ so that its imports resolve
    script.write_text(NODE_SCRIPT)
    try:
        result = subprocess.run(
            ["node", str(script), str(bundle), str(folder / "image")],
            cwd=JS,
            capture_output=True,
            text=True,
            timeout=NODE_TIMEOUT,
        )
    finally:
        script.unlink()
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def _python_seed_image(bundle: Path, variant: str) -> np.ndarray:
    pipe = Pipeline.load(bundle, backend="onnxruntime", variant=variant, precision="fp32")
    return pipe(PROMPT, num_inference_steps=4, seed=0).images[0]


def _node_image(folder: Path, precision: str, like: np.ndarray) -> np.ndarray:
    return np.fromfile(folder / f"image-{precision}.f32", dtype=np.float32).reshape(like.shape)


def test_the_js_runtime_auto_follows_backend_variants_on_wasm(web_bundle, web_int8_bundle, tmp_path) -> None:
    fp32 = _node(web_bundle, tmp_path / "fp32")
    int8 = _node(web_int8_bundle, tmp_path / "int8")
    gpu = {"text_encoder": "fp16", "unet": "fp16", "vae_decoder": "fp32"}
    floats = {"text_encoder": "fp32", "unet": "fp32", "vae_decoder": "fp32"}
    assert fp32["chosen"] == {"webgpu": gpu, "wasm": floats, "node": floats}
    assert fp32["auto"] == floats and fp32["fp16"] == gpu
    assert fp32["noF16"] == int8["noF16"] == ["fp32"]  # a WebGPU adapter without shader-f16 runs fp32
    int8_unet = {**floats, "unet": "int8-qdq"}
    assert int8["chosen"] == {"webgpu": gpu, "wasm": int8_unet, "node": int8_unet}  # node: the first listed
    assert int8["auto"] == int8_unet and int8["fp16"] == gpu
    # onnxruntime-web's WASM backend, the weights as externalData, against the Python runtime (the same seed).
    reference = _python_seed_image(web_bundle, "fp32")
    assert np.abs(_node_image(tmp_path / "fp32", "auto", reference) - reference).max() <= TOLERANCE
    fp16 = _python_seed_image(web_bundle, "fp16")
    assert np.abs(_node_image(tmp_path / "fp32", "fp16", fp16) - fp16).max() <= FP16_IMAGE_TOLERANCE
    int8_reference = _python_seed_image(web_int8_bundle, "auto")
    assert np.abs(_node_image(tmp_path / "int8", "auto", int8_reference) - int8_reference).max() <= (
        FP16_IMAGE_TOLERANCE
    )
