"""INT8: calibration on the bundle's own trajectories, the QDQ U-Net, its quality report, and its use by backends.

Image-quality floor: on the tiny random-weight pipelines the INT8 U-Net's final images measure 41.9-42.9 dB PSNR
against the float bundle's with mean-minmax activation ranges (onnxruntime and OpenVINO, 4 steps, guidance 8.5);
with minmax ranges they measured 35-37 dB (36.4-36.6 dB with the float rule, 35.0-35.6 dB with every
Conv/MatMul/Gemm quantised). The tests require 30 dB: a broken calibration (a wrong range, a dropped half of the CFG
batch) lands far below it, at 10-20 dB.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from lcm_export.calibration.onnx_qdq import float_nodes
from lcm_export.calibration.trajectories import TrajectorySettings, load_sample, record_trajectories
from lcm_export.errors import UserError
from lcm_export.exporter.tiny import TinyPipelineConfig, build_tiny_pipeline
from lcm_export.runtime import Pipeline
from lcm_export.runtime.manifest import load_manifest
from tests.helpers import CPU_BACKENDS, UNSEEN_SHAPES, export, image_psnr

PSNR_FLOOR_DB = 30.0
CALL = dict(num_inference_steps=4, seed=11)


@pytest.fixture(scope="module")
def int8_bundle(tiny_lcm_dir, tmp_path_factory) -> Path:
    return export(tiny_lcm_dir, tmp_path_factory.mktemp("int8") / "bundle", precision="int8", keep_fp32=True)


def int8_ops(path: Path) -> dict[str, int]:
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    counts: dict[str, int] = {}
    for node in model.graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    counts["int8 weights"] = sum(init.data_type == onnx.TensorProto.INT8 for init in model.graph.initializer)
    return counts


@pytest.mark.parametrize(
    ("default", "multiple", "expected"),
    [(64, 8, 64), (256, 8, 256), (512, 8, 256), (768, 8, 384), (1024, 8, 512), (1024, 64, 512), (600, 64, 256),
     (520, 16, 256), (2048, 8, 1024)],
)  # fmt: skip
def test_the_default_calibration_size_is_the_model_size_up_to_256_and_half_above(default, multiple, expected) -> None:
    from lcm_export.calibration.int8 import default_calibration_resolution

    size = default_calibration_resolution(default, multiple)
    assert size == expected and size % multiple == 0


def test_the_int8_unet_is_quantised_and_listed_first(int8_bundle) -> None:
    manifest = load_manifest(int8_bundle, verify="full")
    assert manifest.precision == "int8"
    unet = manifest.components["unet"]
    assert [(v.name, v.precision) for v in unet.variants] == [("int8-qdq", "int8"), ("fp32", "fp32")]
    int8 = unet.variants[0]
    counts = int8_ops(int8_bundle / int8.path)
    assert counts.get("QuantizeLinear", 0) > 20 and counts.get("DequantizeLinear", 0) > 20, counts
    assert counts["int8 weights"] > 10, counts  # weights stored as int8, not float
    assert (int8_bundle / int8.path).stat().st_size < 0.5 * (int8_bundle / unet.variants[1].path).stat().st_size
    produced = int8.produced_by
    assert produced["calibration"]["unet_calls"] == 8 * 4  # 8 prompts x 4 steps at guidance 8.5
    info = manifest.pipeline  # the tiny model's default size (under 256 px) is its calibration size
    assert info.default_height <= 256 and produced["calibration"]["size"] == [info.default_height, info.default_width]
    assert "/unet/conv_in/Conv" in produced["float_nodes"] and "/unet/conv_out/Conv" in produced["float_nodes"]
    # The full VAE decoder is quantised too, calibrated on each trajectory's final latents; the rest stays float.
    decoder = manifest.components["vae_decoder"]
    assert [(v.name, v.precision) for v in decoder.variants] == [("int8-qdq", "int8"), ("fp32", "fp32")]
    counts = int8_ops(int8_bundle / decoder.variants[0].path)
    assert counts.get("QuantizeLinear", 0) > 5 and counts["int8 weights"] > 5, counts
    assert decoder.variants[0].produced_by["calibration"]["samples"] == 8  # one per prompt
    # the float rule: the first convolution (post_quant_conv, on the latents) and the last (conv_out), and the
    # mid-block attention's activation products
    kept = decoder.variants[0].produced_by["float_nodes"]
    assert kept[:2] == ["/post_quant_conv/Conv", "/decoder/conv_out/Conv"], kept
    assert any(name.startswith("/decoder/mid_block/attentions.0/MatMul") for name in kept), kept
    assert min(decoder.variants[0].produced_by["decoded_psnr_db"]) >= PSNR_FLOOR_DB
    assert {v.precision for v in manifest.components["vae_encoder"].variants} == {"fp32"}
    # the text encoder's weights int8 by default (weight-only: no activation quantised), its float variant kept
    encoder = manifest.components["text_encoder"].variants
    assert [(v.name, v.precision) for v in encoder] == [("int8-qdq", "int8"), ("fp32", "fp32")]
    assert encoder[0].produced_by["quantised_weights"] >= 6


def test_quality_report_in_the_manifest(int8_bundle) -> None:
    manifest = load_manifest(int8_bundle)
    report = manifest.components["unet"].variants[0].details["quality"]
    assert set(report["sets"]) == {"calibration", "held_out"}
    # its budget is half the quantisation's time (the components' calibration seconds), at most what it planned
    quantisation = sum(
        component.variants[0].produced_by.get("seconds", 0.0)
        for component in manifest.components.values()
        if component.variants[0].precision == "int8"
    )
    assert report["budget_seconds"] == pytest.approx(0.5 * quantisation, abs=0.2), (report, quantisation)
    assert 4 <= report["runs"] <= report["runs_planned"] == 12, report
    for per_guidance in report["sets"].values():
        assert set(per_guidance) == {"4", "8.5"}
        for scores in per_guidance.values():
            assert scores["psnr_db_min"] >= PSNR_FLOOR_DB, scores
            assert 0.9 <= scores["ssim_mean"] <= 1.0, scores


@pytest.mark.parametrize(
    "backend",
    CPU_BACKENDS,
)
def test_int8_runs_on_cpu_backends_near_the_float_image(int8_bundle, backend) -> None:
    float_image = Pipeline.load(int8_bundle, backend=backend, variant="fp32", precision="fp32")(
        "a red car", **CALL
    ).images
    pipe = Pipeline.load(int8_bundle, backend=backend, variant="int8")
    assert pipe.variants["unet"].name == "int8-qdq" and pipe.variants["vae_decoder"].name == "int8-qdq"
    assert pipe.variants["text_encoder"].name == "int8-qdq"
    image = pipe("a red car", **CALL).images
    score = image_psnr(float_image, image)
    print(f"{backend}: INT8 vs float {score:.1f} dB")
    assert PSNR_FLOOR_DB <= score < 80, score  # close, and really different (the INT8 graph ran)
    # "auto" takes the bundle's preferred variant: the INT8 U-Net.
    assert Pipeline.load(int8_bundle, backend=backend).variants["unet"].name == "int8-qdq"


def _elements(initializers) -> dict[int, int]:
    counts: dict[int, int] = {}
    for init in initializers:
        counts[init.data_type] = counts.get(init.data_type, 0) + int(np.prod(init.dims, dtype=np.int64))
    return counts


def test_int8_weights_stay_int8_in_the_loaded_graph(int8_bundle, tmp_path) -> None:
    """No backend dequantises the weights at load: the graph onnxruntime optimised (saved in the cache) and
    OpenVINO's compiled runtime model hold them as int8 and run Conv/MatMul on 8-bit inputs."""
    import onnx

    qdq = _elements(
        onnx.load(str(int8_bundle / "unet" / "model-int8.onnx"), load_external_data=False).graph.initializer
    )
    int8, float32 = onnx.TensorProto.INT8, onnx.TensorProto.FLOAT
    assert qdq[int8] > 10 * qdq[float32]  # most of the U-Net's parameters are quantised

    Pipeline.load(int8_bundle, backend="onnxruntime", variant="int8", cache_dir=str(tmp_path / "ort"))
    optimised = [onnx.load(str(p), load_external_data=False) for p in sorted((tmp_path / "ort").rglob("model.onnx"))]
    quantised = [m for m in optimised if any(n.op_type.startswith("QLinear") for n in m.graph.node)]
    assert len(quantised) == 2, [sorted({n.op_type for n in m.graph.node}) for m in optimised]  # U-Net, decoder
    unet = [m for m in quantised if any(value.name == "encoder_hidden_states" for value in m.graph.input)]
    assert len(unet) == 1
    loaded = _elements(unet[0].graph.initializer)
    assert loaded[int8] == qdq[int8]  # every int8 weight is still int8
    assert loaded[float32] < qdq[float32] + 0.01 * qdq[int8]  # and not also kept as a float copy
    ops = {n.op_type for n in unet[0].graph.node}
    assert "QLinearConv" in ops and "MatMulIntegerToFloat" in ops, ops  # MatMul outputs float, integer kernels

    if importlib.util.find_spec("openvino") is None:
        return
    pipe = Pipeline.load(int8_bundle, backend="openvino", variant="int8", cache=False)
    constants: dict[str, int] = {}
    eight_bit_layers = 0
    for op in pipe.denoiser.sessions["unet"].compiled.get_runtime_model().get_ordered_ops():
        info = op.get_rt_info()
        layer, precision = info["layerType"].astype(str), info["runtimePrecision"].astype(str)
        if layer == "Const" and op.get_output_partial_shape(0).is_static:
            kind = op.get_output_element_type(0).get_type_name()
            constants[kind] = constants.get(kind, 0) + int(np.prod(list(op.get_output_shape(0)), dtype=np.int64))
        eight_bit_layers += layer in ("Convolution", "FullyConnected") and precision in ("u8", "i8")
    assert constants.get("i8", 0) >= 0.95 * qdq[int8], constants
    assert constants.get("f32", 0) + constants.get("bf16", 0) + constants.get("f16", 0) < 0.2 * qdq[int8], constants
    assert eight_bit_layers > 20, eight_bit_layers


