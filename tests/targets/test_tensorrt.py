"""The TensorRT target and runtime backend.

Builds need TensorRT-RTX (marker ``tensorrt``; it builds without a GPU). Running an engine needs a GPU (marker
``gpu``): on a machine without one that test is skipped, and the engine loop was NOT run. Everything the runtime
checks before deserializing (version, compute capability, binding plans, profiles) is tested here without a GPU.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from lcm_export.errors import ExportError, UserError
from lcm_export.exporter.onnx_export import FINITE_MASK_FILL_KEY, use_finite_mask_fills
from lcm_export.runtime.backends import BackendOptions
from lcm_export.runtime.backends import tensorrt as trt_backend
from lcm_export.runtime.manifest import Artifact, Component, TensorRTEngineDetails, load_manifest
from lcm_export.runtime.specs import ComponentProfiles, ComponentSpec, ShapeRange, TensorSpec
from lcm_export.targets import tensorrt as trt_target
from tests.helpers import (
    HAS_RTX,
    assert_one_line_error,
    export,
    image_psnr,
    needs_rtx,
    no_leftovers,
    random_inputs,
    sdxl_source,
)
from tests.helpers import export_cli_blocking as cli

COMPONENTS = ("text_encoder", "unet", "vae_decoder", "vae_encoder")
HAS_STANDARD = trt_backend.import_flavor("tensorrt") is not None
# fp16 vs fp32 images of the tiny model: fp16 rounds to 2**-11 (4.9e-4) relative; an image off by about two fp16
# steps RMS on [0, 1] (1e-3) is 60 dB. Measured on this tiny model: 71-73 dB. Real SD-sized models accumulate
# more error over 4 U-Net calls; Apple's gate for converted SD models is 35 dB (ml-stable-diffusion).
MIN_FP16_PSNR = 60.0


def engine_profiles(bundle: Path, dynamic: bool) -> dict[str, dict]:
    """The profiles the specs imply for this bundle (what the manifest must record), computed afresh."""
    from lcm_export.exporter.bundle import ExportConfig, engine_shape_range

    manifest = load_manifest(bundle)
    config = ExportConfig(model="unused", output=bundle, target="tensorrt", dynamic=dynamic)
    shape_range = engine_shape_range(config, manifest.pipeline, manifest.tokenizers[0].max_length)
    return {
        name: ComponentProfiles.derive(component.spec, shape_range, manifest.pipeline.vae_scale_factor).to_json()
        for name, component in manifest.components.items()
    }


def check_engines(bundle: Path, keep_onnx: bool) -> dict:
    """Every component of the model's family has an engine listed in the manifest (hashed), built by TensorRT-RTX,
    whose I/O names, dtypes and shapes equal the spec's (-1 where the spec has a symbol) and whose optimisation
    profile gives every input the spec's rank and fixed dims; the ONNX files are there only with --keep-onnx."""
    import tensorrt_rtx_bindings

    manifest = load_manifest(bundle, verify="full")
    listed = {entry.path for entry in manifest.files}
    assert manifest.target == "tensorrt" and manifest.precision == "fp16"
    family_encoders = ("text_encoder_2",) if manifest.pipeline.family == "sdxl" else ()
    assert set(manifest.components) == {*COMPONENTS, *family_encoders}
    for name, component in manifest.components.items():
        artifact = component.artifacts["tensorrt"]
        assert artifact.path == f"{name}/model.plan" and artifact.path in listed
        assert (bundle / artifact.path).stat().st_size > 100_000
        assert artifact.details["flavor"] == "rtx"
        assert artifact.details["trt_version"] == tensorrt_rtx_bindings.__version__
        assert artifact.precision == ("fp32" if name.startswith("vae") else "fp16")
        io = [trt_backend.IOTensor.from_json(entry) for entry in artifact.details["io"]]
        spec = component.spec.with_dtypes(artifact.io_dtype)  # the engine variant's own dtypes
        assert [t.name for t in io if t.mode == "input"] == spec.input_names
        assert [t.name for t in io if t.mode == "output"] == spec.output_names
        profiles = artifact.details["profiles"]
        for tensor in (*spec.inputs, *spec.outputs):
            (engine_tensor,) = [t for t in io if t.name == tensor.name]
            assert engine_tensor.dtype == tensor.dtype, (name, tensor.name)
            symbolic = tuple(-1 if isinstance(dim, str) else dim for dim in tensor.shape)
            assert engine_tensor.shape == symbolic, (name, tensor.name, engine_tensor.shape, tensor.shape)
            if tensor in spec.inputs:
                for stage in ("min", "opt", "max"):
                    shape = profiles[tensor.name][stage]
                    assert len(shape) == len(symbolic), (name, tensor.name, stage)
                    assert all(want in (-1, got) for want, got in zip(symbolic, shape, strict=True)), (name, stage)
        if keep_onnx:
            assert set(component.artifacts) == {"onnx", "tensorrt"}
            assert (bundle / component.artifacts["onnx"].path).is_file()
        else:
            assert set(component.artifacts) == {"tensorrt"}
    if not keep_onnx:
        assert not list(bundle.rglob("*.onnx")) and not list(bundle.rglob("*.onnx_data"))
        assert not [path for path in listed if ".onnx" in path]
    return manifest


@pytest.fixture(scope="module")
def rtx_bundle(tiny_lcm_dir, tmp_path_factory) -> Path:
    """Static TensorRT-RTX engines with the ONNX kept, through the library API."""
    if not HAS_RTX:
        pytest.skip("TensorRT-RTX is not installed")
    start = time.perf_counter()
    bundle = export(
        tiny_lcm_dir, tmp_path_factory.mktemp("trt") / "static", target="tensorrt", target_options={"keep_onnx": True}
    )
    print(f"\nstatic TensorRT-RTX bundle (export + 4 engines): {time.perf_counter() - start:.1f} s")
    return bundle


# The tiny LCM, the tiny distilled LCM-SDXL, and tests.helpers.OTHER_SDXL with a LoRA fused (classifier-free
# guidance: the CFG components' batch profile is 1-2 even in a static build).
ENGINE_MODELS = ("tiny-lcm", "tiny-sdxl-lcm", "other-sdxl-lora")


@pytest.fixture(scope="module", params=ENGINE_MODELS)
def engine_bundle(request, tmp_path_factory) -> Path:
    """Static TensorRT-RTX engines (ONNX kept) of each of ENGINE_MODELS, through the library API."""
    if request.param == "tiny-lcm":
        return request.getfixturevalue("rtx_bundle")
    if not HAS_RTX:
        pytest.skip("TensorRT-RTX is not installed")
    model, loras = sdxl_source(request, request.param)
    start = time.perf_counter()
    bundle = export(
        model,
        tmp_path_factory.mktemp("trt") / request.param,
        loras=loras,
        target="tensorrt",
        target_options={"keep_onnx": True},
    )
    print(f"\n{request.param} static TensorRT-RTX bundle (export + engines): {time.perf_counter() - start:.1f} s")
    return bundle


# -- (1) builds ------------------------------------------------------------------------------------------------


