"""The typed details of a TensorRT engine and a Core ML package: one object written, validated and read.

Each object round-trips through its JSON; every field's bad value is one :class:`ManifestFieldError` line naming
the field; what a target writes is exactly the object its backend reads; and the compute-capability syntax is one
grammar for the exporter's option, the manifest and the backend. Self-contained (the tests folder is a package):
the bundles are exported here from conftest's session fixture ``tiny_lcm_dir``.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from lcm_export.errors import BundleError, ExportError, UserError
from lcm_export.runtime.backends import BackendOptions
from lcm_export.runtime.backends import coreml as coreml_backend
from lcm_export.runtime.backends import tensorrt as trt_backend
from lcm_export.runtime.manifest import (
    DEFAULT_ENGINE_VAE_SCALE_FACTOR,
    MANIFEST_NAME,
    CoreMLPackageDetails,
    CoreMLTensor,
    IOTensor,
    ManifestFieldError,
    TensorRTEngineDetails,
    load_manifest,
    parse_compute_capability,
)
from lcm_export.runtime.manifest.details import read_compute_capability
from lcm_export.runtime.specs import ComponentProfiles, ShapeRange, sample_inputs

WHERE = "components.unet.variants[0]"
Edit = Callable[[dict[str, Any]], Any]
HAS_RTX = trt_backend.import_flavor("rtx") is not None
HAS_COREMLTOOLS = importlib.util.find_spec("coremltools") is not None
RUNTIME_COMPONENTS = ("text_encoder", "unet", "vae_decoder")  # enough for a bundle; fewer engines to build


def unet_engine() -> TensorRTEngineDetails:
    """A tiny U-Net engine's details with every field set, as the TensorRT target records them."""
    shapes = {"sample": (1, 4, 8, 8), "timestep": (), "encoder_hidden_states": (1, 77, 32)}
    return TensorRTEngineDetails(
        flavor="rtx",
        trt_version="1.2.0.54",
        compute_capabilities=(86, 89),
        io=(
            IOTensor("sample", "input", "float16", (1, 4, 8, 8)),
            IOTensor("timestep", "input", "float16", ()),
            IOTensor("encoder_hidden_states", "input", "float16", (1, 77, 32)),
            IOTensor("out_sample", "output", "float16", (1, 4, 8, 8)),
        ),
        profiles=ComponentProfiles(shapes, shapes, shapes),
        vae_scale_factor=2,
        shape_range=ShapeRange.static(1, 16, 16),
        strongly_typed=True,
        builder_optimization_level=3,
        build_seconds=1.5,
    )


def unet_package() -> CoreMLPackageDetails:
    """A tiny U-Net package's details with every field set, as the Core ML target records them."""
    return CoreMLPackageDetails(
        inputs=(
            CoreMLTensor("sample", "float16", (2, 4, 8, 8), ((1, 2), (4, 4), (8, 8), (8, 8))),
            CoreMLTensor("timestep", "float16", (1,)),
            CoreMLTensor("hidden_states_0", "float16", (2, 77, 32), spec_name="hidden_states.0"),
        ),
        outputs=(CoreMLTensor("out_sample", "float16", (2, 4, 8, 8)),),
        minimum_deployment_target="iOS16/macOS13",
        compute_precision="float16",
        shape_range=ShapeRange.static(1, 16, 16),
        flexible=True,
        coremltools_version="9.0",
        conversion_seconds=2.25,
        validation={"validated": "spec-only (prediction needs macOS)"},
    )


def rejected(read: Callable[[Any, str], Any], data: dict[str, Any], field: str) -> str:
    """The one-line error of reading ``data``, which must name ``field``."""
    with pytest.raises(ManifestFieldError) as caught:
        read(data, WHERE)
    message = str(caught.value)
    assert "\n" not in message
    assert caught.value.field == field, message
    assert message.startswith(f"manifest.json field {field} "), message
    return message


# -- round trips ------------------------------------------------------------------------------------------------


