"""INT8 with ControlNet: trajectories recorded with synthetic control images (the residuals in the U-Net's
calibration calls), the residual U-Net and the ControlNet quantised, their images near the float ControlNet bundle's
on onnxruntime and OpenVINO; an architecture the tests were not written for.

Image-quality floors, measured on the tiny random pipelines: the INT8 U-Net and ControlNet (decoder float) give
39.8-41.4 dB PSNR against the float ControlNet bundle with held-out control images (the ControlNet alone 52-53 dB),
with or without a control image; the whole INT8 bundle (the full VAE decoder quantised too) 27-28 dB, the same as the
tiny pipeline without ControlNet (its random decoder's share). A calibration without the residuals or a broken range
lands below 25 dB.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from lcm_export.calibration.control_images import KINDS, control_images
from lcm_export.calibration.trajectories import TrajectorySettings, load_sample, record_trajectories
from lcm_export.exporter.controlnet import ControlNetSource
from lcm_export.exporter.tiny import build_controlnet, build_tiny_pipeline
from lcm_export.runtime import Pipeline
from lcm_export.runtime.manifest import load_manifest
from lcm_export.runtime.variants import choose_variant
from tests.helpers import CPU_BACKENDS, UNSEEN_SHAPES, export, image_psnr

RESIDUAL_PSNR_FLOOR_DB = 35.0  # the INT8 U-Net and ControlNet, decoder float
BUNDLE_PSNR_FLOOR_DB = 25.0  # everything INT8 that the bundle quantises
CALL = dict(num_inference_steps=4, height=32, width=32, seed=7)


@pytest.fixture(scope="module")
def controlnet_int8(tiny_lcm_dir, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("controlnet-int8")
    controlnet = build_controlnet(root / "cn", tiny_lcm_dir, seed=2)
    sources = (ControlNetSource(str(controlnet), 0.8),)
    return export(
        tiny_lcm_dir, root / "bundle", precision="int8", keep_fp32=True, calibration_size=2, controlnets=sources
    )


def _ops(path: Path) -> dict[str, int]:
    import onnx

    counts: dict[str, int] = {}
    for node in onnx.load(str(path), load_external_data=False).graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return counts


def test_the_residual_unet_and_the_controlnet_are_quantised(controlnet_int8) -> None:
    manifest = load_manifest(controlnet_int8, verify="full")
    for name in ("unet", "controlnet"):
        variants = manifest.components[name].variants
        assert [(v.name, v.precision) for v in variants] == [("int8-qdq", "int8"), ("fp32", "fp32")], name
        counts = _ops(controlnet_int8 / variants[0].path)
        assert counts.get("QuantizeLinear", 0) > 10 and counts.get("DequantizeLinear", 0) > 10, (name, counts)
        calibration = variants[0].produced_by["calibration"]
        assert calibration["samples"] == 2 * 4 and "edge" in calibration["control_images"], calibration
    # the quantised U-Net still takes the residuals
    unet_inputs = {value.name for value in _graph_inputs(controlnet_int8 / "unet" / "model-int8.onnx")}
    assert set(manifest.controlnet.residual_inputs) <= unet_inputs
    report = manifest.components["unet"].variants[0].details["quality"]
    assert "edge" in report["control_images"]
    for per_guidance in report["sets"].values():
        for scores in per_guidance.values():
            assert scores["psnr_db_min"] >= BUNDLE_PSNR_FLOOR_DB, scores


def _graph_inputs(path: Path):
    import onnx

    return onnx.load(str(path), load_external_data=False).graph.input


def test_calibration_calls_hold_the_control_residuals(controlnet_int8, tmp_path) -> None:
    """The recorded U-Net calls carry non-zero residuals, which are the ControlNet's own output on the recorded
    ControlNet call (scale 0.8, the bundle's); edge and smooth control images alternate by prompt."""
    pipe = Pipeline.load(controlnet_int8, backend="onnxruntime", variant="fp32", precision="fp32")
    settings = TrajectorySettings(("a cat", "a dog"), steps=2, guidance_scale=8.5, height=32, width=32, controlnets=1)
    recorded = record_trajectories(pipe, settings, folder=tmp_path / "samples")
    assert len(recorded.unet) == len(recorded.controlnets["controlnet"]) == 2 * 2
    for unet_path, controlnet_path in zip(recorded.unet, recorded.controlnets["controlnet"], strict=True):
        unet, controlnet = load_sample(unet_path), load_sample(controlnet_path)
        outputs = pipe.denoiser.sessions["controlnet"].run(controlnet)
        for name in pipe.manifest.controlnet.residual_inputs:
            assert np.abs(unet[name]).max() > 1e-3, name
            np.testing.assert_allclose(unet[name], 0.8 * outputs[name], rtol=1e-4, atol=1e-5)
    images = [load_sample(path)["controlnet_cond"] for path in recorded.controlnets["controlnet"][::2]]
    assert set(np.unique(images[0])) == {0.0, 1.0}  # prompt 0: a binary edge map
    assert len(np.unique(images[1])) > 100  # prompt 1: a smooth field
    assert KINDS == ("edges", "smooth")


def _with_int8(bundle: Path, backend: str, components: tuple[str, ...]) -> Pipeline:
    """The float pipeline with ``components`` on their INT8 variants (the decoder's share of the error apart)."""
    pipe = Pipeline.load(bundle, backend=backend, variant="fp32", precision="fp32", cache=False)
    for name in components:
        pipe.denoiser._variants[name] = choose_variant(pipe.manifest.components[name], "onnx", "int8")
        pipe.denoiser._open(name)
    return pipe


@pytest.mark.parametrize(
    "backend",
    CPU_BACKENDS,
)
def test_int8_controlnet_runs_near_the_float_image(controlnet_int8, backend) -> None:
    control = control_images(0, 1, 32, 32, seed=77)  # an edge map calibration never saw
    reference = Pipeline.load(controlnet_int8, backend=backend, variant="fp32", precision="fp32")
    float_image = reference("a red car", control_image=control, **CALL).images
    uncontrolled = reference("a red car", **CALL).images
    assert np.abs(float_image - uncontrolled).max() > 1e-2  # the control image matters
    int8 = _with_int8(controlnet_int8, backend, ("unet", "controlnet"))
    score = image_psnr(float_image, int8("a red car", control_image=control, **CALL).images)
    plain = image_psnr(uncontrolled, int8("a red car", **CALL).images)
    print(f"{backend}: INT8 U-Net + ControlNet vs float {score:.1f} dB, without a control image {plain:.1f} dB")
    assert RESIDUAL_PSNR_FLOOR_DB <= score < 80 and RESIDUAL_PSNR_FLOOR_DB <= plain < 80, (score, plain)
    whole = Pipeline.load(controlnet_int8, backend=backend, variant="int8")
    assert {name: whole.variants[name].name for name in ("unet", "controlnet")} == dict.fromkeys(
        ("unet", "controlnet"), "int8-qdq"
    )
    score = image_psnr(float_image, whole("a red car", control_image=control, **CALL).images)
    assert BUNDLE_PSNR_FLOOR_DB <= score < 80, score


def test_int8_controlnet_on_an_unseen_shape(tmp_path) -> None:
    """Other block counts, head dims, cross-attention size and VAE depth, two ControlNets, no --keep-fp32."""
    model = build_tiny_pipeline(tmp_path / "unseen", UNSEEN_SHAPES["three-blocks-vae4"])
    nets = [build_controlnet(tmp_path / f"cn-{index}", model, seed=index) for index in range(2)]
    sources = tuple(ControlNetSource(str(path)) for path in nets)
    bundle = export(model, tmp_path / "int8", precision="int8", calibration_size=2, controlnets=sources)
    manifest = load_manifest(bundle)
    for name in ("unet", "controlnet", "controlnet_1"):
        assert [v.name for v in manifest.components[name].variants] == ["int8-qdq"], name
        assert manifest.components[name].variants[0].produced_by["calibration"]["samples"] == 2 * 4
    report = manifest.components["unet"].variants[0].details["quality"]
    assert min(s["psnr_db_min"] for d in report["sets"].values() for s in d.values()) >= BUNDLE_PSNR_FLOOR_DB
    size = 2 * manifest.pipeline.spatial_multiple
    images = Pipeline.load(bundle, backend="onnxruntime")(
        "a house", control_image=control_images(1, 2, size, size, seed=5), num_inference_steps=2, seed=1
    ).images
    assert images.shape == (1, size, size, 3) and np.isfinite(images).all()
