"""The Core ML target and runtime backend.

Conversions need coremltools (marker ``coreml``); they run on Linux. Prediction needs macOS: on Linux the
mlpackages are checked through their saved spec only (I/O names, dtypes, shapes and ranges against the manifest),
and the test that runs them against PyTorch is skipped. The runtime's feed adaptation is plain numpy and is
tested everywhere.
"""

from __future__ import annotations

import importlib.util
import json
import platform
import re
import shutil
import time
from pathlib import Path

import numpy as np
import pytest

from lcm_export.errors import BundleError, ExportError, UserError
from lcm_export.runtime.backends import BackendOptions, choose_backend
from lcm_export.runtime.backends import coreml as coreml_backend
from lcm_export.runtime.backends.coreml import CoreMLTensor, adapt_feeds, check_static_shapes, outputs_by_spec_name
from lcm_export.runtime.manifest import Component, Manifest, load_manifest
from lcm_export.runtime.specs import ComponentSpec, ShapeRange, TensorSpec
from lcm_export.targets import coreml as coreml_target
from tests.helpers import assert_one_line_error, export, sdxl_source
from tests.helpers import export_cli_blocking as cli

pytestmark = [
    pytest.mark.coreml,
    pytest.mark.skipif(
        importlib.util.find_spec("coremltools") is None, reason="coremltools is not installed: lcm-edge[coreml]"
    ),
]
IS_MACOS = platform.system() == "Darwin"
ALL_COMPONENTS = ("text_encoder", "unet", "vae_decoder", "vae_encoder")
NUMPY_OF_COREML = {"FLOAT32": "float32", "FLOAT16": "float16", "INT32": "int32"}


def package_io(path: Path) -> tuple[list[dict], list[dict]]:
    """Inputs and outputs of a saved mlpackage read straight from its protobuf spec (names, dtypes, shapes)."""
    import coremltools as ct
    from coremltools.proto import FeatureTypes_pb2

    spec = ct.models.MLModel(str(path), skip_model_load=True).get_spec()
    name_of = FeatureTypes_pb2.ArrayFeatureType.ArrayDataType.Name

    def read(feature) -> dict:
        array = feature.type.multiArrayType
        ranges = [(r.lowerBound, r.upperBound) for r in array.shapeRange.sizeRanges]
        return {
            "name": feature.name,
            "dtype": NUMPY_OF_COREML[name_of(array.dataType)],
            "shape": list(array.shape),
            "ranges": ranges,
        }

    return [read(f) for f in spec.description.input], [read(f) for f in spec.description.output]


def expected_shapes(manifest: Manifest, name: str, stage: str) -> dict[str, list[int]]:
    """Every input and output shape of ``name`` at ``stage``, from the manifest alone (scalars as (1,))."""
    component = manifest.components[name]
    shape_range = ShapeRange.from_json(component.artifacts["mlpackage"].details["shapes"])
    values = shape_range.symbol_values(stage, manifest.pipeline.vae_scale_factor, component.spec.batch_multiplier)
    return {t.name: list(t.concrete_shape(values)) or [1] for t in (*component.spec.inputs, *component.spec.outputs)}