@pytest.mark.tensorrt
@needs_rtx
def test_library_builds_static_engines(rtx_bundle) -> None:
    manifest = check_engines(rtx_bundle, keep_onnx=True)
    expected = engine_profiles(rtx_bundle, dynamic=False)
    for name, component in manifest.components.items():
        details = component.artifacts["tensorrt"].details
        assert details["profiles"] == expected[name]
        assert details["compute_capabilities"] == []  # TensorRT-RTX's default targets
        print(
            f"{name}: {(rtx_bundle / name / 'model.plan').stat().st_size / 2**20:.2f} MiB, "
            f"built in {details['build_seconds']} s"
        )
    unet = manifest.components["unet"].artifacts["tensorrt"].details["profiles"]
    assert unet["sample"] == {"min": [1, 4, 16, 16], "opt": [1, 4, 16, 16], "max": [1, 4, 16, 16]}
    assert unet["timestep"] == {"min": [1], "opt": [1], "max": [1]}  # one per row, like the sample's batch


class _FakeRefitter:
    """TensorRT's Refitter as far as refit_engine uses it, over a fake engine: the refittable names, the weights
    it holds after a refit."""

    def __init__(self, engine, logger) -> None:
        self.engine, self.staged = engine, {}

    def set_named_weights(self, name, weights) -> bool:
        if name not in self.engine.weights:
            return False
        self.staged[name] = np.array(weights.values)
        return True

    def get_missing_weights(self) -> list[str]:
        return list(getattr(self.engine, "missing", []))

    def refit_cuda_engine(self) -> bool:
        self.engine.weights.update(self.staged)
        return True


class _FakeTensorRT:
    Refitter = _FakeRefitter

    @staticmethod
    def Weights(values):  # TensorRT's name
        return type("Weights", (), {"values": values})


@pytest.mark.tensorrt
@needs_rtx
def test_refittable_engines_take_an_adapter_by_initializer_name(rtx_bundle, tmp_path) -> None:
    """What --trt-refit rests on, checked without a GPU (TensorRT-RTX 1.7 compiles refittable weights with CUDA while
    it builds, so the refittable engine itself cannot be built here):

    - TensorRT's ONNX parser names the weights after the initializers: every weight the U-Net's and the text
      encoder's weight maps list can be marked refittable by that name in the network parsed from the fp16 ONNX an
      engine is built from (what build_engine does with --trt-refit), and a name that is not a weight cannot;
    - an adapter's merged weights for the engine's variant are keyed by those names, in that ONNX's dtype and
      layout, with the adapter's ΔW added;
    - refit_engine hands exactly those to TensorRT's Refitter (a stand-in here) and refuses a name the engine cannot
      refit, and check_refittable refuses an engine built without --trt-refit and INT8 weights, one line each."""
    import onnx

    from lcm_export.runtime import adapters

    manifest = load_manifest(rtx_bundle)
    state = adapters.AdapterState(rtx_bundle, manifest)
    flavor = trt_target.resolve_flavor("rtx")
    trt = flavor.module
    for name in ("unet", "text_encoder"):
        engine = manifest.components[name].artifacts["tensorrt"]
        weight_map = state.weight_maps[name]
        assert engine.name in weight_map.variants  # the engine's weights are where its ONNX variant's are
        builder = trt.Builder(trt_target.collecting_logger(trt))
        network, _ = trt_target.parse_onnx(
            flavor, builder, trt_target.collecting_logger(trt), rtx_bundle / engine.produced_by["from"], name
        )
        assert all(network.mark_weights_refittable(weight) for weight in weight_map.weights), name
        assert not network.mark_weights_refittable("no such weight")
    unet_map = state.weight_maps["unet"]
    engine = manifest.components["unet"].artifacts["tensorrt"]
    model = onnx.load(str(rtx_bundle / engine.produced_by["from"]))
    initializers = {tensor.name: onnx.numpy_helper.to_array(tensor) for tensor in model.graph.initializer}
    # a rank-2 adapter on every mapped U-Net weight, in the factors' layout lcm-export adapter writes
    layers = tuple(
        adapters.AdapterLayer(
            "unet",
            weight,
            np.full((2, int(np.prod(mapped.torch_shape[1:]))), 0.1, np.float32),
            np.full((mapped.torch_shape[0], 2), 0.2, np.float32),
        )
        for weight, mapped in unet_map.weights.items()
    )
    adapter = adapters.Adapter(tmp_path / "a.adapter", "test", layers)
    merged = adapters.merged_weights(rtx_bundle, manifest, unet_map, engine.name, [(adapter, 1.0)])
    assert set(merged.values) == set(unet_map.weights)
    for weight, value in merged.values.items():
        base = initializers[weight]
        assert value.dtype == base.dtype == np.float16 and value.shape == base.shape
        # ΔW = up·down = 2 x 0.1 x 0.2 everywhere, whatever the layout; fp16 rounds each sum by under 1e-3
        np.testing.assert_allclose(value.astype(np.float32) - base.astype(np.float32), 0.04, atol=2e-3)
    fake_engine = type("Engine", (), {})()
    fake_engine.weights = {weight: initializers[weight] for weight in merged.values}
    trt_backend.refit_engine(_FakeTensorRT, fake_engine, None, merged.values, "engine")
    assert all(np.array_equal(fake_engine.weights[w], v) for w, v in merged.values.items())
    fake_engine.missing = ["paired_weight"]
    with pytest.raises(
        trt_backend.AdapterError, match=r"^engine: TensorRT also needs the weights paired_weight to refit"
    ):
        trt_backend.refit_engine(_FakeTensorRT, fake_engine, None, merged.values, "engine")
    fake_engine.missing = []
    fake_engine.weights.pop(next(iter(merged.values)))
    with pytest.raises(trt_backend.AdapterError, match=r"^engine has no refittable weight '.+': re-export with"):
        trt_backend.refit_engine(_FakeTensorRT, fake_engine, None, merged.values, "engine")
    details = engine.tensorrt_details
    assert details.refittable is False  # built without --trt-refit
    with pytest.raises(
        trt_backend.AdapterError, match=r"^engine is not refittable: re-export with --target tensorrt --trt-refit"
    ):
        trt_backend.check_refittable("engine", details, merged)
    refittable = dataclasses.replace(details, refittable=True)
    trt_backend.check_refittable("engine", refittable, merged)
    int8 = adapters.WeightOverrides({"w_quantized": np.zeros(3, np.int8)}, {})
    with pytest.raises(trt_backend.AdapterError, match=r"an INT8 engine is not refit"):
        trt_backend.check_refittable("engine", refittable, int8)
    assert TensorRTEngineDetails.from_json(refittable.to_json(), "details").refittable is True


@pytest.mark.tensorrt
@needs_rtx
def test_trt_refit_without_a_gpu_is_one_line(tiny_lcm_dir, tmp_path) -> None:
    """--trt-refit on a machine without an NVIDIA GPU stops before the model loads, naming why; nothing written."""
    if trt_backend.gpu_count():
        pytest.skip("a GPU is present: --trt-refit builds here")
    result = cli(tiny_lcm_dir, "--target", "tensorrt", "--trt-refit", "--output", tmp_path / "out")
    assert_one_line_error(result, "--trt-refit: TensorRT-RTX", "no NVIDIA GPU was found: build on a machine with one")
    no_leftovers(tmp_path / "out")


