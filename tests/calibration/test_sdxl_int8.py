"""INT8 for the SDXL family: a distilled LCM-SDXL and a base SDXL of other shapes (three blocks, other head and
encoder sizes) with a LoRA fused on its U-Net and both text encoders (CFG, as SDXL + LCM-LoRA runs), each quantised
on its own trajectories, run on onnxruntime and OpenVINO near its float image.

The float rule (first and last convolution, the time, guidance and SDXL ``add_embedding`` MLPs, attention's
activation products) is the SD1.5 family's; the tiny SDXL pipelines measured 39.1-41.4 dB against float here. The
floor is the SD1.5 tests' 30 dB: a broken calibration (a range missing for the pooled text, a dropped CFG half)
lands far below it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from lcm_export.runtime import Pipeline
from lcm_export.runtime.manifest import load_manifest
from tests.helpers import CPU_BACKENDS, export, image_psnr

PSNR_FLOOR_DB = 30.0
CALL = dict(num_inference_steps=4, seed=5, height=32, width=32)


def quantised_ops(path: Path) -> dict[str, int]:
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    counts = {"int8 weights": sum(init.data_type == onnx.TensorProto.INT8 for init in model.graph.initializer)}
    for node in model.graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return counts


@pytest.fixture(scope="module")
def sdxl_int8_bundles(sdxl_lcm_dir, other_sdxl_model, tmp_path_factory) -> dict[str, tuple[Path, float]]:
    """name -> (INT8 bundle with the float variants kept, the guidance it runs at)."""
    folder = tmp_path_factory.mktemp("sdxl-int8")
    other, other_lora = other_sdxl_model
    from lcm_export.exporter.bundle import LoraSource

    options = dict(precision="int8", keep_fp32=True, calibration_size=2)
    return {
        "lcm-sdxl": (export(sdxl_lcm_dir, folder / "lcm-sdxl", **options), 8.5),
        "other-sdxl": (export(other, folder / "other", loras=(LoraSource(str(other_lora)),), **options), 1.5),
    }


@pytest.mark.parametrize("name", ["lcm-sdxl", "other-sdxl"])
def test_the_sdxl_int8_unet_is_quantised_and_reported(sdxl_int8_bundles, name) -> None:
    bundle, _ = sdxl_int8_bundles[name]
    manifest = load_manifest(bundle, verify="full")
    unet = manifest.components["unet"]
    assert [(v.name, v.precision) for v in unet.variants] == [("int8-qdq", "int8"), ("fp32", "fp32")]
    counts = quantised_ops(bundle / unet.variants[0].path)
    assert counts.get("QuantizeLinear", 0) > 20 and counts.get("DequantizeLinear", 0) > 20, counts
    assert counts["int8 weights"] > 10, counts
    produced = unet.variants[0].produced_by
    # The SDXL added embedding (pooled text + size ids) stays float with the time embedding.
    assert any("add_embedding" in node for node in produced["float_nodes"]), produced["float_nodes"]
    assert produced["recipe"]["reduce_range"] is True
    cfg = manifest.pipeline.guidance == "cfg"
    assert produced["calibration"]["unet_calls"] == (2 if cfg else 1) * 2 * 4  # guidances x prompts x steps
    # The two text encoders' weights are int8 by default, their float variants kept with --keep-fp32.
    for encoder in ("text_encoder", "text_encoder_2"):
        assert [v.precision for v in manifest.components[encoder].variants] == ["int8", "fp32"]
    report = unet.variants[0].details["quality"]
    assert set(report["sets"]) == {"calibration", "held_out"}
    for per_guidance in report["sets"].values():
        for scores in per_guidance.values():
            assert scores["psnr_db_min"] >= PSNR_FLOOR_DB, scores


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("name", ["lcm-sdxl", "other-sdxl"])
def test_sdxl_int8_runs_near_its_float_image(sdxl_int8_bundles, name, backend) -> None:
    bundle, guidance = sdxl_int8_bundles[name]
    call = dict(CALL, guidance_scale=guidance)
    float_pipe = Pipeline.load(bundle, backend=backend, variant="fp32", precision="fp32")
    float_image = float_pipe("a watercolor fox", **call).images
    pipe = Pipeline.load(bundle, backend=backend, variant="auto", precision="fp32")
    assert pipe.variants["unet"].name == "int8-qdq"
    image = pipe("a watercolor fox", **call).images
    assert image.shape == float_image.shape == (1, 32, 32, 3)
    assert np.isfinite(image).all()
    score = image_psnr(float_image, image)
    print(f"{name} on {backend}: INT8 vs float {score:.1f} dB")
    assert PSNR_FLOOR_DB <= score < 80, score  # close, and really different (the INT8 graph ran)


@pytest.fixture(scope="module")
def int8_text_encoders_bundle(sdxl_int8_bundles) -> Path:
    """The other-SDXL INT8 bundle: its text encoders' weights are int8 by default."""
    return sdxl_int8_bundles["other-sdxl"][0]


@pytest.fixture(scope="module")
def float_text_encoders_bundle(other_sdxl_model, tmp_path_factory) -> Path:
    """The other-SDXL INT8 bundle again (same LoRA, same calibration) with ``--float-text-encoders``."""
    from lcm_export.exporter.bundle import LoraSource

    other, other_lora = other_sdxl_model
    folder = tmp_path_factory.mktemp("sdxl-int8-float-text-encoders")
    options = dict(precision="int8", keep_fp32=True, calibration_size=2, int8_text_encoders=False)
    return export(other, folder / "other", loras=(LoraSource(str(other_lora)),), **options)