def test_engine_details_round_trip() -> None:
    full = unet_engine()
    assert TensorRTEngineDetails.from_json(full.to_json(), WHERE) == full
    minimal = TensorRTEngineDetails("tensorrt", "10.13.0.35", (), full.io)
    assert TensorRTEngineDetails.from_json(minimal.to_json(), WHERE) == minimal
    assert list(full.to_json()) == [  # the keys and order the target has always written
        "flavor",
        "trt_version",
        "compute_capabilities",
        "strongly_typed",
        "builder_optimization_level",
        "shape_range",
        "vae_scale_factor",
        "profiles",
        "io",
        "build_seconds",
    ]


def test_package_details_round_trip() -> None:
    full = unet_package()
    assert CoreMLPackageDetails.from_json(full.to_json(), WHERE) == full
    minimal = CoreMLPackageDetails(full.inputs, full.outputs)
    assert CoreMLPackageDetails.from_json(minimal.to_json(), WHERE) == minimal
    assert full.to_json()["shapes"] == {**ShapeRange.static(1, 16, 16).to_json(), "flexible": True}
    assert full.to_json()["validated"] == "spec-only (prediction needs macOS)"  # written flat, as before


def test_the_optional_fields_have_their_defaults_in_from_json() -> None:
    """What older or hand-written bundles may lack gets one default, the one the backend then runs with."""
    data = unet_engine().to_json()
    for key in ("profiles", "vae_scale_factor", "shape_range", "strongly_typed", "builder_optimization_level"):
        del data[key]
    del data["build_seconds"]
    engine = TensorRTEngineDetails.from_json(data, WHERE)
    assert engine.profiles == ComponentProfiles()
    assert engine.vae_scale_factor == DEFAULT_ENGINE_VAE_SCALE_FACTOR
    assert (engine.shape_range, engine.strongly_typed, engine.builder_optimization_level, engine.build_seconds) == (
        None,
        None,
        None,
        None,
    )
    package = {"coreml_inputs": [{"name": "x", "dtype": "float32", "shape": [1]}], "coreml_outputs": []}
    package["coreml_outputs"] = copy.deepcopy(package["coreml_inputs"])
    read = CoreMLPackageDetails.from_json(package, WHERE)
    assert read.inputs == (CoreMLTensor("x", "float32", (1,)),) and read.validation == {}
    assert read.shape_range is read.flexible is read.compute_precision is None


def test_unknown_keys_are_ignored() -> None:
    """Forward compatibility, as for the rest of the manifest: a newer target may record more."""
    assert TensorRTEngineDetails.from_json({**unet_engine().to_json(), "tactics": 7}, WHERE) == unet_engine()
    assert CoreMLPackageDetails.from_json({**unet_package().to_json(), "ane": True}, WHERE) == unet_package()


# -- every field's bad value ------------------------------------------------------------------------------------

