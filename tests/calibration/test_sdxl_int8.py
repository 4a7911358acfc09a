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
    # The two text encoders stay float.
    for encoder in ("text_encoder", "text_encoder_2"):
        assert [v.precision for v in manifest.components[encoder].variants] == ["fp32"]
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