def assert_packages_match_manifest(bundle: Path, manifest: Manifest) -> None:
    """Each component's mlpackage declares the manifest's I/O names, Core ML dtypes and shapes (and ranges).

    A spec name that is not a valid ML Program feature name (optimum's ``hidden_states.1``) is the feature
    ``hidden_states_1`` in the package; the artifact's table maps each feature to its spec name, one to one, in
    the spec's order."""
    for name, component in manifest.components.items():
        package = bundle / component.artifacts["mlpackage"].path
        inputs, outputs = package_io(package)
        recorded_inputs, recorded_outputs = coreml_backend.artifact_tensors(component)
        assert [t["name"] for t in inputs] == [t.name for t in recorded_inputs]
        assert [t["name"] for t in outputs] == [t.name for t in recorded_outputs]
        assert [t.feed_name for t in recorded_inputs] == component.spec.input_names
        assert [t.feed_name for t in recorded_outputs] == component.spec.output_names
        for tensor in (*recorded_inputs, *recorded_outputs):
            assert re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", tensor.name), (name, tensor.name)
            assert tensor.name == tensor.feed_name or tensor.name == re.sub(r"\W", "_", tensor.feed_name)
        spec_names = {t.name: t.feed_name for t in (*recorded_inputs, *recorded_outputs)}
        inputs = [{**tensor, "name": spec_names[tensor["name"]]} for tensor in inputs]  # by spec name from here
        outputs = [{**tensor, "name": spec_names[tensor["name"]]} for tensor in outputs]
        spec = component.spec.with_dtypes(component.artifacts["mlpackage"].io_dtype)  # the variant's own dtypes
        dtypes = {t.name: {"int64": "int32"}.get(t.dtype, t.dtype) for t in (*spec.inputs, *spec.outputs)}
        for tensor in (*inputs, *outputs):
            assert tensor["dtype"] == dtypes[tensor["name"]], (name, tensor)
        low, opt, high = (expected_shapes(manifest, name, stage) for stage in ("min", "opt", "max"))
        flexible = component.artifacts["mlpackage"].details["shapes"]["flexible"]
        for tensor in inputs:
            assert tensor["shape"] == opt[tensor["name"]], (name, tensor)
            if low[tensor["name"]] != high[tensor["name"]]:
                assert tensor["ranges"] == list(zip(low[tensor["name"]], high[tensor["name"]], strict=True))
            else:
                assert all(lo == hi for lo, hi in tensor["ranges"]), (name, tensor)
        if not flexible:
            for tensor in outputs:
                assert tensor["shape"] == opt[tensor["name"]], (name, tensor)


# -- bundles ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def static_bundle(tiny_lcm_dir, tmp_path_factory) -> Path:
    """The default Core ML export: static shapes, fp16 (the VAE fp32), every component, no ONNX kept."""
    return export(tiny_lcm_dir, tmp_path_factory.mktemp("coreml") / "static", target="coreml")


def test_static_bundle_has_an_mlpackage_per_component_matching_the_manifest(static_bundle):
    manifest = load_manifest(static_bundle, verify="full")  # hashes every file inside the mlpackages too
    assert manifest.target == "coreml" and manifest.precision == "fp16"
    assert tuple(manifest.components) == ALL_COMPONENTS
    for name, component in manifest.components.items():
        assert set(component.artifacts) == {"mlpackage"}, "the ONNX artifact is dropped by default"
        artifact = component.artifacts["mlpackage"]
        assert artifact.path == f"{name}/model.mlpackage"
        assert (static_bundle / artifact.path / "Manifest.json").is_file()
        assert artifact.details["validated"] == (
            "prediction vs pytorch fp32" if IS_MACOS else "spec-only (prediction needs macOS)"
        )
        assert artifact.details["minimum_deployment_target"] == "iOS16/macOS13"
        assert artifact.details["shapes"]["flexible"] is False
        listed = [entry.path for entry in manifest.files if entry.path.startswith(artifact.path + "/")]
        assert any(path.endswith("weight.bin") for path in listed), listed
    assert not list(static_bundle.rglob("*.onnx")) and not list(static_bundle.rglob("*.onnx_data"))
    assert_packages_match_manifest(static_bundle, manifest)


# The tiny LCM, the tiny distilled LCM-SDXL, and tests.helpers.OTHER_SDXL with a LoRA fused (classifier-free
# guidance: its text encoders and U-Net get a batch range of 1-2 even in a static export).
COREML_MODELS = ("tiny-lcm", "tiny-sdxl-lcm", "other-sdxl-lora")


@pytest.fixture(scope="module", params=COREML_MODELS)
def model_bundle(request, tmp_path_factory) -> Path:
    """The default (static, fp16) Core ML export of each of COREML_MODELS."""
    if request.param == "tiny-lcm":
        return request.getfixturevalue("static_bundle")
    model, loras = sdxl_source(request, request.param)
    start = time.perf_counter()
    bundle = export(model, tmp_path_factory.mktemp("coreml") / request.param, loras=loras, target="coreml")
    print(f"\n{request.param} Core ML bundle (export + conversions): {time.perf_counter() - start:.1f} s")
    return bundle