@pytest.mark.skipif(importlib.util.find_spec("openvino") is None, reason="pip install openvino")
def test_openvino_reads_the_qdq_unet_with_float_layer_outputs(int8_bundle, tmp_path) -> None:
    """OpenVINO drops the quantisation of convolution outputs that nothing quantised reads: what it runs equals a
    QDQ file quantised with those outputs float (the same ranges), and differs from the file as onnxruntime runs it.
    """
    import openvino

    from lcm_export.calibration.onnx_qdq import QdqRecipe, quantize_qdq
    from lcm_export.runtime.backends import BackendOptions
    from lcm_export.runtime.backends.openvino import QUANTISED_CONSUMERS, compile_config, float_layer_outputs

    pipe = Pipeline.load(int8_bundle, backend="onnxruntime", variant="fp32", precision="fp32", cache=False)
    settings = TrajectorySettings(("a red car", "a blue house"), steps=4, guidance_scale=8.5, height=32, width=32)
    samples = record_trajectories(pipe, settings, folder=tmp_path / "samples").unet
    float_path = int8_bundle / "unet" / "model.onnx"
    paths = {}
    for name, outputs in (("as-stored", ("MatMul",)), ("float-outputs", ("Conv", "MatMul", "Gemm"))):
        paths[name] = tmp_path / f"{name}.onnx"
        recipe = QdqRecipe(float_outputs=outputs)
        quantize_qdq(float_path, paths[name], lambda i: load_sample(samples[i]), len(samples), recipe)

    def fake_quantizes(model) -> int:
        return sum(op.get_type_name() == "FakeQuantize" for op in model.get_ordered_ops())

    core = openvino.Core()
    model = core.read_model(str(paths["as-stored"]))
    before = fake_quantizes(model)
    bypassed = float_layer_outputs(model)
    assert bypassed > 5, bypassed
    reference = core.read_model(str(paths["float-outputs"]))
    assert before - bypassed == fake_quantizes(reference)
    for op in model.get_ordered_ops():  # what is left quantised feeds a quantised layer (through its dequantise)
        if op.get_type_name() == "FakeQuantize":
            tail = op
            while {t.get_node().get_type_name() for t in tail.output(0).get_target_inputs()} <= {
                "Convert",
                "Subtract",
                "Multiply",
            }:
                tail = next(iter(tail.output(0).get_target_inputs())).get_node()
            consumers = {t.get_node().get_type_name() for t in tail.output(0).get_target_inputs()}
            assert consumers & (QUANTISED_CONSUMERS | {"Concat", "Reshape", "Transpose"}), consumers
    feeds = {k: np.require(v, dtype=np.float32, requirements="C") for k, v in load_sample(samples[3]).items()}
    config = {"INFERENCE_PRECISION_HINT": "f32"}
    ours = core.compile_model(model, "CPU", config)(feeds)[0]
    expected = core.compile_model(reference, "CPU", config)(feeds)[0]
    as_stored = core.compile_model(str(paths["as-stored"]), "CPU", config)(feeds)[0]
    assert np.abs(ours - expected).max() <= 1e-5 * np.abs(expected).max(), np.abs(ours - expected).max()
    assert np.abs(as_stored - expected).max() > 1e-3 * np.abs(expected).max()  # the change is real
    # The backend applies it to the bundle's INT8 variant, cached or not: its output is the transformed file's.
    stored = core.read_model(str(int8_bundle / "unet" / "model-int8.onnx"))
    float_layer_outputs(stored)
    runtime_config = compile_config(core, BackendOptions(cache=False, device="CPU"))
    expected = core.compile_model(stored, "CPU", runtime_config)(feeds)[0]
    for cache in (None, tmp_path / "ov-cache", tmp_path / "ov-cache"):  # off, cold, warm
        caching = {"cache": False} if cache is None else {"cache_dir": cache}
        pipe = Pipeline.load(int8_bundle, backend="openvino", variant="int8", **caching)
        got = pipe.denoiser.sessions["unet"].run(feeds)["out_sample"]
        assert np.abs(got - expected).max() <= 1e-5 * np.abs(expected).max(), (cache, np.abs(got - expected).max())