@pytest.mark.tensorrt
@needs_rtx
def test_engine_io_matches_the_onnx_it_was_built_from(engine_bundle) -> None:
    """Re-read each kept ONNX with onnx (independent of TensorRT) and with TensorRT-RTX's parser."""
    import onnx

    manifest = load_manifest(engine_bundle)
    flavor = trt_target.resolve_flavor("rtx")
    element_types = {
        onnx.TensorProto.FLOAT: "float32",
        onnx.TensorProto.FLOAT16: "float16",
        onnx.TensorProto.INT64: "int64",
    }
    for name, component in manifest.components.items():
        onnx_path = engine_bundle / component.artifacts["onnx"].path
        graph = onnx.load(str(onnx_path), load_external_data=False).graph
        from_onnx = [(v.name, element_types[v.type.tensor_type.elem_type]) for v in (*graph.input, *graph.output)]
        recorded = [(t["name"], t["dtype"]) for t in component.artifacts["tensorrt"].details["io"]]
        assert recorded == from_onnx, name
        logger = trt_target.collecting_logger(flavor.module)
        network, _parser = trt_target.parse_onnx(flavor, flavor.module.Builder(logger), logger, onnx_path, name)
        reparsed = [t.to_json() for t in trt_target.network_io(flavor, network)]
        assert reparsed == component.artifacts["tensorrt"].details["io"], name


@pytest.mark.tensorrt
@needs_rtx
def test_cli_builds_dynamic_engines_without_onnx(tiny_lcm_dir, tmp_path) -> None:
    output = tmp_path / "dynamic"
    ignored_cache = tmp_path / "timing.cache"
    start = time.perf_counter()
    result = cli(
        tiny_lcm_dir,
        "--output",
        output,
        "--target",
        "tensorrt",
        "--trt-flavor",
        "rtx",
        "--dynamic",
        "--compute-capability",
        "86",
        "--compute-capability",
        "SM89",
        "--workspace",
        "512MiB",
        "--timing-cache",
        ignored_cache,
    )
    print(f"\nCLI --dynamic TensorRT-RTX bundle: {time.perf_counter() - start:.1f} s")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "build TensorRT-RTX engines" in result.stderr  # the progress bar
    assert "--timing-cache is ignored with TensorRT-RTX" in result.stdout + result.stderr
    assert not ignored_cache.exists()
    manifest = check_engines(output, keep_onnx=False)
    expected = engine_profiles(output, dynamic=True)
    for name, component in manifest.components.items():
        details = component.artifacts["tensorrt"].details
        assert details["profiles"] == expected[name]
        assert details["compute_capabilities"] == [86, 89]
        size = (output / name / "model.plan").stat().st_size / 2**20
        print(f"{name} (dynamic): {size:.2f} MiB, built in {details['build_seconds']} s")
    # 32 px default, multiple of 4: heights 16..48, batch 1..4; latents are half that (VAE factor 2).
    unet = manifest.components["unet"].artifacts["tensorrt"].details["profiles"]
    assert unet["sample"] == {"min": [1, 4, 8, 8], "opt": [1, 4, 16, 16], "max": [4, 4, 24, 24]}
    decoder = manifest.components["vae_decoder"].artifacts["tensorrt"].details["profiles"]
    assert decoder["latent_sample"]["max"] == [4, 4, 24, 24]