def test_every_model_converts_to_packages_matching_the_spec(model_bundle):
    """SDXL too: both text encoders (every hidden state), the U-Net's text_embeds and time_ids, in the packages
    as the manifest's spec declares them; CFG components with their batch range."""
    manifest = load_manifest(model_bundle, verify="full")
    family_encoders = ("text_encoder_2",) if manifest.pipeline.family == "sdxl" else ()
    assert set(manifest.components) == {*ALL_COMPONENTS, *family_encoders}
    for name, component in manifest.components.items():
        artifact = component.artifacts["mlpackage"]
        assert set(component.artifacts) == {"mlpackage"} and artifact.path == f"{name}/model.mlpackage"
        assert artifact.precision == ("fp32" if name.startswith("vae") else "fp16")
        assert artifact.details["validated"] == (
            "prediction vs pytorch fp32" if IS_MACOS else "spec-only (prediction needs macOS)"
        )
        assert artifact.details["shapes"]["flexible"] is (component.spec.batch_multiplier == 2)
        print(f"{name}: converted in {artifact.details['conversion_seconds']} s")
    assert_packages_match_manifest(model_bundle, manifest)
    if manifest.pipeline.family != "sdxl":
        return
    cfg = 2 if manifest.pipeline.guidance == "cfg" else 1
    unet_inputs = {t.name: t for t in coreml_backend.artifact_tensors(manifest.components["unet"])[0]}
    (pooled_width,) = manifest.components["text_encoder_2"].spec.outputs[0].shape[1:]
    assert unet_inputs["text_embeds"].shape == (cfg, pooled_width)
    assert unet_inputs["time_ids"].shape == (cfg, 6) and unet_inputs["time_ids"].dtype == "float16"
    assert unet_inputs["time_ids"].bounds == (None if cfg == 1 else ((1, 2), (6, 6)))
    for encoder in ("text_encoder", "text_encoder_2"):
        layers = json.loads((model_bundle / encoder / "config.json").read_text())["num_hidden_layers"]
        outputs = coreml_backend.artifact_tensors(manifest.components[encoder])[1]
        hidden = [(t.name, t.feed_name) for t in outputs[2:]]
        assert hidden == [(f"hidden_states_{i}", f"hidden_states.{i}") for i in range(layers + 1)]


def torch_modules(manifest: Manifest) -> dict:
    """The fp32 torch components a bundle was exported from (its LoRAs fused), built as the exporter builds them."""
    from lcm_export.exporter.bundle import LoraSource
    from lcm_export.exporter.components import build_components
    from lcm_export.exporter.loading import load_pipeline
    from lcm_export.exporter.lora import fuse_loras

    loras = tuple(LoraSource(entry["source"], entry["weight"]) for entry in manifest.loras)
    loaded = load_pipeline(manifest.provenance["source_model"], has_loras=bool(loras))
    if loras:
        fuse_loras(loaded, loras)
    return build_components(loaded, list(manifest.components))


def test_the_converted_programs_compute_what_pytorch_computes(model_bundle):
    """The numbers Linux can check: each package's source program, captured as the target captures it (dynamic
    where the package takes a range, GroupNorm decomposed there), against the PyTorch module at the range's min
    and max. Measured: identical for static captures, at most ~1e-6 where GroupNorm is decomposed."""
    import torch

    from lcm_export.runtime.specs import sample_inputs

    manifest = load_manifest(model_bundle)
    modules = torch_modules(manifest)
    for name, component in manifest.components.items():
        spec, module = modules[name].spec, modules[name].module
        shape_range = ShapeRange.from_json(component.artifacts["mlpackage"].details["shapes"])
        values = coreml_target.stage_values(spec, shape_range, manifest.pipeline.vae_scale_factor)
        program = coreml_target.capture_for_conversion(spec, module, values, manifest.pipeline).module()
        errors = []
        for stage in ("min", "max"):
            feeds = sample_inputs(spec, values[stage], seed=4)
            with torch.no_grad():
                expected = module(*(torch.from_numpy(feeds[n]) for n in spec.input_names))
                actual = program(
                    *(torch.from_numpy(feeds[n]).reshape(feeds[n].shape or (1,)) for n in spec.input_names)
                )
            for output, want, got in zip(spec.output_names, expected, actual, strict=True):
                assert got.shape == want.shape, (name, stage, output)
                errors.append(float((got - want).abs().max()))
                assert errors[-1] <= 1e-5 * max(1.0, float(want.abs().max())), (name, stage, output, errors[-1])
        batches = f"{values['min']['batch']}-{values['max']['batch']}"
        print(f"{name}: program vs PyTorch max abs {max(errors):.2e} (batch {batches})")