ENGINE_CASES: list[tuple[str, Edit, str]] = [
    ("flavor", lambda d: d.update(flavor="cuda"), "flavor"),
    ("flavor missing", lambda d: d.pop("flavor"), "flavor"),
    ("trt_version", lambda d: d.update(trt_version=10), "trt_version"),
    ("compute_capabilities", lambda d: d.update(compute_capabilities="86"), "compute_capabilities"),
    ("capability name", lambda d: d.update(compute_capabilities=["ampere"]), "compute_capabilities[0]"),
    ("capability int", lambda d: d.update(compute_capabilities=[86, 5]), "compute_capabilities[1]"),
    ("capability bool", lambda d: d.update(compute_capabilities=[True]), "compute_capabilities[0]"),
    ("io missing", lambda d: d.pop("io"), "io"),
    ("io empty", lambda d: d.update(io=[]), "io"),
    ("io name", lambda d: d["io"][0].update(name="1sample"), "io[0].name"),
    ("io mode", lambda d: d["io"][0].update(mode="inout"), "io[0].mode"),
    ("io dtype", lambda d: d["io"][0].update(dtype="float64"), "io[0].dtype"),
    ("io shape", lambda d: d["io"][0].update(shape=[1, -2, 8, 8]), "io[0].shape[1]"),
    ("io repeated", lambda d: d["io"].append(copy.deepcopy(d["io"][0])), "io[4].name"),
    ("profiles", lambda d: d.update(profiles=[]), "profiles"),
    ("profile order", lambda d: d["profiles"]["sample"].update(min=[2, 4, 8, 8]), "profiles.sample"),
    ("profile rank", lambda d: d["profiles"]["sample"].update(opt=[1, 4, 8]), "profiles.sample.opt"),
    ("profile dim", lambda d: d["profiles"]["sample"].update(max=[1, 4, 8, 0]), "profiles.sample.max[3]"),
    ("vae_scale_factor", lambda d: d.update(vae_scale_factor=0), "vae_scale_factor"),
    ("vae_scale_factor text", lambda d: d.update(vae_scale_factor="8"), "vae_scale_factor"),
    ("shape_range", lambda d: d["shape_range"].update(batch=[2, 1, 1]), "shape_range.batch"),
    ("strongly_typed", lambda d: d.update(strongly_typed="yes"), "strongly_typed"),
    ("builder_optimization_level", lambda d: d.update(builder_optimization_level=6), "builder_optimization_level"),
    ("build_seconds", lambda d: d.update(build_seconds=-1), "build_seconds"),
]


@pytest.mark.parametrize(("change", "field"), [case[1:] for case in ENGINE_CASES], ids=[c[0] for c in ENGINE_CASES])
def test_a_bad_engine_field_is_one_line_naming_it(change: Edit, field: str) -> None:
    data = unet_engine().to_json()
    change(data)
    rejected(TensorRTEngineDetails.from_json, data, f"{WHERE}.{field}")


PACKAGE_CASES: list[tuple[str, Edit, str]] = [
    ("inputs missing", lambda d: d.pop("coreml_inputs"), "coreml_inputs"),
    ("inputs empty", lambda d: d.update(coreml_inputs=[]), "coreml_inputs"),
    ("outputs", lambda d: d.update(coreml_outputs={}), "coreml_outputs"),
    ("name", lambda d: d["coreml_inputs"][0].update(name=""), "coreml_inputs[0].name"),
    ("dtype", lambda d: d["coreml_inputs"][0].update(dtype="int64"), "coreml_inputs[0].dtype"),
    ("shape empty", lambda d: d["coreml_outputs"][0].update(shape=[]), "coreml_outputs[0].shape"),
    ("shape dim", lambda d: d["coreml_inputs"][1].update(shape=[0]), "coreml_inputs[1].shape[0]"),
    ("bounds count", lambda d: d["coreml_inputs"][0].update(bounds=[[1, 2]]), "coreml_inputs[0].bounds"),
    ("bounds pair", lambda d: d["coreml_inputs"][0]["bounds"].__setitem__(0, [1]), "coreml_inputs[0].bounds[0]"),
    ("bounds around", lambda d: d["coreml_inputs"][0]["bounds"].__setitem__(1, [5, 6]), "coreml_inputs[0].bounds[1]"),
    ("bound value", lambda d: d["coreml_inputs"][0]["bounds"].__setitem__(0, [0, 2]), "coreml_inputs[0].bounds[0][0]"),
    ("spec_name", lambda d: d["coreml_inputs"][2].update(spec_name=""), "coreml_inputs[2].spec_name"),
    ("deployment target", lambda d: d.update(minimum_deployment_target=16), "minimum_deployment_target"),
    ("compute_precision", lambda d: d.update(compute_precision="int8"), "compute_precision"),
    ("shapes", lambda d: d.update(shapes=[]), "shapes"),
    ("shapes range", lambda d: d["shapes"].update(height=[16, 16]), "shapes.height"),
    ("flexible", lambda d: d["shapes"].update(flexible="no"), "shapes.flexible"),
    ("coremltools", lambda d: d.update(coremltools=9), "coremltools"),
    ("conversion_seconds", lambda d: d.update(conversion_seconds="fast"), "conversion_seconds"),
]