def _tiny_onnx(path: Path, op_types: tuple[str, ...], external_data: bool = False) -> Path:
    """A chain of ``op_types`` over (1, 4) float32, with one weight added first (stored beside it if asked)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    weight = numpy_helper.from_array(np.arange(4, dtype=np.float32).reshape(1, 4), "weight")
    nodes = [helper.make_node("Add", ["x", "weight"], ["h0"], name="add")]
    for index, op_type in enumerate(op_types):
        nodes.append(helper.make_node(op_type, [f"h{index}"], [f"h{index + 1}"], name=f"node{index}"))
    nodes.append(helper.make_node("Identity", [f"h{len(op_types)}"], ["y"], name="out"))
    value = helper.make_tensor_value_info
    graph = helper.make_graph(
        nodes, "g", [value("x", TensorProto.FLOAT, [1, 4])], [value("y", TensorProto.FLOAT, [1, 4])], [weight]
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save_model(model, str(path), save_as_external_data=external_data, location="model.onnx_data", size_threshold=0)
    return path


@pytest.mark.tensorrt
@needs_rtx
def test_parser_reports_every_error(tmp_path) -> None:
    flavor = trt_target.resolve_flavor("rtx")
    logger = trt_target.collecting_logger(flavor.module)
    path = _tiny_onnx(tmp_path / "bad" / "model.onnx", ("NoSuchOp", "Relu", "AlsoMissing"))
    with pytest.raises(ExportError) as caught:
        trt_target.parse_onnx(flavor, flavor.module.Builder(logger), logger, path, "unet")
    message = str(caught.value)
    assert "\n" not in message and message.startswith("unet: TensorRT-RTX")
    assert "(2 error(s))" in message and "'node0' (NoSuchOp)" in message and "'node2' (AlsoMissing)" in message


@pytest.mark.tensorrt
@needs_rtx
def test_engines_match_the_spec(engine_bundle) -> None:
    """Every model's engines against its manifest: I/O, profiles from the spec (SDXL: both text encoders with all
    of optimum's hidden states, the U-Net's text_embeds and time_ids), and the batch range of the CFG batch."""
    manifest = check_engines(engine_bundle, keep_onnx=True)
    expected = engine_profiles(engine_bundle, dynamic=False)
    for name, component in manifest.components.items():
        details = component.artifacts["tensorrt"].details
        assert details["profiles"] == expected[name]
        size = (engine_bundle / name / "model.plan").stat().st_size / 2**20
        print(f"{name}: {size:.2f} MiB, built in {details['build_seconds']} s")
    cfg = 2 if manifest.pipeline.guidance == "cfg" else 1  # the CFG batch: 1x at min (guidance <= 1), 2x above
    unet = manifest.components["unet"].artifacts["tensorrt"].details["profiles"]
    assert unet["sample"] == {"min": [1, 4, 16, 16], "opt": [cfg, 4, 16, 16], "max": [cfg, 4, 16, 16]}
    if manifest.pipeline.family != "sdxl":
        return
    (pooled_width,) = manifest.components["text_encoder_2"].spec.outputs[0].shape[1:]
    assert unet["text_embeds"] == {"min": [1, pooled_width], "opt": [cfg, pooled_width], "max": [cfg, pooled_width]}
    assert unet["time_ids"] == {"min": [1, 6], "opt": [cfg, 6], "max": [cfg, 6]}
    for encoder in ("text_encoder", "text_encoder_2"):
        config = json.loads((engine_bundle / encoder / "config.json").read_text())
        io = manifest.components[encoder].artifacts["tensorrt"].details["io"]
        layers = config["num_hidden_layers"]
        first = (
            ["text_embeds", "last_hidden_state"]
            if encoder == "text_encoder_2"
            else ["last_hidden_state", "pooler_output"]
        )
        assert [entry["name"] for entry in io[1:3]] == first  # optimum's order (diffusers pools a 2-d first output)
        assert [entry["name"] for entry in io[-(layers + 1) :]] == [f"hidden_states.{i}" for i in range(layers + 1)]
        finite_fill = config["hidden_size"] // config["num_attention_heads"] % 8 != 0  # see test (1b)
        assert (FINITE_MASK_FILL_KEY in onnx_metadata(engine_bundle / encoder / "model.onnx")) == finite_fill


@pytest.mark.tensorrt
@needs_rtx
def test_runtime_binding_plans_follow_the_spec(engine_bundle) -> None:
    """What the runtime backend allocates for every engine at its profile's min, opt and max (no GPU needed): the
    inputs as given, every output (all of an SDXL text encoder's hidden states, the U-Net's out_sample) at the
    shape its spec implies."""
    check_binding_plans(engine_bundle)


def check_binding_plans(engine_bundle: Path) -> None:
    """Every engine's binding plan at its profile's min, opt and max: the outputs at the shapes their specs imply."""
    manifest = load_manifest(engine_bundle)
    factor = manifest.pipeline.vae_scale_factor
    for name, component in manifest.components.items():
        artifact = component.artifacts["tensorrt"]
        io = [trt_backend.IOTensor.from_json(entry) for entry in artifact.details["io"]]
        spec = component.spec.with_dtypes(artifact.io_dtype)
        profiles = artifact.details["profiles"]
        for stage in ("min", "opt", "max"):
            shapes = {tensor: tuple(ranges[stage]) for tensor, ranges in profiles.items()}
            trt_backend.check_profile(f"{name} {stage}", artifact.tensorrt_details.profiles, shapes)
            plan = {binding.name: binding for binding in trt_backend.binding_plan(spec, io, shapes, factor)}
            assert list(plan) == [tensor.name for tensor in io]
            values = trt_backend.resolve_symbols(spec, shapes, factor)
            for tensor in spec.outputs:
                binding = plan[tensor.name]
                assert binding.shape == tensor.concrete_shape(values), (name, stage, tensor.name)
                assert binding.nbytes == np.prod(binding.shape) * np.dtype(tensor.dtype).itemsize


@pytest.mark.tensorrt
@needs_rtx
def test_controlnet_int8_engines_follow_the_specs(tiny_lcm_dir, tmp_path) -> None:
    """A ControlNet bundle for TensorRT-RTX, INT8 and dynamic: the residual U-Net and the ControlNet are INT8 engines
    built from their QDQ files, each residual input's and output's profile is its spec's at every latent scale
    (down-sampling 1x, 2x, .. from the batch and size range), the engines' I/O is the spec's, and the runtime's
    binding plans give every residual the shape the U-Net takes. Running them needs a GPU (not here)."""
    from lcm_export.exporter.controlnet import ControlNetSource
    from lcm_export.exporter.tiny import build_controlnet

    controlnet = build_controlnet(tmp_path / "cn", tiny_lcm_dir, seed=1)
    bundle = export(
        tiny_lcm_dir,
        tmp_path / "trt-controlnet",
        target="tensorrt",
        precision="int8",
        dynamic=True,
        calibration_size=2,
        controlnets=(ControlNetSource(str(controlnet)),),
    )
    manifest = load_manifest(bundle, verify="full")
    assert manifest.controlnet is not None and set(manifest.components) == {*COMPONENTS, "controlnet"}
    expected = engine_profiles(bundle, dynamic=True)
    for name, component in manifest.components.items():
        artifact = component.artifacts["tensorrt"]
        assert set(component.artifacts) == {"tensorrt"} and (bundle / artifact.path).stat().st_size > 50_000
        assert artifact.details["profiles"] == expected[name]
        io = [trt_backend.IOTensor.from_json(entry) for entry in artifact.details["io"]]
        spec = component.spec.with_dtypes(artifact.io_dtype)
        assert [t.name for t in io if t.mode == "input"] == spec.input_names
        assert [t.name for t in io if t.mode == "output"] == spec.output_names
    for name in ("unet", "controlnet"):
        artifact = manifest.components[name].artifacts["tensorrt"]
        assert artifact.precision == "int8" and artifact.produced_by["from"] == f"{name}/model-int8.onnx", name
    # The residuals: each ControlNet output's profile range is the U-Net input's, at its latent scale.
    unet = manifest.components["unet"].artifacts["tensorrt"].details["profiles"]
    sample = unet["sample"]
    residuals = {t.name: t for t in manifest.components["controlnet"].spec.outputs}
    assert list(residuals) == list(manifest.controlnet.residual_inputs)
    scales = set()
    for name, tensor in residuals.items():
        scale = sample["max"][2] // unet[name]["max"][2]
        scales.add(scale)
        for stage in ("min", "opt", "max"):
            assert unet[name][stage][0] == sample[stage][0] and unet[name][stage][1] == tensor.shape[1]
            assert unet[name][stage][2:] == [size // scale for size in sample[stage][2:]], (name, stage)
    assert scales == {1, 2}  # the tiny U-Net's two down-sampling levels
    assert unet["sample"]["min"] != unet["sample"]["max"]  # dynamic: a real range
    check_binding_plans(bundle)


@pytest.mark.tensorrt
@needs_rtx
def test_external_weights_resolve_from_the_model_folder(tmp_path, monkeypatch) -> None:
    path = _tiny_onnx(tmp_path / "unet" / "model.onnx", ("Relu",), external_data=True)
    assert (path.parent / "model.onnx_data").is_file()
    monkeypatch.chdir(tmp_path)  # not the model's folder
    flavor = trt_target.resolve_flavor("rtx")
    logger = trt_target.collecting_logger(flavor.module)
    network, _parser = trt_target.parse_onnx(flavor, flavor.module.Builder(logger), logger, path, "unet")
    assert [t.name for t in trt_target.network_io(flavor, network)] == ["x", "y"]


# -- (1b) causal masks of text encoders with unusual head sizes ------------------------------------------------


def mask_fill_constants(onnx_path: Path) -> dict[str, int]:
    """How many float16 constants hold -inf and how many hold -65504, initializers and Constant nodes alike."""
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(str(onnx_path)).graph
    tensors = [*graph.initializer]
    tensors += [attribute.t for node in graph.node for attribute in node.attribute if attribute.HasField("t")]
    counts = {"-inf": 0, "-65504": 0}
    for tensor in tensors:
        if tensor.data_type == onnx.TensorProto.FLOAT16:
            values = numpy_helper.to_array(tensor)
            counts["-inf"] += bool(np.isneginf(values).any())
            counts["-65504"] += bool((values == np.float16(-65504)).any())
    return counts


def onnx_metadata(onnx_path: Path) -> dict[str, str]:
    import onnx

    return {entry.key: entry.value for entry in onnx.load(str(onnx_path), load_external_data=False).metadata_props}


@pytest.fixture(scope="module")
def head_size_10_dir(tmp_path_factory) -> Path:
    """A tiny LCM whose CLIP text encoder has 4 heads of size 10 (hidden 40); the U-Net attends to 40 features."""
    from lcm_export.exporter.tiny import TinyPipelineConfig, build_tiny_pipeline

    config = TinyPipelineConfig(text_hidden_size=40, text_heads=4, cross_attention_dim=40)
    return build_tiny_pipeline(tmp_path_factory.mktemp("head-size-10"), config)


@pytest.fixture(scope="module")
def head_size_10_bundle(head_size_10_dir, tmp_path_factory) -> Path:
    """Static TensorRT-RTX engines of that pipeline with the ONNX kept, through the library API."""
    if not HAS_RTX:
        pytest.skip("TensorRT-RTX is not installed")
    start = time.perf_counter()
    bundle = export(
        head_size_10_dir,
        tmp_path_factory.mktemp("trt") / "head-size-10",
        target="tensorrt",
        target_options={"keep_onnx": True},
    )
    print(f"\nhead size 10 TensorRT-RTX bundle (export + 4 engines): {time.perf_counter() - start:.1f} s")
    return bundle


@pytest.mark.tensorrt
@needs_rtx
def test_text_encoder_with_head_size_10_builds(head_size_10_bundle) -> None:
    """With the -inf mask fill TensorRT-RTX 1.7 stops in Myelin (CHECK(op->input_layouts().size() > idx));
    the exporter writes -65504 for this encoder, and every engine builds."""
    manifest = check_engines(head_size_10_bundle, keep_onnx=True)  # all four: listed, hashed, > 100 kB, I/O
    for name, component in manifest.components.items():
        details = component.artifacts["tensorrt"].details
        print(
            f"{name}: {(head_size_10_bundle / name / 'model.plan').stat().st_size / 2**20:.2f} MiB, "
            f"built in {details['build_seconds']} s"
        )
    text_encoder_onnx = head_size_10_bundle / "text_encoder" / "model.onnx"
    assert onnx_metadata(text_encoder_onnx)[FINITE_MASK_FILL_KEY] == "2"  # one causal mask per layer
    assert mask_fill_constants(text_encoder_onnx) == {"-inf": 0, "-65504": 2}
    assert FINITE_MASK_FILL_KEY not in onnx_metadata(head_size_10_bundle / "unet" / "model.onnx")


@pytest.mark.tensorrt
@needs_rtx
def test_finite_mask_fills_keep_the_onnxruntime_outputs(head_size_10_dir, head_size_10_bundle, tmp_path) -> None:
    """The text encoder's fp16 ONNX in the bundle against the same export without the rewrite: equal outputs
    (masked scores softmax to exactly 0 either way). Measured: max abs diff 0.0 on both outputs."""
    import onnxruntime

    from lcm_export.exporter.components import build_components
    from lcm_export.exporter.loading import load_pipeline
    from lcm_export.exporter.onnx_export import export_to_onnx
    from lcm_export.runtime.specs import sample_inputs

    component = build_components(load_pipeline(str(head_size_10_dir)), ["text_encoder"])["text_encoder"]
    assert component.finite_mask_fills
    unfixed = tmp_path / "unfixed" / "model.onnx"
    export_to_onnx(
        dataclasses.replace(component, finite_mask_fills=False), unfixed, {"batch": 1, "sequence": 77}, precision="fp16"
    )
    assert mask_fill_constants(unfixed) == {"-inf": 2, "-65504": 0}  # what TensorRT-RTX cannot build
    fixed = head_size_10_bundle / "text_encoder" / "model.onnx"

    feeds = sample_inputs(component.spec, {"batch": 3, "sequence": 77}, seed=5)
    outputs = {}
    for label, path in (("unfixed", unfixed), ("fixed", fixed)):
        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        outputs[label] = session.run(component.spec.output_names, feeds)
    for name, before, after in zip(component.spec.output_names, outputs["unfixed"], outputs["fixed"], strict=True):
        assert after.dtype == np.float16 and np.isfinite(after).all() and after.std() > 0.1
        difference = float(np.abs(before.astype(np.float32) - after.astype(np.float32)).max())
        print(f"{name}: max abs diff {difference} (max abs {float(np.abs(before).max()):.3g})")
        assert difference == 0.0, name


@pytest.mark.tensorrt
@needs_rtx
def test_head_size_8_text_encoder_keeps_its_mask(rtx_bundle) -> None:
    """The fix stays out of encoders that build without it: head size 8 (and CLIP-L's 64) keep the -inf."""
    text_encoder_onnx = rtx_bundle / "text_encoder" / "model.onnx"
    assert FINITE_MASK_FILL_KEY not in onnx_metadata(text_encoder_onnx)
    assert mask_fill_constants(text_encoder_onnx) == {"-inf": 2, "-65504": 0}


def test_finite_mask_fills_only_rewrite_float16_softmax_masks() -> None:
    """-inf becomes -65504 where it only masks a Softmax; a fill on its way to a ReduceMax or a graph output, and
    an fp32 one, stay -inf."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    def constant(name: str, value: float, dtype: type = np.float16) -> onnx.NodeProto:
        tensor = numpy_helper.from_array(np.array([value], dtype=dtype), name)
        return helper.make_node("Constant", [], [name], value=tensor)

    nodes = [
        constant("mask_fill", -np.inf),
        constant("zero", 0.0),
        helper.make_node("Where", ["condition", "mask_fill", "zero"], ["mask"]),
        helper.make_node("Add", ["scores", "mask"], ["masked"]),
        helper.make_node("Softmax", ["masked"], ["probabilities"], axis=-1),
        constant("max_fill", -np.inf),
        helper.make_node("Where", ["condition", "scores", "max_fill"], ["kept"]),
        helper.make_node("ReduceMax", ["kept"], ["maximum"], keepdims=1),
        constant("output_fill", -np.inf),
        helper.make_node("Add", ["scores", "output_fill"], ["shifted"]),
        constant("fp32_fill", -np.inf, np.float32),
        helper.make_node("Cast", ["scores"], ["scores32"], to=TensorProto.FLOAT),
        helper.make_node("Add", ["scores32", "fp32_fill"], ["masked32"]),
        helper.make_node("Softmax", ["masked32"], ["probabilities32"], axis=-1),
    ]
    value = helper.make_tensor_value_info
    graph = helper.make_graph(
        nodes,
        "masks",
        [value("scores", TensorProto.FLOAT16, [2, 2]), value("condition", TensorProto.BOOL, [2, 2])],
        [
            value("probabilities", TensorProto.FLOAT16, [2, 2]),
            value("maximum", TensorProto.FLOAT16, [2, 1]),
            value("shifted", TensorProto.FLOAT16, [2, 2]),
            value("probabilities32", TensorProto.FLOAT, [2, 2]),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    assert use_finite_mask_fills(model) == 1
    fills = {
        node.output[0]: numpy_helper.to_array(node.attribute[0].t)[0]
        for node in model.graph.node
        if node.op_type == "Constant" and node.output[0].endswith("_fill")
    }
    assert fills["mask_fill"] == np.float16(-65504)
    assert np.isneginf([fills["max_fill"], fills["output_fill"], fills["fp32_fill"]]).all()
    assert {entry.key: entry.value for entry in model.metadata_props} == {FINITE_MASK_FILL_KEY: "1"}


# -- (2) fp16 image quality ------------------------------------------------------------------------------------


@pytest.mark.tensorrt
@needs_rtx
def test_fp16_onnx_image_psnr_against_fp32(rtx_bundle, tiny_lcm_bundle) -> None:
    """The fp16 graphs the engines were built from, run on onnxruntime, against the fp32 bundle."""
    from lcm_export.runtime import Pipeline

    fp16 = Pipeline.load(rtx_bundle, backend="onnxruntime")
    fp32 = Pipeline.load(tiny_lcm_bundle, backend="onnxruntime")
    figures = []
    for seed, guidance in ((0, 8.0), (1, 1.0), (2, 4.0)):
        latents, noise = random_inputs((1, 4, 16, 16), steps=4, seed=seed)
        reference = fp32("a photo of a cat", latents=latents, noise=noise, guidance_scale=guidance).images
        image = fp16("a photo of a cat", latents=latents, noise=noise, guidance_scale=guidance).images
        assert image.std() > 0.01
        figures.append(image_psnr(reference, image))
    print(f"\nfp16 (engine ONNX) vs fp32 PSNR: {', '.join(f'{value:.1f}' for value in figures)} dB")
    assert min(figures) > MIN_FP16_PSNR, figures


# -- (3) timing cache ------------------------------------------------------------------------------------------


class FakeTimingCache:
    def __init__(self, data: bytes) -> None:
        self.data = data

    def serialize(self) -> memoryview:
        return memoryview(self.data + b"+timings")


class FakeBuilderConfig:
    """The two calls the timing-cache helpers make on a TensorRT builder config (standard TensorRT is not
    installable here, and TensorRT-RTX's timing caches are no-ops that need a GPU even to deserialize)."""

    def __init__(self) -> None:
        self.received: list[bytes] = []

    def create_timing_cache(self, data: bytes) -> FakeTimingCache:
        self.received.append(bytes(data))
        return FakeTimingCache(bytes(data))


def test_timing_cache_written_then_read_back(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("LCM_EXPORT_CACHE_DIR", str(tmp_path / "cache"))
    path = trt_target.default_timing_cache_path("tensorrt", "10.13.0.35")
    assert path == tmp_path / "cache" / "trt-timing-tensorrt-10.13.0.35.cache"

    first = FakeBuilderConfig()
    cache, loaded = trt_target.load_timing_cache(first, path)
    assert loaded == 0 and first.received == [b""]  # no file yet: a new cache
    written = trt_target.save_timing_cache(cache, path)
    assert path.read_bytes() == b"+timings" and written == len(b"+timings")
    assert not list(path.parent.glob("*.tmp"))

    second = FakeBuilderConfig()
    cache, loaded = trt_target.load_timing_cache(second, path)  # the second build reads the first one's timings
    assert second.received == [b"+timings"] and loaded == len(b"+timings")
    trt_target.save_timing_cache(cache, path)
    assert path.read_bytes() == b"+timings+timings"


def test_unreadable_timing_cache_starts_fresh(tmp_path) -> None:
    class Rejecting(FakeBuilderConfig):
        def create_timing_cache(self, data: bytes):
            super().create_timing_cache(data)
            return None if data else FakeTimingCache(b"")

    path = tmp_path / "broken.cache"
    path.write_bytes(b"garbage")
    config = Rejecting()
    with pytest.warns(UserWarning, match="unreadable"):
        cache, loaded = trt_target.load_timing_cache(config, path)
    assert cache is not None and loaded == 0 and config.received == [b"garbage", b""]


# -- (4) errors ------------------------------------------------------------------------------------------------

ERROR_CASES = {
    "unknown flavour": (("--trt-flavor", "cuda"), (), ("--trt-flavor cuda", "auto, tensorrt, rtx")),
    "bad compute capability": (
        ("--trt-flavor", "rtx", "--compute-capability", "70"),
        (),
        ("--compute-capability 70", "75, 80, 86, 89, 120, 121"),
    ),
    "malformed compute capability": (("--compute-capability", "ampere"), (), ("--compute-capability ampere", "SM89")),
    "standard TensorRT missing": (
        ("--trt-flavor", "tensorrt"),
        ("tensorrt",),
        ("--trt-flavor tensorrt", "pip install tensorrt"),
    ),
    "no TensorRT at all": (
        (),
        ("tensorrt", "tensorrt_rtx_bindings"),
        ("--target tensorrt needs TensorRT", "pip install 'lcm-edge[tensorrt]'", "pip install tensorrt"),
    ),
    "bad workspace": (("--workspace", "lots"), (), ("--workspace 'lots'", "4GiB")),
}


@pytest.mark.parametrize("case", list(ERROR_CASES))
def test_bad_tensorrt_options_fail_before_loading_the_model(tmp_path, case) -> None:
    """One line, exit 1, no traceback, no folder; the model path does not exist, so these errors come first."""
    args, blocked, needles = ERROR_CASES[case]
    if "tensorrt_rtx_bindings" not in blocked and not HAS_RTX:
        pytest.skip("TensorRT-RTX is not installed")
    if "tensorrt" not in blocked and HAS_STANDARD:
        pytest.skip("standard TensorRT is installed: auto picks it and these flags differ")
    output = tmp_path / "out"
    result = cli(tmp_path / "no-such-model", "--output", output, "--target", "tensorrt", *args, blocked=blocked)
    assert_one_line_error(result, *needles)
    no_leftovers(output)


def test_modules_import_without_tensorrt() -> None:
    code = (
        "import sys\n"
        "sys.modules['tensorrt'] = sys.modules['tensorrt_rtx_bindings'] = None\n"
        "import lcm_export.targets.tensorrt, lcm_export.runtime.backends.tensorrt as backend\n"
        "from lcm_export.runtime.backends import choose_backend\n"
        "assert not backend.is_available()\n"
        "assert choose_backend('auto', {'onnx', 'tensorrt'}) != 'tensorrt'\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr


def test_build_options_from_target_options() -> None:
    options = trt_target.TensorRTBuildOptions.from_target_options(
        {"trt_flavor": "rtx", "compute_capabilities": ("86", "SM89", "8.6"), "workspace": "1.5GiB"}
    )
    assert options.compute_capabilities == (86, 89)
    assert options.workspace_bytes == int(1.5 * 2**30)
    assert trt_target.parse_size("--workspace", "512MiB") == 512 * 2**20
    assert trt_target.parse_size("--workspace", "2GB") == 2 * 10**9
    with pytest.raises(ExportError, match="builder-optimization-level 9"):
        trt_target.TensorRTBuildOptions.from_target_options({"builder_optimization_level": 9})


# -- (5) runtime checks without a GPU --------------------------------------------------------------------------

LABEL = "BUNDLE 'b': engine 'unet/model.plan'"


def test_version_mismatch_is_one_line_user_error() -> None:
    with pytest.raises(UserError) as caught:
        trt_backend.check_engine_version(LABEL, "rtx", "1.7.1.116", "1.8.0.12")
    message = str(caught.value)
    assert "\n" not in message and "unet/model.plan" in message
    assert "TensorRT-RTX 1.7.1.116" in message and "1.8.0.12 is installed" in message and "re-export" in message
    with pytest.raises(UserError, match=r"not installed: pip install 'lcm-edge\[tensorrt\]'"):
        trt_backend.check_engine_version(LABEL, "rtx", "1.7.1.116", None)
    with pytest.raises(UserError, match="pip install tensorrt"):
        trt_backend.check_engine_version(LABEL, "tensorrt", "10.13.0.35", None)
    trt_backend.check_engine_version(LABEL, "rtx", "1.7.1.116", "1.7.1.116")


def test_compute_capability_mismatch_is_one_line_user_error() -> None:
    with pytest.raises(UserError) as caught:
        trt_backend.check_compute_capability(LABEL, "rtx", [86, 89], 120)
    message = str(caught.value)
    assert "\n" not in message and "unet/model.plan" in message
    assert "8.6, 8.9" in message and "12.0" in message and "--compute-capability 120" in message
    with pytest.raises(UserError, match="--compute-capability 75"):
        trt_backend.check_compute_capability(LABEL, "rtx", [], 75)  # RTX's default targets exclude Turing
    with pytest.raises(UserError, match="on a machine with this GPU"):
        trt_backend.check_compute_capability(LABEL, "tensorrt", [89], 86)
    trt_backend.check_compute_capability(LABEL, "rtx", [86, 89], 89)
    trt_backend.check_compute_capability(LABEL, "rtx", [], 120)
    assert [trt_backend.parse_compute_capability(v) for v in ("86", 89, "SM120", "sm_75", "8.6")] == [
        86,
        89,
        120,
        75,
        86,
    ]


@pytest.mark.tensorrt
@needs_rtx
def test_open_session_checks_before_deserializing(rtx_bundle) -> None:
    """A real bundle: a changed version fails on the version; an intact one on the missing GPU (not a crash)."""
    manifest = load_manifest(rtx_bundle)
    unet = manifest.components["unet"]
    artifact = unet.artifacts["tensorrt"]
    stale = Artifact(artifact.format, artifact.path, artifact.precision, {**artifact.details, "trt_version": "1.0.0.1"})
    with pytest.raises(UserError, match=r"built with TensorRT-RTX 1\.0\.0\.1 but TensorRT-RTX .* is installed"):
        trt_backend.open_session(rtx_bundle, Component(unet.spec, (stale,)), BackendOptions())
    if trt_backend.gpu_count() == 0:
        with pytest.raises(UserError, match="needs an NVIDIA GPU"):
            trt_backend.open_session(rtx_bundle, unet, BackendOptions())


def tiny_unet_spec() -> ComponentSpec:
    """The tiny LCM U-Net's spec after the fp16 conversion (as in its manifest)."""
    return ComponentSpec(
        name="unet",
        inputs=(
            TensorSpec("sample", "float16", ("batch", 4, "latent_height", "latent_width")),
            TensorSpec("timestep", "float16", ()),
            TensorSpec("encoder_hidden_states", "float16", ("batch", "sequence", 32)),
            TensorSpec("timestep_cond", "float16", ("batch", 32)),
        ),
        outputs=(TensorSpec("out_sample", "float16", ("batch", 4, "latent_height", "latent_width")),),
    )


UNET_IO = [
    trt_backend.IOTensor("sample", "input", "float16", (-1, 4, -1, -1)),
    trt_backend.IOTensor("timestep", "input", "float16", ()),
    trt_backend.IOTensor("encoder_hidden_states", "input", "float16", (-1, -1, 32)),
    trt_backend.IOTensor("timestep_cond", "input", "float16", (-1, 32)),
    trt_backend.IOTensor("out_sample", "output", "float16", (-1, 4, -1, -1)),
]


@pytest.mark.parametrize(
    ("shape_range", "which", "expected"),
    [
        # static 32 px, batch 1: latents 16x16 (VAE factor 2), 77 tokens, fp16 (2 bytes)
        (ShapeRange.static(1, 32, 32), "opt", {"sample": (1, 4, 16, 16), "out_sample": (1, 4, 16, 16)}),
        # --dynamic: batch 1..4, 16..48 px; the largest call
        (ShapeRange((1, 1, 4), (16, 32, 48), (16, 32, 48)), "max", {"sample": (4, 4, 24, 24)}),
        (ShapeRange((1, 1, 4), (16, 32, 48), (16, 32, 48)), "min", {"sample": (1, 4, 8, 8)}),
    ],
)
def test_binding_plan_of_the_tiny_unet(shape_range, which, expected) -> None:
    spec = tiny_unet_spec()
    profiles = ComponentProfiles.derive(spec, shape_range, vae_scale_factor=2)
    shapes = {"min": profiles.minimum, "opt": profiles.optimum, "max": profiles.maximum}[which]
    trt_backend.check_profile(LABEL, profiles, shapes)
    plan = {binding.name: binding for binding in trt_backend.binding_plan(spec, UNET_IO, shapes, 2)}
    batch, _, height, width = plan["sample"].shape
    assert plan["sample"].shape == expected["sample"]
    assert plan["out_sample"].shape == plan["sample"].shape
    assert plan["timestep"].shape == () and plan["timestep"].nbytes == 2
    assert plan["sample"].nbytes == plan["out_sample"].nbytes == batch * 4 * height * width * 2
    assert plan["encoder_hidden_states"].shape == (batch, 77, 32)
    assert plan["encoder_hidden_states"].nbytes == batch * 77 * 32 * 2
    assert plan["timestep_cond"].nbytes == batch * 32 * 2
    assert [b.mode for b in plan.values()] == ["input"] * 4 + ["output"]
    if which == "opt" and shape_range.is_static:
        assert plan["sample"].nbytes == 2048 and plan["encoder_hidden_states"].nbytes == 4928


def test_binding_plan_of_the_vae_derives_image_size_from_latents() -> None:
    spec = ComponentSpec(
        "vae_decoder",
        (TensorSpec("latent_sample", "float32", ("batch", 4, "latent_height", "latent_width")),),
        (TensorSpec("sample", "float32", ("batch", 3, "image_height", "image_width")),),
    )
    io = [
        trt_backend.IOTensor("latent_sample", "input", "float32", (-1, 4, -1, -1)),
        trt_backend.IOTensor("sample", "output", "float32", (-1, 3, -1, -1)),
    ]
    plan = trt_backend.binding_plan(spec, io, {"latent_sample": (2, 4, 8, 12)}, vae_scale_factor=8)
    assert plan[1].shape == (2, 3, 64, 96) and plan[1].nbytes == 2 * 3 * 64 * 96 * 4


def test_shapes_outside_the_profile_are_user_errors() -> None:
    profiles = ComponentProfiles.derive(tiny_unet_spec(), ShapeRange.static(1, 32, 32), 2)
    shapes = {"sample": (2, 4, 16, 16), "timestep": (), "encoder_hidden_states": (2, 77, 32), "timestep_cond": (2, 32)}
    with pytest.raises(UserError, match=r"'sample' of shape \[1, 4, 16, 16\], not \[2, 4, 16, 16\]"):
        trt_backend.check_profile(LABEL, profiles, shapes)
    with pytest.raises(UserError, match="disagree on 'batch'"):
        trt_backend.binding_plan(tiny_unet_spec(), UNET_IO, {**shapes, "timestep_cond": (1, 32)}, 2)


# -- (6) the engine loop on a GPU ------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.tensorrt
@pytest.mark.skipif(
    trt_backend.gpu_count() == 0 or not HAS_RTX,
    reason="no NVIDIA GPU (or no TensorRT-RTX): the TensorRT engine loop was NOT run",
)
def test_engines_run_on_gpu_like_their_onnx(rtx_bundle) -> None:
    """Engines (static shapes, CUDA graph) against the same fp16 ONNX on onnxruntime."""
    from lcm_export.runtime import Pipeline

    engines = Pipeline.load(rtx_bundle, backend="tensorrt", static_shape=(1, 32, 32))
    reference = Pipeline.load(rtx_bundle, backend="onnxruntime")
    for seed in range(2):
        latents, noise = random_inputs((1, 4, 16, 16), steps=4, seed=seed)
        expected = reference("a photo of a cat", latents=latents, noise=noise).images
        result = engines("a photo of a cat", latents=latents, noise=noise)
        figure = image_psnr(expected, result.images)
        print(f"\nTensorRT-RTX vs onnxruntime (same fp16 graph), seed {seed}: {figure:.1f} dB")
        assert figure > 50.0 and np.isfinite(result.images).all()


# -- the session's buffer, copy and graph logic, on a simulated device ------------------------------------------


class SimulatedCuda:
    """The ``cuda.bindings.runtime`` calls the session makes, on host memory: "device" pointers are ctypes buffers,
    so copies are real memmoves. Stream capture records engine launches into a replayable graph."""

    class cudaError_t:
        cudaSuccess = 0

    class cudaMemcpyKind:
        cudaMemcpyHostToDevice, cudaMemcpyDeviceToHost = 1, 2

    class cudaStreamCaptureMode:
        cudaStreamCaptureModeThreadLocal = 1

    def __init__(self) -> None:
        import ctypes

        self.ctypes = ctypes
        self.allocations: dict[int, object] = {}
        self.malloc_calls = 0
        self.capturing: list | None = None
        self.graph_launches = 0

    def cudaStreamCreate(self):
        return 0, 7

    def cudaMalloc(self, size: int):
        buffer = self.ctypes.create_string_buffer(size)
        self.allocations[self.ctypes.addressof(buffer)] = buffer
        self.malloc_calls += 1
        return 0, self.ctypes.addressof(buffer)

    def cudaFree(self, pointer: int):
        self.allocations.pop(pointer)
        return (0,)

    def cudaMemcpyAsync(self, destination: int, source: int, count: int, kind, stream):
        self.ctypes.memmove(destination, source, count)
        return (0,)

    def cudaStreamSynchronize(self, stream):
        return (0,)

    def cudaStreamBeginCapture(self, stream, mode):
        self.capturing = []
        return (0,)

    def cudaStreamEndCapture(self, stream):
        graph, self.capturing = self.capturing, None
        return 0, graph

    def cudaGraphInstantiate(self, graph, flags):
        return 0, graph

    def cudaGraphLaunch(self, graph, stream):
        self.graph_launches += 1
        for launch in graph:
            launch()
        return (0,)

    def cudaGraphExecDestroy(self, graph):
        return (0,)

    def cudaGraphDestroy(self, graph):
        return (0,)

    def cudaStreamDestroy(self, stream):
        return (0,)


def simulated_tensorrt(cuda: SimulatedCuda, io: list):
    """A TensorRT-like module whose engine computes ``out_sample = 2 * sample + timestep`` (fp16)."""
    import types

    def view(pointer: int, shape: tuple, dtype: str) -> np.ndarray:
        count = int(np.prod(shape)) * np.dtype(dtype).itemsize
        raw = (cuda.ctypes.c_char * max(count, 1)).from_address(pointer)
        return np.frombuffer(raw, dtype=dtype, count=int(np.prod(shape))).reshape(shape)

    class Context:
        def __init__(self) -> None:
            self.shapes: dict[str, tuple] = {"timestep": ()}
            self.addresses: dict[str, int] = {}
            self.launches = 0

        def set_input_shape(self, name, shape):
            self.shapes[name] = tuple(shape)
            return True

        def get_tensor_shape(self, name):
            return self.shapes["sample"] if name == "out_sample" else self.shapes[name]

        def set_tensor_address(self, name, pointer):
            self.addresses[name] = pointer

        def execute_async_v3(self, stream):
            def launch() -> None:
                self.launches += 1
                sample = view(self.addresses["sample"], self.shapes["sample"], "float16")
                timestep = view(self.addresses["timestep"], (), "float16")
                out = view(self.addresses["out_sample"], self.shapes["sample"], "float16")
                out[...] = sample * 2 + timestep

            if cuda.capturing is not None:
                cuda.capturing.append(launch)
            else:
                launch()
            return True

    class Engine:
        def __init__(self) -> None:
            self.contexts: list[Context] = []

        def get_tensor_shape(self, name):
            return next(tensor.shape for tensor in io if tensor.name == name)

        def create_execution_context(self):
            self.contexts.append(Context())
            return self.contexts[-1]

    class Runtime:
        def __init__(self, logger) -> None:
            self.engine = Engine()

        def deserialize_cuda_engine(self, plan):
            return self.engine if plan == b"plan" else None

    class Logger:
        ERROR = 1

        def __init__(self, severity) -> None:
            pass

    return types.SimpleNamespace(Logger=Logger, Runtime=Runtime, __version__="10.0.0.0")


def simulated_session(monkeypatch, static_shapes):
    cuda = SimulatedCuda()
    monkeypatch.setattr(trt_backend, "_cuda_runtime", lambda: cuda)
    spec = tiny_unet_spec()
    profiles = ComponentProfiles.derive(spec, ShapeRange((1, 1, 4), (16, 32, 48), (16, 32, 48)), 2)
    details = TensorRTEngineDetails("tensorrt", "10.0.0.0", (), tuple(UNET_IO), profiles, vae_scale_factor=2)
    component = Component(spec, {"tensorrt": Artifact("tensorrt", "unet/model.plan", "fp16", details.to_json())})
    trt = simulated_tensorrt(cuda, UNET_IO)
    session = trt_backend.TensorRTSession(
        LABEL, trt, "tensorrt", b"plan", component, details, BackendOptions(), static_shapes
    )
    return session, cuda


def unet_feeds(batch: int, size: int, step: float) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(batch * 100 + size)
    return {
        "sample": rng.standard_normal((batch, 4, size, size)).astype(np.float16),
        "timestep": np.array(step, dtype=np.float16),
        "encoder_hidden_states": np.zeros((batch, 77, 32), np.float16),
        "timestep_cond": np.zeros((batch, 32), np.float16),
    }


def test_session_allocates_once_per_shape_and_copies_both_ways(monkeypatch) -> None:
    session, cuda = simulated_session(monkeypatch, static_shapes=None)
    for _ in range(3):
        feeds = unet_feeds(1, 16, 3.0)
        output = session.run(feeds)["out_sample"]
        np.testing.assert_array_equal(output, feeds["sample"] * 2 + np.float16(3.0))
    assert cuda.malloc_calls == 5  # one buffer per I/O tensor, reused by the next calls
    smaller = unet_feeds(1, 8, 1.0)
    np.testing.assert_array_equal(session.run(smaller)["out_sample"], smaller["sample"] * 2 + np.float16(1.0))
    assert cuda.malloc_calls == 5  # a smaller shape fits the buffers already there
    larger = unet_feeds(4, 24, 2.0)
    np.testing.assert_array_equal(session.run(larger)["out_sample"], larger["sample"] * 2 + np.float16(2.0))
    assert cuda.malloc_calls == 5 + 4  # everything but the scalar timestep grew
    assert cuda.graph_launches == 0  # dynamic shapes: no graph
    with pytest.raises(UserError, match="re-export with --batch/--height/--width"):
        session.run(unet_feeds(5, 16, 1.0))
    session.close()
    assert not cuda.allocations


def test_session_replays_a_cuda_graph_for_static_shapes(monkeypatch) -> None:
    static = {"sample": (1, 4, 16, 16), "timestep": (), "encoder_hidden_states": (1, 77, 32), "timestep_cond": (1, 32)}
    session, cuda = simulated_session(monkeypatch, static_shapes=static)
    for step in (5.0, 4.0, 3.0):  # the first call runs eagerly then captures; the next ones replay the graph
        feeds = unet_feeds(1, 16, step)
        np.testing.assert_array_equal(session.run(feeds)["out_sample"], feeds["sample"] * 2 + np.float16(step))
    assert cuda.graph_launches == 2
    session.close()