def test_precision_is_recorded_fp16_with_the_vae_in_fp32(static_bundle):
    manifest = load_manifest(static_bundle)
    for name in ("text_encoder", "unet"):
        artifact = manifest.components[name].artifacts["mlpackage"]
        assert (artifact.precision, artifact.details["compute_precision"]) == ("fp16", "float16")
    for name in ("vae_decoder", "vae_encoder"):
        artifact = manifest.components[name].artifacts["mlpackage"]
        assert (artifact.precision, artifact.details["compute_precision"]) == ("fp32", "float32")
    unet = manifest.components["unet"].artifacts["mlpackage"].details
    inputs = {entry["name"]: entry for entry in unet["coreml_inputs"]}
    assert inputs["timestep"]["shape"] == [1] and inputs["sample"]["dtype"] == "float16"
    text = manifest.components["text_encoder"].artifacts["mlpackage"].details
    assert text["coreml_inputs"][0]["dtype"] == "int32"


def test_a_changed_file_inside_an_mlpackage_fails_verification(static_bundle, tmp_path):
    copy = Path(shutil.copytree(static_bundle, tmp_path / "copy"))
    weights = next((copy / "unet" / "model.mlpackage").rglob("weight.bin"))
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(BundleError, match=r"weight\.bin"):
        load_manifest(copy, verify="full")