@pytest.mark.parametrize(("change", "field"), [case[1:] for case in PACKAGE_CASES], ids=[c[0] for c in PACKAGE_CASES])
def test_a_bad_package_field_is_one_line_naming_it(change: Edit, field: str) -> None:
    data = unet_package().to_json()
    change(data)
    rejected(CoreMLPackageDetails.from_json, data, f"{WHERE}.{field}")


# -- the compute-capability syntax ------------------------------------------------------------------------------

ACCEPTED = {86: 86, 120: 120, 10: 10, 999: 999, "86": 86, "SM86": 86, "sm_86": 86, "Sm89": 89, "8.6": 86}
ACCEPTED |= {"12.0": 120, "SM_7.5": 75, "sm120": 120}
REJECTED = (5, 1000, 0, True, 8.6, None, "", "ampere", "8", "05", "0.5", "8.65", "123.4", "sm__86", " 86", "SM 86")


@pytest.mark.parametrize("value", list(ACCEPTED), ids=repr)
def test_a_compute_capability_reads_the_same_everywhere(value: Any) -> None:
    """The exporter's option, the manifest and the backend (which reads the manifest's) give the same number."""
    expected = ACCEPTED[value]
    assert parse_compute_capability(value) == expected
    assert trt_backend.parse_compute_capability is parse_compute_capability
    options = {"trt_flavor": "rtx", "compute_capabilities": (value,)}
    assert trt_target().TensorRTBuildOptions.from_target_options(options).compute_capabilities == (expected,)
    assert read_compute_capability(value, "x") == expected
    data = {**unet_engine().to_json(), "compute_capabilities": [value]}
    assert TensorRTEngineDetails.from_json(data, WHERE).compute_capabilities == (expected,)


@pytest.mark.parametrize("value", REJECTED, ids=repr)
def test_a_bad_compute_capability_is_refused_everywhere(value: Any) -> None:
    with pytest.raises(ValueError):
        parse_compute_capability(value)
    with pytest.raises(ExportError, match="--compute-capability"):
        trt_target().TensorRTBuildOptions.from_target_options({"compute_capabilities": (value,)})
    data = {**unet_engine().to_json(), "compute_capabilities": [value]}
    rejected(TensorRTEngineDetails.from_json, data, f"{WHERE}.compute_capabilities[0]")


def trt_target() -> Any:
    """The TensorRT target module (imports no TensorRT at module level)."""
    from lcm_export.targets import tensorrt

    return tensorrt


@pytest.mark.tensorrt
@pytest.mark.skipif(not HAS_RTX, reason="TensorRT-RTX is not installed: pip install 'lcm-edge[tensorrt]'")
def test_tensorrt_rtx_names_its_targets_in_the_same_syntax() -> None:
    """TensorRT-RTX's ``ComputeCapability`` members (SM75, SM86, ...) are read by the same parser."""
    target = trt_target()
    valid = target.resolve_flavor("rtx").valid_compute_capabilities()
    assert {75, 86, 89} <= set(valid)
    assert all(valid[number].name == f"SM{number}" for number in valid)


# -- what the target writes is what the backend reads -----------------------------------------------------------


def export(model: Path, output: Path, **options: Any) -> Path:
    from lcm_export.exporter.bundle import ExportConfig, export_bundle

    export_bundle(ExportConfig(model=str(model), output=output, quiet=True, components=RUNTIME_COMPONENTS, **options))
    return output


