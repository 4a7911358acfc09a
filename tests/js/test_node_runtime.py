"""The JavaScript runtime (js/, package lcm-edge) against the Python runtime, driven from pytest.

Tiny bundles are exported (distilled LCM, LCM-LoRA with CFG, SDXL, tiny VAE, INT8, a CFG bundle with two
ControlNets, a web bundle with fp16 variants for the adapter cases); the Python runtime writes its
images for fixed latents/noise and for seeds, and its frame loop's frames (unbatched and step-batched), as float32
raw files and an index.json into a temp folder; then ``node --test`` in js/ reads them (``LCM_EDGE_REFERENCES``) and
checks onnxruntime-node and onnxruntime-web's WASM backend against them, the shared generator's draws, the
tokenizer ids, and the errors of bad bundles.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import onnxruntime
import pytest

from lcm_export.runtime import Pipeline
from lcm_export.runtime.manifest import load_manifest
from lcm_export.runtime.philox import standard_normal
from lcm_export.runtime.tokenizer import PromptTokenizer
from tests.helpers import PlainSession, run_as_specified

JS = Path(__file__).resolve().parents[2] / "js"
NODE_TIMEOUT = 900  # the whole node suite: ~2-3 min alone on 2 cores, 5 min beside other jobs
# The adapter case on the web bundle's fp16 variants: the base image (no adapter) already differs from the Python
# runtime's by up to 1.7e-4 on both backends (the fp16 casts of the I/O and fp16 kernels), the adapted one as much.
FP16_TOLERANCE = {"node": 5e-4, "wasm": 5e-4}

PROMPTS = [
    "",
    "a photo of a cat",
    "A Photo Of A Cat",
    "a photo of a cat, highly detailed, 4k, trending on artstation",
    "an astronaut riding a horse on mars",
    "  leading and trailing spaces  ",
    "multiple   spaces\tand\ttabs\nand newlines",
    "punctuation!!! ??? ... ,,, ;;; ::",
    "numbers 0123456789 3.14159 1,000,000",
    "don't can't won't it's we're",
    "hyphen-ated and under_scored and slash/ed",
    "(parentheses) [brackets] {braces} <angles>",
    "quotes 'single' \"double\" `back`",
    "emoji 🐱🚀✨🔥 and 👩‍👩‍👧‍👦 family",
    "🐈",
    "café naïve résumé façade",
    "Ünïcødé Ŝţŕïñğ",
    "日本語のテキスト",
    "中文提示词：一只猫",
    "한국어 고양이",
    "русский текст кошка",
    "ελληνικά γάτα",
    "עברית חתול",
    "العربية قطة",
    "हिन्दी बिल्ली",
    "ไทย แมว",
    "mixed 日本 and english and émoji 😺",
    "ALL CAPS PROMPT",
    "<|startoftext|> special tokens <|endoftext|>",
    "a" * 300,
    "word " * 100,
    "a very long prompt " * 20,
    "zero\u200bwidth\u200bspace",
    "combining e\u0301 accents",
    "ﬁ ligature and ＦＵＬＬＷＩＤＴＨ",
    "tab\tseparated\tvalues",
    "html &amp; entities &lt;b&gt;",
    "url https://example.com/path?x=1&y=2",
    "email someone@example.com",
    "math ∑ ∫ √ ∞ ≈ ≠",
    "currency $ € £ ¥ ₹",
    "arrows ← → ↑ ↓",
    "box drawing ┌─┐",
    "dingbats ✂ ✈ ☎",
    "the the the the",
    "x",
    "1",
    "!",
    "    ",
    "a\u00a0non-breaking\u00a0space",
    "portrait of a woman, oil painting, by rembrandt",
    "cyberpunk city at night, neon lights, rain",
    "a bowl of fruit on a wooden table",
    "isometric low poly island",
]


def _write(folder: Path, name: str, array: np.ndarray) -> dict:
    array = np.ascontiguousarray(array, dtype=np.float32)
    (folder / f"{name}.f32").write_bytes(array.tobytes())
    return {"file": f"{name}.f32", "shape": list(array.shape)}


def _export(model: Path | str, output: Path, **options) -> Path:
    from lcm_export.exporter.bundle import ExportConfig, export_bundle

    export_bundle(ExportConfig(model=str(model), output=output, quiet=True, **options))
    return output


@pytest.fixture(scope="module")
def references(tmp_path_factory, tiny_lcm_dir, tiny_lcm_bundle, tiny_cfg_bundle, sdxl_lcm_bundle, tiny_vae_dir):
    if not (JS / "node_modules").is_dir():
        pytest.skip("js/node_modules is missing: run `cd js && ONNXRUNTIME_NODE_INSTALL=skip npm ci` (make setup-all)")
    if shutil.which("node") is None:
        pytest.skip("node is not installed: the JavaScript runtime needs Node 20+")
    folder = tmp_path_factory.mktemp("js-references")
    bundles = tmp_path_factory.mktemp("js-bundles")
    tiny_vae = _export(tiny_lcm_dir, bundles / "tiny-vae", tiny_vae=str(tiny_vae_dir))
    int8 = _export(tiny_lcm_dir, bundles / "int8", precision="int8", calibration_size=2, calibration_resolution=32)
    controlnet = _controlnet_bundle(bundles)
    index: dict = {"cases": [], "streams": [], "draws": [], "tokenizers": [], "bad_bundles": [], "control_errors": []}
    rng = np.random.default_rng(2026)

    def add_case(
        name,
        bundle,
        mode,
        *,
        prompt="a photo of a cat",
        steps=4,
        guidance=None,
        seed=None,
        tolerance=None,
        backends=None,
        control=None,
        **extra,
    ):
        pipe = Pipeline.load(bundle, backend="onnxruntime", precision="fp32")
        info = pipe.manifest.pipeline
        case = {"name": name, "bundle": str(bundle), "mode": mode, "prompt": prompt, "steps": steps}
        if tolerance is not None:
            case["tolerance"] = tolerance
        if backends is not None:
            case["backends"] = backends
        if guidance is not None:
            case["guidance"] = guidance
        height, width = info.default_height, info.default_width
        shape = (1, info.latent_channels, height // info.vae_scale_factor, width // info.vae_scale_factor)
        control_kwargs = {}
        if control is not None:  # ControlNet: random control images (one per ControlNet) and the window/scales
            images = [rng.uniform(0, 1, (height, width, 3)).astype(np.float32) for _ in range(control.pop("count"))]
            case["control"] = {"images": [_write(folder, f"{name}-control{i}", im) for i, im in enumerate(images)]}
            case["control"].update(control)
            names = {"scale": "controlnet_conditioning_scale", "start": "control_guidance_start"}
            control_kwargs = {names.get(key, "control_guidance_end"): value for key, value in control.items()}
            control_kwargs["control_image"] = images
        if mode == "txt2img":
            kwargs = {}
            if seed is None:
                latents = rng.standard_normal(shape).astype(np.float32)
                noise = [rng.standard_normal(shape).astype(np.float32) for _ in range(steps - 1)]
                kwargs = {"latents": latents, "noise": noise}
                case["latents"] = _write(folder, f"{name}-latents", latents)
                case["noise"] = [_write(folder, f"{name}-noise{i}", n) for i, n in enumerate(noise)]
            else:
                case["seed"] = str(seed)
            out = pipe(
                prompt, num_inference_steps=steps, guidance_scale=guidance, seed=seed, **kwargs, **control_kwargs
            )
        else:
            strength = extra["strength"]
            case["strength"] = strength
            image = rng.uniform(0, 1, (height, width, 3)).astype(np.float32)
            case["image"] = _write(folder, f"{name}-image", image)
            kwargs = {}
            if seed is None:
                rows = len(pipe.denoiser.scheduler.table(steps, strength).timesteps)
                if info.vae != "autoencoder_tiny":
                    kwargs["sample_noise"] = rng.standard_normal(shape).astype(np.float32)
                    case["sampleNoise"] = _write(folder, f"{name}-sample-noise", kwargs["sample_noise"])
                kwargs["image_noise"] = rng.standard_normal(shape).astype(np.float32)
                case["imageNoise"] = _write(folder, f"{name}-image-noise", kwargs["image_noise"])
                kwargs["noise"] = [rng.standard_normal(shape).astype(np.float32) for _ in range(rows - 1)]
                case["noise"] = [_write(folder, f"{name}-noise{i}", n) for i, n in enumerate(kwargs["noise"])]
            else:
                case["seed"] = str(seed)
            out = pipe.img2img(
                image,
                prompt,
                strength=strength,
                num_inference_steps=steps,
                guidance_scale=guidance,
                seed=seed,
                **kwargs,
                **control_kwargs,
            )
        case["expected"] = _write(folder, f"{name}-expected", out.images)
        index["cases"].append(case)

    add_case("lcm", tiny_lcm_bundle, "txt2img")
    add_case("lcm-seed", tiny_lcm_bundle, "txt2img", seed=0)
    add_case("lcm-seed-big", tiny_lcm_bundle, "txt2img", seed=2**63 + 12345, steps=2)
    add_case("cfg-g1", tiny_cfg_bundle, "txt2img", guidance=1.0)
    add_case("cfg-g2", tiny_cfg_bundle, "txt2img", guidance=2.0)
    add_case("cfg-g2-seed", tiny_cfg_bundle, "txt2img", guidance=2.0, seed=3)
    add_case("sdxl", sdxl_lcm_bundle, "txt2img")
    add_case("sdxl-seed", sdxl_lcm_bundle, "txt2img", seed=5)
    add_case("img2img-0.5", tiny_lcm_bundle, "img2img", strength=0.5)
    add_case("img2img-0.8", tiny_lcm_bundle, "img2img", strength=0.8)
    add_case("img2img-seed", tiny_lcm_bundle, "img2img", strength=0.5, seed=1)
    add_case("cfg-img2img-0.5", tiny_cfg_bundle, "img2img", strength=0.5, guidance=2.0)
    add_case("tiny-vae", tiny_vae, "txt2img")
    add_case("tiny-vae-img2img", tiny_vae, "img2img", strength=0.5, seed=2)
    # INT8 on WASM is not held to a max abs bound: js/test/int8.test.js checks what its difference is made of
    # (docs/design-notes.md, "JavaScript runtime"), from the references _int8_probe writes.
    add_case("int8", int8, "txt2img", seed=4, backends=["node"])
    index["int8"] = _int8_probe(int8, tiny_lcm_bundle, folder, seed=4)

    # ControlNet (both ControlNets on both CFG halves; the second only in the middle half of the steps; scales per
    # call; the manifest's scales; no control image: zero residuals; img2img).
    window = {"count": 2, "scale": [0.7, 1.2], "start": [0.0, 0.25], "end": [1.0, 0.75]}
    add_case("controlnet-cfg-window", controlnet, "txt2img", guidance=2.0, control=window)
    add_case("controlnet-g1-seed", controlnet, "txt2img", guidance=1.0, seed=6, control={"count": 2})
    add_case("controlnet-no-image", controlnet, "txt2img", guidance=2.0, seed=7)
    edit = {"count": 2, "scale": 0.8}
    add_case("controlnet-img2img", controlnet, "img2img", strength=0.5, guidance=2.0, control=edit)
    index["control_errors"] = [
        {"bundle": str(tiny_lcm_bundle), "images": 1, "match": "has no ControlNet: re-export it with --controlnet CN"},
        {"bundle": str(controlnet), "images": 1, "match": "the bundle has 2 ControlNet(s) and 1 image(s) were given"},
        {"bundle": str(controlnet), "images": 2, "size": 48, "match": "(it is not resized)"},
    ]

    def add_stream(name, bundle, *, steps=4, strength=0.5, guidance=None, seed=3, batch_steps=False, frames=4):
        """The Python frame loop's outputs for blocky random frames (structure the tiny VAE keeps): which pushes
        returned a frame, and the frames in output order."""
        pipe = Pipeline.load(bundle, backend="onnxruntime", precision="fp32")
        info = pipe.manifest.pipeline
        height, width = info.default_height, info.default_width
        blocks = [rng.random((height // 4, width // 4, 3)) for _ in range(frames)]
        inputs = [np.kron(block, np.ones((4, 4, 1))).astype(np.float32) for block in blocks]
        stream = pipe.stream(
            "a photo of a cat",
            strength=strength,
            num_inference_steps=steps,
            guidance_scale=guidance,
            seed=seed,
            batch_steps=batch_steps,
        )
        pushed = [stream.push(frame) for frame in inputs]
        outputs = [image for image in pushed if image is not None] + stream.flush()
        index["streams"].append(
            {
                "name": name,
                "bundle": str(bundle),
                "prompt": "a photo of a cat",
                "steps": steps,
                "strength": strength,
                "guidance": guidance,
                "seed": str(seed),
                "batchSteps": batch_steps,
                "stepsRun": stream.steps,
                "pushedFrame": [image is not None for image in pushed],
                "frames": [_write(folder, f"{name}-frame{i}", frame) for i, frame in enumerate(inputs)],
                "expected": [_write(folder, f"{name}-out{i}", image) for i, image in enumerate(outputs)],
            }
        )

    add_stream("stream-lcm", tiny_lcm_bundle)
    add_stream("stream-lcm-batched", tiny_lcm_bundle, batch_steps=True, frames=5)
    add_stream("stream-cfg-batched", tiny_cfg_bundle, steps=8, guidance=1.5, batch_steps=True, seed=2**63 + 5)
    add_stream("stream-sdxl-batched", sdxl_lcm_bundle, steps=2, strength=0.8, batch_steps=True, frames=3)
    add_stream("stream-tiny-vae", tiny_vae, steps=2, frames=2)
    web = _export(tiny_lcm_dir, bundles / "web", target="web")  # fp32 and fp16 variants
    adapted = {"fp32": tiny_lcm_bundle, "int8": int8, "fp16": web}
    index["adapters"] = _adapter_cases(folder, bundles, tiny_lcm_dir, adapted)
    index["adapters_other_bundle"] = str(tiny_cfg_bundle)

    for seed, tensor_index, size in [(0, 0, 4096), (1, 3, 1023), (2**64 - 1, 1, 777), (2**32 + 7, 0, 100)]:
        entry = _write(folder, f"draws-{seed}-{tensor_index}", standard_normal(seed, tensor_index, (size,)))
        index["draws"].append({"seed": str(seed), "tensor": tensor_index, **entry})

    warnings.simplefilter("ignore", UserWarning)  # the long prompts are truncated on purpose
    for bundle in (tiny_lcm_bundle, sdxl_lcm_bundle):
        manifest = load_manifest(bundle, verify="size")
        for info in manifest.tokenizers:
            ids = PromptTokenizer(bundle, info)(PROMPTS)
            index["tokenizers"].append(
                {
                    "path": str(bundle / info.path),
                    "max_length": info.max_length,
                    "pad_id": info.pad_id,
                    "prompts": PROMPTS,
                    "ids": ids.tolist(),
                }
            )

    index["bad_bundles"] = _bad_bundles(tiny_lcm_bundle, bundles)
    (folder / "index.json").write_text(json.dumps(index))
    return folder


def _int8_probe(int8: Path, fp32: Path, folder: Path, seed: int) -> dict:
    """What js/test/int8.test.js needs to show where WASM's INT8 images differ from the Python runtime's.

    - ``calls``: the feeds of each U-Net call of the Python INT8 pipeline (seed ``seed``), and per call the output of
      every QuantizeLinear of the QDQ U-Net (and its float input) with the graph run as its ops say
      (ORT_DISABLE_ALL: QuantizeLinear, DequantizeLinear, float Conv/MatMul), from ``probe.onnx``: that U-Net with
      each quantiser's input and output made graph outputs; ``fp32_out``: the fp32 U-Net's output on the same feeds.
    - ``images``: the fp32 bundle's image, the INT8 bundle's with the QDQ graphs run as their ops say (the float QDQ
      reference) and with onnxruntime's fused integer kernels (the Python runtime as it runs, ORT_ENABLE_ALL).
    """
    import onnx
    from onnx import numpy_helper

    pipe = Pipeline.load(int8, backend="onnxruntime", precision="fp32")
    calls: list[dict[str, np.ndarray]] = []
    run = pipe.denoiser._run

    def recording(component: str, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if component == "unet":
            calls.append({name: np.asarray(value, np.float32) for name, value in feeds.items()})
        return run(component, feeds)

    pipe.denoiser._run = recording
    fused = pipe("a photo of a cat", seed=seed).images[0]
    pipe.denoiser._run = run
    reference = run_as_specified(pipe, int8)("a photo of a cat", seed=seed).images[0]
    float_image = Pipeline.load(fp32, backend="onnxruntime", precision="fp32")("a photo of a cat", seed=seed).images[0]

    model = onnx.load(str(int8 / pipe.variants["unet"].artifact.path))
    initializers = {tensor.name: tensor for tensor in model.graph.initializer}
    quantizers = []
    for node in model.graph.node:  # in the graph's (topological) order
        if node.op_type != "QuantizeLinear":
            continue
        scale = numpy_helper.to_array(initializers[node.input[1]])
        zero = numpy_helper.to_array(initializers[node.input[2]]) if len(node.input) > 2 else np.zeros((), np.uint8)
        assert scale.size == 1, f"{node.name}: a per-tensor activation scale"
        quantizers.append(
            {"input": node.input[0], "output": node.output[0], "scale": float(scale), "zero_point": int(zero)}
        )
        for name in (node.input[0], node.output[0]):
            model.graph.output.append(onnx.helper.make_empty_tensor_value_info(name))
    probe_path = folder / "int8-probe.onnx"
    onnx.save(model, str(probe_path))
    probe = PlainSession(probe_path, onnxruntime.GraphOptimizationLevel.ORT_DISABLE_ALL)
    fp32_unet = PlainSession(fp32 / "unet" / "model.onnx", onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL)
    entries = []
    for number, feeds in enumerate(calls):
        outputs = probe.run(feeds)
        entry = {
            "feeds": {name: _write(folder, f"int8-call{number}-{name}", value) for name, value in feeds.items()},
            "fp32_out": _write(folder, f"int8-call{number}-fp32-out", fp32_unet.run(feeds)["out_sample"]),
            "qdq_out": _write(folder, f"int8-call{number}-qdq-out", outputs["out_sample"]),
            "quantizers": [],
        }
        for k, quantizer in enumerate(quantizers):
            integers = outputs[quantizer["output"]]
            (folder / f"int8-call{number}-q{k}.bin").write_bytes(np.ascontiguousarray(integers).tobytes())
            entry["quantizers"].append(
                {
                    "file": f"int8-call{number}-q{k}.bin",
                    "dtype": str(integers.dtype),
                    "input": _write(folder, f"int8-call{number}-q{k}-input", outputs[quantizer["input"]])["file"],
                }
            )
        entries.append(entry)
    return {
        "model": probe_path.name,
        "quantizers": quantizers,
        "calls": entries,
        "images": {
            "fp32": _write(folder, "int8-fp32-image", float_image),
            "reference": _write(folder, "int8-reference-image", reference),
            "fused": _write(folder, "int8-fused-image", fused),
        },
    }


def _controlnet_bundle(folder: Path) -> Path:
    """A tiny base SD with a LoRA fused (classifier-free guidance) and two random ControlNets (scales 1.0, 0.5)."""
    from lcm_export.exporter.bundle import LoraSource
    from lcm_export.exporter.controlnet import ControlNetSource
    from lcm_export.exporter.tiny import TinyPipelineConfig, build_controlnet, build_tiny_lora, build_tiny_pipeline

    base = build_tiny_pipeline(folder / "controlnet-base", TinyPipelineConfig(kind="sd", seed=4))
    lora = build_tiny_lora(folder / "controlnet-lora.safetensors", base, rank=4, target_modules=("to_q", "to_v"))
    nets = [build_controlnet(folder / f"controlnet-{index}", base, seed=10 + index) for index in range(2)]
    sources = tuple(ControlNetSource(str(path), 1.0 / (index + 1)) for index, path in enumerate(nets))
    return _export(base, folder / "controlnet", loras=(LoraSource(str(lora)),), controlnets=sources)


def _adapter_cases(folder: Path, work: Path, model: Path, bundles: dict[str, Path]) -> list[dict]:
    """Run-time adapters: a rank-3 LoRA (attention, 3x3 and 1x1 convolutions, text encoder) made into an adapter
    for each bundle; the Python runtime's image with it at 0.7 and without it, for one seed."""
    from lcm_export.exporter.adapter import make_adapter
    from lcm_export.exporter.bundle import LoraSource
    from lcm_export.exporter.tiny import build_tiny_lora

    lora = build_tiny_lora(
        work / "style.safetensors",
        model,
        rank=3,
        target_modules=("to_q", "to_out.0", "conv1", "proj_in"),
        text_encoder=True,
        seed=4,
    )
    cases = []
    for name, bundle in bundles.items():
        adapter = work / f"style-{name}.adapter"
        make_adapter(LoraSource(str(lora)), bundle, adapter)
        pipe = Pipeline.load(bundle, backend="onnxruntime", precision="fp32", variant=name)
        case = {"name": name, "bundle": str(bundle), "adapter": str(adapter), "weight": 0.7, "seed": 6, "steps": 2}
        case["base"] = _write(folder, f"adapter-{name}-base", pipe("a cat", num_inference_steps=2, seed=6).images)
        pipe.set_adapters({adapter: 0.7})
        case["expected"] = _write(folder, f"adapter-{name}", pipe("a cat", num_inference_steps=2, seed=6).images)
        if name == "int8":
            case["tolerance"] = {"wasm": 0.05}  # as the INT8 image case (its comment says why)
        if name == "fp16":
            case["tolerance"] = FP16_TOLERANCE
        cases.append(case)
    return cases