def test_int8_on_a_float_bundle_is_a_one_line_error(tiny_lcm_bundle) -> None:
    with pytest.raises(UserError, match=r"has no int8 variant \(it has fp32\)"):
        Pipeline.load(tiny_lcm_bundle, backend="onnxruntime", variant="int8")


def test_lcm_run_says_which_variant_ran(int8_bundle, tmp_path) -> None:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "lcm_export.runtime.cli",
            str(int8_bundle),
            "a cat",
            "--backend",
            "onnxruntime",
            "--output",
            str(tmp_path / "x.png"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert "unet int8-qdq" in result.stdout and "text_encoder int8-qdq" in result.stdout


def test_trajectories_are_recorded_once_and_hold_the_cfg_batch(tiny_cfg_bundle, tmp_path, monkeypatch) -> None:
    """A CFG bundle at guidance > 1 records both halves of its batch; a second recording reads the cache."""
    pipe = Pipeline.load(tiny_cfg_bundle, backend="onnxruntime", precision="fp32")
    settings = TrajectorySettings(("a cat", "a dog"), steps=2, guidance_scale=1.5, height=32, width=32)
    recorded = record_trajectories(pipe, settings, folder=tmp_path / "samples")
    assert len(recorded.unet) == 2 * 2 and len(recorded.vae_decoder) == 2  # per call; per prompt
    first = load_sample(recorded.unet[0])
    assert first["sample"].shape[0] == 2 and first["encoder_hidden_states"].shape[0] == 2  # [uncond, cond]
    assert not np.allclose(first["encoder_hidden_states"][0], first["encoder_hidden_states"][1])
    # The decoder's sample is the last step's denoised latents, unscaled as the decoder reads them.
    final: list[np.ndarray] = []
    pipe(
        "a dog",
        num_inference_steps=2,
        guidance_scale=1.5,
        height=32,
        width=32,
        seed=settings.seed + 1,
        observer=lambda event: final.append(event.denoised.copy()),
    )
    decoder = load_sample(recorded.vae_decoder[1])["latent_sample"]
    scale = pipe.manifest.pipeline.vae_scaling_factor
    assert decoder.shape == final[-1].shape and np.allclose(decoder * scale, final[-1], atol=1e-6)
    calls: list[int] = []
    original = Pipeline.__call__
    monkeypatch.setattr(Pipeline, "__call__", lambda *a, **k: calls.append(1) or original(*a, **k))
    again = record_trajectories(pipe, settings, folder=tmp_path / "samples")
    assert again == recorded and not calls


def test_the_unet_ranges_are_gathered_in_the_trajectories_loop(tiny_lcm_dir, tmp_path, monkeypatch) -> None:
    """The U-Net runs once per calibration call: the loop that records the trajectories runs it instrumented and
    keeps each call's ranges. A second export, whose trajectories come from the cache, measures them from the
    samples instead, and writes the same INT8 U-Net, byte for byte."""
    from lcm_export.calibration import onnx_qdq

    monkeypatch.setenv("LCM_EXPORT_CACHE_DIR", str(tmp_path / "cache"))
    calls: list[int] = []  # the U-Net's (the decoder's ranges are measured on its 8 recorded inputs after)
    run = onnx_qdq.RangeRecorder.run
    monkeypatch.setattr(
        onnx_qdq.RangeRecorder, "run", lambda self, feeds: calls.extend(["timestep" in feeds]) or run(self, feeds)
    )
    bundles, produced = [], []
    for name in ("first", "cached"):
        calls.clear()
        bundle = export(tiny_lcm_dir, tmp_path / name, precision="int8")
        unet = next(v for v in load_manifest(bundle).components["unet"].variants if v.precision == "int8")
        assert sum(calls) == unet.produced_by["calibration"]["unet_calls"] == 8 * 4, name  # 8 prompts, 4 steps
        bundles.append(bundle)
        produced.append(unet)
    assert produced[0].produced_by["ranges"] == "gathered in the loop that recorded the calibration trajectories"
    assert produced[1].produced_by["ranges"] == "measured on the cached calibration samples"
    for file in produced[0].files:
        assert (bundles[0] / file).read_bytes() == (bundles[1] / file).read_bytes(), file


def test_the_float_rule_finds_the_layers_it_names(int8_bundle) -> None:
    import onnx

    model = onnx.load(str(int8_bundle / "unet" / "model.onnx"), load_external_data=False)
    keep = float_nodes(model)
    assert keep[:2] == ["/unet/conv_in/Conv", "/unet/conv_out/Conv"]
    assert any("time_embedding" in name for name in keep)
    products = [name for name in keep if name.endswith(("attn1/MatMul", "attn1/MatMul_1"))]
    assert products, keep  # Q.K^T and softmax.V of the self-attention
    assert not any(name.endswith("to_q/MatMul") for name in keep)  # weight MatMuls are quantised


def test_int8_on_an_unseen_shape_and_a_lora_bundle(tmp_path) -> None:
    """Other block counts, head dims and VAE depth; and a base SD with a LoRA fused (CFG, both halves)."""
    from lcm_export.exporter.bundle import LoraSource
    from lcm_export.exporter.tiny import build_tiny_lora

    model = build_tiny_pipeline(tmp_path / "unseen", UNSEEN_SHAPES["three-blocks-vae4"])  # test_parity's
    bundle = export(model, tmp_path / "unseen-int8", precision="int8", calibration_size=4)
    manifest = load_manifest(bundle)
    for name in ("unet", "vae_decoder"):
        assert [v.name for v in manifest.components[name].variants] == ["int8-qdq"]  # no --keep-fp32
        assert not (bundle / name / "model.onnx").exists()
    report = load_manifest(bundle).components["unet"].variants[0].details["quality"]
    assert min(s["psnr_db_min"] for d in report["sets"].values() for s in d.values()) >= PSNR_FLOOR_DB

    base = build_tiny_pipeline(tmp_path / "sd", TinyPipelineConfig(kind="sd"))
    lora = build_tiny_lora(tmp_path / "lcm.safetensors", base, rank=4, target_modules=("to_q", "to_v", "conv1"))
    cfg = export(base, tmp_path / "cfg-int8", precision="int8", loras=(LoraSource(str(lora)),), calibration_size=4)
    int8 = load_manifest(cfg).components["unet"].variants[0]
    assert int8.produced_by["calibration"]["guidance"] == [1.0, 1.5]
    assert int8.produced_by["calibration"]["unet_calls"] == 2 * 4 * 4  # two guidances x 4 prompts x 4 steps
    assert set(int8.details["quality"]["sets"]["held_out"]) == {"1", "1.5"}
    for scores in int8.details["quality"]["sets"]["held_out"].values():
        assert scores["psnr_db_min"] >= PSNR_FLOOR_DB, scores
    decoder = load_manifest(cfg).components["vae_decoder"].variants[0]
    assert decoder.precision == "int8" and decoder.produced_by["calibration"]["samples"] == 2 * 4  # per guidance


def test_a_tiny_vae_decoder_stays_float(tiny_lcm_dir, tmp_path) -> None:
    """TAESD's decoder is a few percent of a run: INT8 would not pay there (lcm_export.calibration.int8)."""
    from lcm_export.exporter.tiny import build_tiny_autoencoder_tiny

    taesd = build_tiny_autoencoder_tiny(tmp_path / "taesd", latent_channels=4, scale_factor_depth=1)
    bundle = export(tiny_lcm_dir, tmp_path / "fast-int8", precision="int8", tiny_vae=str(taesd), calibration_size=2)
    manifest = load_manifest(bundle)
    assert manifest.pipeline.vae == "autoencoder_tiny"
    assert [v.precision for v in manifest.components["unet"].variants] == ["int8"]
    assert [v.precision for v in manifest.components["vae_decoder"].variants] == ["fp32"]


@pytest.mark.tensorrt
@pytest.mark.skipif(
    importlib.util.find_spec("tensorrt_rtx_bindings") is None, reason="pip install 'lcm-edge[tensorrt]'"
)
def test_tensorrt_rtx_builds_an_int8_engine_from_the_qdq_unet(tiny_lcm_dir, tmp_path) -> None:
    bundle = export(tiny_lcm_dir, tmp_path / "trt-int8", target="tensorrt", precision="int8", calibration_size=2)
    manifest = load_manifest(bundle, verify="full")
    unet = manifest.components["unet"].artifacts["tensorrt"]
    assert unet.precision == "int8" and unet.produced_by["from"] == "unet/model-int8.onnx"
    assert (bundle / unet.path).stat().st_size > 50_000
    # The decoder is not quantised for TensorRT (not measured on a GPU): its engine is built from the float ONNX.
    decoder = manifest.components["vae_decoder"].artifacts["tensorrt"]
    assert decoder.precision != "int8" and decoder.produced_by["from"] == "vae_decoder/model.onnx"