@pytest.fixture(scope="module")
def engine_bundle(tiny_lcm_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """TensorRT-RTX engines of the tiny LCM for two GPU generations (built without a GPU)."""
    if not HAS_RTX:
        pytest.skip("TensorRT-RTX is not installed")
    options = {"trt_flavor": "rtx", "compute_capabilities": ("SM86", "8.9")}
    return export(tiny_lcm_dir, tmp_path_factory.mktemp("details") / "trt", target="tensorrt", target_options=options)


@pytest.fixture(scope="module")
def package_bundle(tiny_lcm_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Core ML packages of the tiny LCM (converted on Linux, checked against the spec)."""
    if not HAS_COREMLTOOLS:
        pytest.skip("coremltools is not installed")
    return export(tiny_lcm_dir, tmp_path_factory.mktemp("details") / "coreml", target="coreml")


@pytest.mark.tensorrt
@pytest.mark.slow
def test_the_tensorrt_target_writes_what_the_backend_reads(engine_bundle: Path) -> None:
    manifest = load_manifest(engine_bundle, verify="full")
    for name, component in manifest.components.items():
        artifact = component.artifacts["tensorrt"]
        engine = artifact.tensorrt_details
        assert engine.to_json() == artifact.details, name  # the details are exactly the typed object's
        assert engine.flavor == "rtx" and engine.compute_capabilities == (86, 89)
        assert engine.vae_scale_factor == manifest.pipeline.vae_scale_factor
        spec = component.spec.with_dtypes(artifact.io_dtype)
        assert [t.name for t in engine.io] == [*spec.input_names, *spec.output_names], name
        assert list(engine.profiles.minimum) == spec.input_names, name
        # The backend's binding plan and profile check at the engine's own optimum shapes.
        shapes = dict(engine.profiles.optimum)
        trt_backend.check_profile(name, engine.profiles, shapes)
        plan = trt_backend.binding_plan(spec, list(engine.io), shapes, engine.vae_scale_factor)
        assert [binding.name for binding in plan] == [t.name for t in engine.io], name
    # The backend reads the version and capabilities from the same object before it needs a GPU.
    unet = manifest.components["unet"]
    if trt_backend.gpu_count() == 0:
        with pytest.raises(UserError, match="needs an NVIDIA GPU"):
            trt_backend.open_session(engine_bundle, unet, BackendOptions())


@pytest.mark.tensorrt
@pytest.mark.slow
def test_an_engine_without_its_vae_scale_factor_gets_the_default_the_check_sees(engine_bundle, tmp_path) -> None:
    """The default (8) is checked against the tiny pipeline's factor (2), so it cannot run with a wrong one."""
    bundle = Path(shutil.copytree(engine_bundle, tmp_path / "bundle"))
    data = json.loads((bundle / MANIFEST_NAME).read_text())
    del data["components"]["unet"]["variants"][0]["vae_scale_factor"]
    (bundle / MANIFEST_NAME).write_text(json.dumps(data))
    with pytest.raises(BundleError) as caught:
        load_manifest(bundle)
    assert str(caught.value) == (
        f"BUNDLE '{bundle}': manifest.json field {WHERE}.vae_scale_factor must equal pipeline.vae_scale_factor, "
        f"2 (got {DEFAULT_ENGINE_VAE_SCALE_FACTOR}): re-export the bundle"
    )


@pytest.mark.coreml
@pytest.mark.slow
def test_the_coreml_target_writes_what_the_backend_reads(package_bundle: Path) -> None:
    manifest = load_manifest(package_bundle, verify="full")
    for name, component in manifest.components.items():
        artifact = component.artifacts["mlpackage"]
        package = artifact.coreml_details
        assert package.to_json() == artifact.details, name  # the details are exactly the typed object's
        assert coreml_backend.artifact_tensors(component) == (package.inputs, package.outputs)
        assert [t.feed_name for t in package.inputs] == component.spec.input_names, name
        assert package.shape_range is not None and package.flexible is (component.spec.batch_multiplier == 2)
        assert package.compute_precision in ("float16", "float32")
        # The backend adapts spec-shaped feeds to the recorded Core ML inputs (plain numpy, any system).
        values = package.shape_range.symbol_values("opt", manifest.pipeline.vae_scale_factor)
        spec = component.spec.with_dtypes(artifact.io_dtype)
        feeds = coreml_backend.adapt_feeds(sample_inputs(spec, values), package.inputs)
        for tensor in package.inputs:
            assert feeds[tensor.name].dtype == np.dtype(tensor.dtype) and tensor.accepts(feeds[tensor.name].shape)