def test_int8_text_encoders_are_weight_only_int8(int8_text_encoders_bundle) -> None:
    """Every MatMul/Gemm weight of both encoders int8 behind a per-channel DequantizeLinear, no activation
    quantised; the float variant kept second; the weight map finds the int8 weights and their scales."""
    import onnx

    manifest = load_manifest(int8_text_encoders_bundle, verify="full")
    for encoder in ("text_encoder", "text_encoder_2"):
        variants = manifest.components[encoder].variants
        assert [(v.name, v.precision) for v in variants] == [("int8-qdq", "int8"), ("fp32", "fp32")]
        float_model = onnx.load(str(int8_text_encoders_bundle / variants[1].path), load_external_data=False)
        float_weights = {init.name for init in float_model.graph.initializer}
        layers = [
            node
            for node in float_model.graph.node
            if node.op_type in ("MatMul", "Gemm") and node.input[1] in float_weights
        ]
        int8_model = onnx.load(str(int8_text_encoders_bundle / variants[0].path), load_external_data=False)
        levels = [
            init.name for init in int8_model.graph.initializer
            if init.data_type == onnx.TensorProto.INT8 and init.name.endswith("_quantized")
        ]  # fmt: skip
        counts = quantised_ops(int8_text_encoders_bundle / variants[0].path)
        assert counts.get("QuantizeLinear", 0) == 0, counts
        assert counts.get("DequantizeLinear", 0) == len(levels) == len(layers) >= 6, (counts, len(layers))
        produced = variants[0].produced_by
        assert produced["quantised_weights"] == len(layers)
        assert produced["weight_bytes"]["int8"] * 4 == produced["weight_bytes"]["float32"]
        weight_map = manifest.components[encoder].weight_map
        if weight_map is not None:  # the LoRA's layers: their int8 weights and scales located for adapters
            import json

            tensors = json.loads((int8_text_encoders_bundle / weight_map).read_text())["variants"]["int8-qdq"]
            assert tensors["tensors"] and all(entry["dtype"] == "int8" for entry in tensors["tensors"].values())


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_int8_text_encoders_change_the_image_little(
    int8_text_encoders_bundle, float_text_encoders_bundle, sdxl_int8_bundles, backend
) -> None:
    """Against the same INT8 U-Net with float text encoders (``--float-text-encoders``, calibrated the same): the
    image moves (the int8 encoders ran) but stays within the INT8 floor; their hidden states within 5%."""
    reference, (_, guidance) = float_text_encoders_bundle, sdxl_int8_bundles["other-sdxl"]
    for encoder in ("text_encoder", "text_encoder_2"):
        assert [v.precision for v in load_manifest(reference).components[encoder].variants] == ["fp32"]

    def unet_int8_sha256(bundle: Path) -> str:
        manifest = load_manifest(bundle)
        return {entry.path: entry.sha256 for entry in manifest.files}[manifest.components["unet"].variants[0].path]

    # the same INT8 U-Net: the encoders are the only difference
    assert unet_int8_sha256(reference) == unet_int8_sha256(int8_text_encoders_bundle)
    call = dict(CALL, guidance_scale=guidance)
    float_encoders = Pipeline.load(reference, backend=backend, precision="fp32")
    pipe = Pipeline.load(int8_text_encoders_bundle, backend=backend, precision="fp32")
    assert {name: pipe.variants[name].name for name in ("unet", "text_encoder", "text_encoder_2")} == dict.fromkeys(
        ("unet", "text_encoder", "text_encoder_2"), "int8-qdq"
    )
    hidden = pipe.encode_prompts(["a watercolor fox"]).hidden
    expected = float_encoders.encode_prompts(["a watercolor fox"]).hidden
    relative = float(np.linalg.norm(hidden - expected) / np.linalg.norm(expected))
    score = image_psnr(float_encoders("a watercolor fox", **call).images, pipe("a watercolor fox", **call).images)
    print(f"int8 text encoders on {backend}: hidden states {relative:.2%} off, image {score:.1f} dB")
    assert 0 < relative <= 0.05, relative
    assert PSNR_FLOOR_DB <= score < 80, score


def test_weight_only_int8_with_external_data(int8_text_encoders_bundle, tmp_path) -> None:
    """A large encoder keeps external data: its int8 weights go beside the graph, every scale and zero point stays
    inline (a weight map reads them from the graph), and the file runs as the bundle's own int8 variant does."""
    import onnx
    import onnxruntime

    from lcm_export.calibration.weight_only import quantize_weights_only

    manifest = load_manifest(int8_text_encoders_bundle)
    int8, fp32 = manifest.components["text_encoder_2"].variants
    output = tmp_path / "model-int8.onnx"
    report = quantize_weights_only(int8_text_encoders_bundle / fp32.path, output, external_data=True)
    assert report["quantised_weights"] == int8.produced_by["quantised_weights"]
    model = onnx.load(str(output), load_external_data=False)
    external = {t.name for t in model.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL}
    levels = {t.name for t in model.graph.initializer if t.name.endswith("_quantized")}
    side = {t.name for t in model.graph.initializer if t.name.endswith(("_scale", "_zero_point"))}
    assert levels and levels <= external and not side & external and (tmp_path / "model-int8.onnx_data").is_file()
    ids = {"input_ids": np.arange(2 * 16, dtype=np.int64).reshape(2, 16) % 50}
    outputs = [
        onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, ids)
        for path in (output, int8_text_encoders_bundle / int8.path)
    ]
    assert all(np.array_equal(first, second) for first, second in zip(*outputs, strict=True))