def test_cli_batch_range_and_keep_onnx(tiny_lcm_dir, tmp_path):
    """CLI: a CFG-style batch range (RangeDim) on every component, ONNX kept beside the packages."""
    output = tmp_path / "ranged"
    result = cli(
        tiny_lcm_dir,
        "--target",
        "coreml",
        "--output",
        output,
        "--batch",
        "1:1:2",
        "--keep-onnx",
        "--no-vae-encoder",
        "--quiet",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    manifest = load_manifest(output, verify="full")
    assert tuple(manifest.components) == ("text_encoder", "unet", "vae_decoder")
    for name, component in manifest.components.items():
        assert set(component.artifacts) == {"onnx", "mlpackage"}
        assert (output / name / "model.onnx").is_file()
        details = component.artifacts["mlpackage"].details
        assert details["shapes"]["flexible"] is True
        batch_bounds = {entry["name"]: entry.get("bounds") for entry in details["coreml_inputs"]}
        assert batch_bounds.get("sample", batch_bounds.get("input_ids", batch_bounds.get("latent_sample")))[0] == [1, 2]
    assert manifest.components["unet"].artifacts["mlpackage"].details["coreml_inputs"][1] == {
        "name": "timestep",
        "dtype": "float16",
        "shape": [1],
        "bounds": [[1, 2]],  # one timestep per row: the batch's range
    }
    assert_packages_match_manifest(output, manifest)
    # With the ONNX kept, a Linux machine still runs the bundle; Core ML is never picked here.
    if not IS_MACOS:
        assert choose_backend("auto", {"onnx", "mlpackage"}) != "coreml"


def test_dynamic_spatial_range_converts_the_vae_decoder(tiny_lcm_dir, tmp_path):
    """--dynamic: batch 1-4 and 0.5x-1.5x the size, as RangeDims derived from the spatial multiple."""
    output = export(tiny_lcm_dir, tmp_path / "dynamic", target="coreml", components=("vae_decoder",), dynamic=True)
    manifest = load_manifest(output, verify="full")
    details = manifest.components["vae_decoder"].artifacts["mlpackage"].details
    info = manifest.pipeline
    low = max(info.spatial_multiple, info.default_height // 2 // info.spatial_multiple * info.spatial_multiple)
    assert details["shapes"]["height"][0] == low and details["shapes"]["batch"] == [1, 1, 4]
    (latent,) = details["coreml_inputs"]
    factor = info.vae_scale_factor
    assert latent["bounds"][0] == [1, 4] and latent["bounds"][2][0] == low // factor
    assert_packages_match_manifest(output, manifest)


# -- preflight and options -------------------------------------------------------------------------------------


def test_without_coremltools_the_cli_fails_before_loading_the_model(tmp_path):
    line = assert_one_line_error(
        cli(tmp_path / "no-such-model", "--target", "coreml", "--output", tmp_path / "out", blocked=("coremltools",))
    )
    assert "pip install 'lcm-edge[coreml]'" in line and "no-such-model" not in line
    assert not (tmp_path / "out").exists()


def test_without_coremltools_the_library_preflight_names_the_extra(monkeypatch, tmp_path):
    from lcm_export.exporter.bundle import ExportConfig, check_config

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "coremltools" else real_find_spec(name, *a)
    )
    with pytest.raises(ExportError, match=r"pip install 'lcm-edge\[coreml\]'"):
        check_config(ExportConfig(model="unused", output=tmp_path / "out", target="coreml"))


def test_deployment_target_option_is_checked():
    options = coreml_target.CoreMLBuildOptions.from_target_options({"minimum_deployment_target": "macOS14"})
    assert options.deployment_label == "iOS17/macOS14"
    with pytest.raises(ExportError, match="iOS16"):
        coreml_target.CoreMLBuildOptions.from_target_options({"minimum_deployment_target": "iOS15"})


# -- shapes, decomposition, PSNR (no conversion) ---------------------------------------------------------------


def unet_spec(batch_multiplier: int = 2) -> ComponentSpec:
    return ComponentSpec(
        "unet",
        (
            TensorSpec("sample", "float16", ("batch", 4, "latent_height", "latent_width")),
            TensorSpec("timestep", "float16", ()),
            TensorSpec("encoder_hidden_states", "float16", ("batch", "sequence", 32)),
        ),
        (TensorSpec("out_sample", "float16", ("batch", 4, "latent_height", "latent_width")),),
        batch_multiplier=batch_multiplier,
    )


def test_coreml_io_of_a_cfg_unet_has_a_batch_range_and_a_vector_timestep():
    values = coreml_target.stage_values(unet_spec(), ShapeRange.static(1, 512, 512), vae_scale_factor=8)
    inputs, outputs = coreml_target.coreml_io(unet_spec(), values)
    sample, timestep, hidden = inputs
    assert sample == CoreMLTensor("sample", "float16", (2, 4, 64, 64), ((1, 2), (4, 4), (64, 64), (64, 64)))
    assert timestep == CoreMLTensor("timestep", "float16", (1,))
    assert hidden.bounds == ((1, 2), (77, 77), (32, 32))
    assert outputs[0].shape == (2, 4, 64, 64)
    static_values = coreml_target.stage_values(unet_spec(1), ShapeRange.static(1, 512, 512), vae_scale_factor=8)
    static_inputs, _ = coreml_target.coreml_io(unet_spec(1), static_values)
    assert all(tensor.is_static for tensor in static_inputs)


def test_trace_values_and_export_dims_follow_the_spatial_multiple():
    shape_range = ShapeRange((1, 1, 4), (256, 512, 768), (512, 512, 512))
    values = coreml_target.stage_values(unet_spec(1), shape_range, vae_scale_factor=8)
    traced = coreml_target.trace_values(values, spatial_multiple=64, vae_scale_factor=8)
    assert traced["batch"] == 2 and traced["image_height"] == 512 and traced["latent_height"] == 64
    dims = coreml_target.export_dims(values, spatial_multiple=64, vae_scale_factor=8)
    assert set(dims) == {"batch", "image_height", "latent_height"}  # width is static
    shapes = coreml_target.dynamic_shapes_for(unet_spec(1), dims)
    assert set(shapes[0]) == {0, 2} and shapes[1] is None and set(shapes[2]) == {0}
    static_values = coreml_target.stage_values(unet_spec(1), ShapeRange.static(1, 512, 512), vae_scale_factor=8)
    assert coreml_target.export_dims(static_values, spatial_multiple=64, vae_scale_factor=8) == {}


@pytest.mark.parametrize("shape", [(2, 32, 5, 7), (3, 16, 40)])
def test_group_norm_decomposition_equals_torch(shape):
    import torch

    generator = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=generator) * 3 + 1
    weight, bias = torch.randn(shape[1], generator=generator), torch.randn(shape[1], generator=generator)
    expected = torch.nn.functional.group_norm(x, 8, weight, bias, 1e-6)
    actual = coreml_target.group_norm_decomposition(x, 8, weight, bias, 1e-6)
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)