def _bad_bundles(good: Path, folder: Path) -> list[dict]:
    cases = []
    missing = shutil.copytree(good, folder / "missing-file")
    (missing / "vae_decoder" / "model.onnx").unlink()
    cases.append({"name": "missing file", "bundle": str(missing), "verify": "size", "match": "vae_decoder/model.onnx"})
    changed = shutil.copytree(good, folder / "changed-byte")
    data = bytearray((changed / "unet" / "model.onnx").read_bytes())
    data[len(data) // 2] ^= 0x01
    (changed / "unet" / "model.onnx").write_bytes(bytes(data))
    cases.append({"name": "changed byte", "bundle": str(changed), "verify": "full", "match": "unet/model.onnx"})
    field = shutil.copytree(good, folder / "bad-field")
    manifest = json.loads((field / "manifest.json").read_text())
    manifest["pipeline"]["vae_scale_factor"] = 0
    (field / "manifest.json").write_text(json.dumps(manifest))
    cases.append({"name": "bad field", "bundle": str(field), "verify": "size", "match": "pipeline.vae_scale_factor"})
    integer = shutil.copytree(good, folder / "float-integer")
    text = (integer / "manifest.json").read_text().replace('"latent_channels": 4', '"latent_channels": 4.0')
    (integer / "manifest.json").write_text(text)
    cases.append(
        {"name": "integer as 4.0", "bundle": str(integer), "verify": "size", "match": "pipeline.latent_channels"}
    )
    twice = shutil.copytree(good, folder / "duplicate-key")
    text = (
        (twice / "manifest.json")
        .read_text()
        .replace('"latent_channels": 4', '"latent_channels": 4, "latent_channels": 4')
    )
    (twice / "manifest.json").write_text(text)
    cases.append({"name": "duplicate key", "bundle": str(twice), "verify": "size", "match": "latent_channels"})
    cases.append(
        {
            "name": "size the VAE cannot take",
            "bundle": str(good),
            "verify": "size",
            "height": 30,
            "match": "spatial_multiple",
        }
    )
    return cases


def test_the_node_tests_pass_against_the_python_runtime(references) -> None:
    environment = {
        **os.environ,
        "LCM_EDGE_REFERENCES": str(references),
        "LCM_EXPORT_CACHE_DIR": str(references / "cache"),
        # js/test/factors_reference.py runs on this interpreter (a worktree has no .venv of its own)
        "LCM_EDGE_PYTHON": os.environ.get("LCM_EDGE_PYTHON", sys.executable),
    }
    result = subprocess.run(
        ["node", "--test", "--test-concurrency=1", "test/"],
        cwd=JS,
        env=environment,
        capture_output=True,
        text=True,
        timeout=NODE_TIMEOUT,
    )
    report = references / "results.json"
    for written in (
        report,
        references / "stream-results.json",
        references / "int8-results.json",
        references / "adapters-results.json",
    ):
        if written.exists():
            print(json.dumps(json.loads(written.read_text()), indent=1))
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-3000:]
    assert report.exists(), "the parity test wrote no results.json: was LCM_EDGE_REFERENCES read?"