def test_psnr_uses_the_reference_peak():
    reference = np.array([0.0, 2.0, -4.0, 1.0])
    assert coreml_target.psnr(reference, reference) == float("inf")
    noisy = reference + np.array([0.04, -0.04, 0.04, -0.04])  # mse 1.6e-3, peak 4: 20 log10(4) - 10 log10(1.6e-3)
    assert coreml_target.psnr(reference, noisy) == pytest.approx(12.0412 + 27.9588, abs=1e-3)


def test_outputs_named_by_the_converter_are_renamed_to_the_spec(tmp_path):
    import torch

    ct = coreml_target.import_coremltools()

    class Affine(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor]:
            return (x * 2 + 1,)

    program = torch.export.export(Affine(), (torch.randn(2, 3),)).run_decompositions({})
    with coreml_target.quiet_coremltools(quiet=True):
        model = ct.convert(
            program,
            inputs=[ct.TensorType(name="x", shape=(2, 3), dtype=np.float32)],
            convert_to="mlprogram",
            minimum_deployment_target=ct.target.iOS16,
            skip_model_load=True,
        )
    assert [o.name for o in model.get_spec().description.output] != ["out_sample"]
    coreml_target.rename_outputs(model, ["out_sample"]).save(str(tmp_path / "affine.mlpackage"))
    inputs, outputs = coreml_target.described_tensors(tmp_path / "affine.mlpackage")
    # Without an output dtype, an fp16 program returns fp16: why the target always passes the spec's dtypes.
    assert outputs == (CoreMLTensor("out_sample", "float16", (2, 3)),)
    assert inputs == (CoreMLTensor("x", "float32", (2, 3)),)


def test_feature_names_are_valid_ml_program_names_and_unique():
    """optimum's ``hidden_states.N`` cannot name a Core ML feature: it becomes ``hidden_states_N`` unless the spec
    already uses that name; valid names stay as they are."""
    names = ["input_ids", "hidden_states.1", "hidden_states_1", "hidden_states.1x", "1st", "hidden_states.2"]
    assert coreml_target.coreml_feature_names(names) == [
        "input_ids",
        "hidden_states_1_2",
        "hidden_states_1",
        "hidden_states_1x",
        "_1st",
        "hidden_states_2",
    ]
    values = {stage: {"batch": 1, "sequence": 77} for stage in ("min", "opt", "max")}
    spec = ComponentSpec(
        "text_encoder_2",
        (TensorSpec("input_ids", "int64", ("batch", "sequence")),),
        (TensorSpec("text_embeds", "float32", ("batch", 8)), TensorSpec("hidden_states.0", "float16", ("batch", 4))),
    )
    inputs, outputs = coreml_target.coreml_io(spec, values)
    assert inputs == (CoreMLTensor("input_ids", "int32", (1, 77)),)
    assert outputs[1] == CoreMLTensor("hidden_states_0", "float16", (1, 4), spec_name="hidden_states.0")
    assert [tensor.feed_name for tensor in outputs] == spec.output_names


def test_spec_mismatches_lists_every_difference():
    planned = (CoreMLTensor("sample", "float16", (1, 4, 8, 8)), CoreMLTensor("timestep", "float16", (1,)))
    described = (CoreMLTensor("sample", "float32", (1, 4, 8, 8)), CoreMLTensor("timestep", "float16", (2,)))
    problems = coreml_target.spec_mismatches(planned, described, "input")
    assert problems == ["input 'sample' dtype float32 != float16", "input 'timestep' shape [2] != [1]"]
    assert coreml_target.spec_mismatches(planned, described[::-1], "input")[0].startswith("input names")
    ranged = (CoreMLTensor("sample", "float16", (1, 4, 8, 8), ((1, 1), (4, 4), (8, 8), (8, 8))),)
    assert coreml_target.spec_mismatches(planned[:1], ranged, "input") == []  # degenerate range == static


# -- runtime backend --------------------------------------------------------------------------------------------

UNET_INPUTS = (
    CoreMLTensor("sample", "float16", (1, 4, 8, 8), ((1, 2), (4, 4), (8, 8), (8, 8))),
    CoreMLTensor("timestep", "float16", (1,)),
)
TEXT_INPUTS = (CoreMLTensor("input_ids", "int32", (1, 77)),)


def test_adapt_feeds_casts_and_reshapes_with_real_numbers():
    ids = np.array([[49406, 320, 1125, 49407] + [49407] * 73], dtype=np.int64)
    (name, adapted), *_ = adapt_feeds({"input_ids": ids}, TEXT_INPUTS).items()
    assert name == "input_ids" and adapted.dtype == np.int32 and adapted.shape == (1, 77)
    assert adapted[0, :4].tolist() == [49406, 320, 1125, 49407]

    sample = np.full((2, 4, 8, 8), 0.5, dtype=np.float32)
    feeds = adapt_feeds({"sample": sample, "timestep": np.array(759.0, dtype=np.float32)}, UNET_INPUTS)
    assert feeds["timestep"].shape == (1,) and feeds["timestep"].dtype == np.float16 and feeds["timestep"][0] == 759
    assert (
        feeds["sample"].dtype == np.float16
        and feeds["sample"].shape == (2, 4, 8, 8)
        and feeds["sample"][1, 3, 7, 7] == 0.5
    )


def test_adapt_feeds_refuses_what_core_ml_cannot_take():
    with pytest.raises(UserError, match="do not fit int32"):
        adapt_feeds({"input_ids": np.full((1, 77), 2**40, dtype=np.int64)}, TEXT_INPUTS)
    with pytest.raises(UserError, match=r"shape \[3, 4, 8, 8\]"):
        adapt_feeds({"sample": np.zeros((3, 4, 8, 8)), "timestep": np.array(1.0)}, UNET_INPUTS)
    with pytest.raises(UserError, match="'timestep' was not given"):
        adapt_feeds({"sample": np.zeros((1, 4, 8, 8))}, UNET_INPUTS)


def test_outputs_are_renamed_to_the_spec_and_float32():
    outputs = (CoreMLTensor("var_1234", "float16", (1, 4, 8, 8), spec_name="out_sample"),)
    prediction = {"var_1234": np.full((1, 4, 8, 8), 1.5, dtype=np.float16)}
    result = outputs_by_spec_name(prediction, outputs)
    assert list(result) == ["out_sample"] and result["out_sample"].dtype == np.float32
    assert float(result["out_sample"].sum()) == 1.5 * 256
    scalar = outputs_by_spec_name({"t": np.array([3.0])}, (CoreMLTensor("t", "float32", (1,)),), ranks={"t": 0})
    assert scalar["t"].shape == () and float(scalar["t"]) == 3.0
    assert CoreMLTensor.from_json(outputs[0].to_json()) == outputs[0]


def test_static_shapes_the_package_cannot_take_fail_at_load():
    check_static_shapes("unet", {"sample": (-1, 4, 8, 8), "timestep": ()}, UNET_INPUTS)  # open CFG batch, scalar
    with pytest.raises(UserError, match=r"unet: input 'sample' of shape \[1, 4, 16, 16\]"):
        check_static_shapes("unet", {"sample": (1, 4, 16, 16)}, UNET_INPUTS)


@pytest.mark.skipif(IS_MACOS, reason="on macOS Core ML predicts")
def test_opening_the_backend_off_macos_is_a_one_line_user_error(static_bundle):
    manifest = load_manifest(static_bundle)
    assert not coreml_backend.is_available()
    with pytest.raises(UserError) as caught:
        coreml_backend.open_session(static_bundle, manifest.components["unet"], BackendOptions())
    assert "Core ML prediction needs macOS" in str(caught.value) and "\n" not in str(caught.value)
    with pytest.raises(UserError, match="mlpackage"):
        choose_backend("auto", {"mlpackage"})


@pytest.mark.skipif(not IS_MACOS, reason="Core ML prediction needs macOS (NOT run on Linux)")
def test_predictions_match_pytorch_on_macos(model_bundle):
    """Every component through the runtime backend against PyTorch fp32, over Apple's 35 dB PSNR gate."""
    import torch

    from lcm_export.runtime.specs import sample_inputs

    manifest = load_manifest(model_bundle)
    modules = torch_modules(manifest)
    for name, listed in manifest.components.items():
        component = listed.resolved(listed.artifacts["mlpackage"])  # one variant, I/O in its dtypes
        session = coreml_backend.open_session(model_bundle, component, BackendOptions(device="ALL"))
        values = ShapeRange.from_json(component.artifacts["mlpackage"].details["shapes"]).symbol_values(
            "opt", manifest.pipeline.vae_scale_factor, component.spec.batch_multiplier
        )
        spec = modules[name].spec
        feeds = sample_inputs(spec, values, seed=3)
        with torch.no_grad():
            expected = modules[name].module(*(torch.from_numpy(feeds[n]) for n in spec.input_names))
        dtypes = {t.name: t.dtype for t in component.spec.inputs}
        actual = session.run({n: value.astype(dtypes[n]) for n, value in feeds.items()})
        for output, reference in zip(spec.output_names, expected, strict=True):
            score = coreml_target.psnr(reference.numpy(), actual[output])
            assert score >= coreml_target.PSNR_GATE_DB, (name, output, score)


def test_component_json_round_trip_keeps_the_coreml_table(static_bundle):
    manifest = load_manifest(static_bundle)
    component: Component = manifest.components["unet"]
    inputs, outputs = coreml_backend.artifact_tensors(component)
    assert [t.name for t in inputs] == component.spec.input_names
    assert [t.feed_name for t in outputs] == component.spec.output_names


def test_a_controlnet_bundle_converts_with_residual_shapes_from_the_specs(tiny_lcm_dir, tmp_path):
    """A ControlNet bundle for Core ML: the ControlNet and the residual U-Net are mlpackages whose inputs and
    outputs are the manifest's, every residual at its latent scale (the U-Net's residual inputs are the
    ControlNet's outputs, shape for shape). Prediction needs macOS (not run on Linux)."""
    from lcm_export.exporter.controlnet import ControlNetSource
    from lcm_export.exporter.tiny import build_controlnet

    controlnet = build_controlnet(tmp_path / "cn", tiny_lcm_dir, seed=1)
    bundle = export(
        tiny_lcm_dir,
        tmp_path / "coreml-controlnet",
        target="coreml",
        components=("unet",),  # the ControlNet comes with the U-Net that takes its residuals
        controlnets=(ControlNetSource(str(controlnet), 0.5),),
    )
    manifest = load_manifest(bundle, verify="full")
    assert set(manifest.components) == {"unet", "controlnet"}
    assert manifest.controlnet is not None and manifest.controlnet.models[0].conditioning_scale == 0.5
    assert_packages_match_manifest(bundle, manifest)
    unet_inputs = {tensor["name"]: tensor for tensor in package_io(bundle / "unet" / "model.mlpackage")[0]}
    outputs = package_io(bundle / "controlnet" / "model.mlpackage")[1]
    assert [tensor["name"] for tensor in outputs] == list(manifest.controlnet.residual_inputs)
    latent = unet_inputs["sample"]["shape"][2]
    sizes = set()
    for tensor in outputs:
        assert tensor["shape"] == unet_inputs[tensor["name"]]["shape"], tensor
        sizes.add(tensor["shape"][2])
    assert sizes == {latent, latent // 2}  # the tiny U-Net's two latent scales
    control = package_io(bundle / "controlnet" / "model.mlpackage")[0][-1]
    assert control["name"] == "controlnet_cond" and control["shape"][2] == latent * manifest.pipeline.vae_scale_factor
