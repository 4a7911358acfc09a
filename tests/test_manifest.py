"""The manifest is a contract read from untrusted input: every malformed field is one BundleError line naming it.

Each test edits a copy of the tiny bundle's ``manifest.json`` (or its folder) the way a broken or tampered bundle
would, and checks the message names the field. The first group are the findings that once gave tracebacks, silent
misbehaviour or an unverified file; the rest cover the cross-checks and the forms every target writes.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from lcm_export.errors import BundleError
from lcm_export.runtime.manifest import (
    DEFAULT_GUIDANCE_SCALE,
    MANIFEST_NAME,
    Manifest,
    load_manifest,
    sha256_file,
)
from lcm_export.runtime.specs import ComponentProfiles, ComponentSpec, ShapeRange

Edit = Callable[[dict[str, Any]], Any]


@pytest.fixture
def bundle(tiny_lcm_bundle, tmp_path) -> Path:
    return Path(shutil.copytree(tiny_lcm_bundle, tmp_path / "bundle"))


def read(bundle: Path) -> dict[str, Any]:
    return json.loads((bundle / MANIFEST_NAME).read_text())


def write(bundle: Path, data: dict[str, Any]) -> None:
    (bundle / MANIFEST_NAME).write_text(json.dumps(data, indent=2))


def edit(bundle: Path, change: Edit) -> None:
    data = read(bundle)
    change(data)
    write(bundle, data)


def rejected(bundle: Path, field: str) -> str:
    """The one-line message, which must name the bundle and ``field`` and say what to do."""
    with pytest.raises(BundleError) as caught:
        load_manifest(bundle)
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith(f"BUNDLE '{bundle}': manifest.json field {field} "), message
    assert message.endswith(": re-export the bundle"), message
    return message


def list_file(data: dict[str, Any], bundle: Path, path: str) -> None:
    """Add ``path`` (a file in ``bundle``) to ``files`` with its true size and sha256."""
    data["files"].append({"path": path, "size": (bundle / path).stat().st_size, "sha256": sha256_file(bundle / path)})


def unet_input(data: dict[str, Any], name: str) -> dict[str, Any]:
    return next(t for t in data["components"]["unet"]["inputs"] if t["name"] == name)


# -- the findings: each once gave a traceback, a silent misrun or an unverified file -----------------------------


def _set(path: str, value: Any) -> Edit:
    """An edit setting the dotted ``path`` (ints index lists) to ``value``."""

    def change(data: dict[str, Any]) -> None:
        *parents, last = path.split(".")
        node = data
        for key in parents:
            node = node[int(key)] if isinstance(node, list) else node[key]
        node[int(last) if isinstance(node, list) else last] = value

    return change


FINDINGS: dict[str, tuple[Edit, str]] = {
    "components as a list": (lambda d: d.update(components=list(d["components"].values())), "components"),
    "scheduler.tables as a list": (
        lambda d: d["scheduler"].update(tables=list(d["scheduler"]["tables"].values())),
        "scheduler.tables",
    ),
    "vae_scale_factor as a string": (_set("pipeline.vae_scale_factor", "8"), "pipeline.vae_scale_factor"),
    "dtype float99": (_set("components.unet.inputs.0.dtype", "float99"), r"components.unet.inputs[0].dtype"),
    "no tokenizers": (lambda d: d.update(tokenizers=[]), "tokenizers"),
    "prediction_type flow": (_set("scheduler.prediction_type", "flow"), "scheduler.prediction_type"),
    "guidance CFG": (_set("pipeline.guidance", "CFG"), "pipeline.guidance"),
    "unknown shape symbol": (
        _set("components.unet.inputs.0.shape.2", "latent_depth"),
        "components.unet.inputs[0].shape[2]",
    ),
    "fractional timestep": (_set("scheduler.tables.1.timesteps.0", 999.5), "scheduler.tables.1.timesteps[0]"),
    "vae_scaling_factor 0": (_set("pipeline.vae_scaling_factor", 0), "pipeline.vae_scaling_factor"),
    "absolute files path": (_set("files.0.path", "/etc/hostname"), "files[0].path"),
    "artifact outside the bundle": (
        _set("components.unet.artifacts.onnx.path", "../other/unet/model.onnx"),
        "components.unet.artifacts.onnx.path",
    ),
}


@pytest.mark.parametrize("finding", list(FINDINGS))
def test_finding_is_one_line_naming_the_field(bundle, finding) -> None:
    change, field = FINDINGS[finding]
    edit(bundle, change)
    rejected(bundle, field)


def test_message_format(bundle) -> None:
    edit(bundle, _set("pipeline.vae_scale_factor", "8"))
    assert rejected(bundle, "pipeline.vae_scale_factor") == (
        f"BUNDLE '{bundle}': manifest.json field pipeline.vae_scale_factor must be an integer from 1 to 64 "
        '(got "8"): re-export the bundle'
    )


def test_artifact_inside_the_bundle_but_not_listed_is_not_loaded_unhashed(bundle) -> None:
    shutil.copy(bundle / "unet" / "model.onnx", bundle / "unet" / "other.onnx")
    edit(bundle, _set("components.unet.artifacts.onnx.path", "unet/other.onnx"))
    assert "does not list" in rejected(bundle, "components.unet.artifacts.onnx.path")


def test_tokenizer_must_be_listed(bundle) -> None:
    shutil.copy(bundle / "tokenizer" / "tokenizer.json", bundle / "tokenizer.json")
    edit(bundle, _set("tokenizers.0.path", "tokenizer.json"))
    rejected(bundle, "tokenizers[0].path")


# -- types and ranges ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "value", "field"),
    [
        ("pipeline.vae_scale_factor", True, "pipeline.vae_scale_factor"),  # a bool is not an int
        ("pipeline.default_height", 32.0, "pipeline.default_height"),  # nor is a float
        ("pipeline.default_height", 30, "pipeline.default_height"),  # not a multiple of spatial_multiple
        ("pipeline.default_width", 2**40, "pipeline.default_width"),
        ("pipeline.vae_scaling_factor", math.nan, "pipeline.vae_scaling_factor"),
        ("pipeline.vae_scaling_factor", "0.18215", "pipeline.vae_scaling_factor"),
        ("pipeline.vae_scaling_factor", 10**400, "pipeline.vae_scaling_factor"),  # beyond float range
        ("pipeline.vae_shift_factor", math.inf, "pipeline.vae_shift_factor"),
        ("pipeline.time_cond_proj_dim", -1, "pipeline.time_cond_proj_dim"),
        ("pipeline.time_cond_proj_dim", None, "pipeline.time_cond_proj_dim"),  # the w-embedding needs it
        ("pipeline.latent_channels", 0, "pipeline.latent_channels"),
        ("pipeline.family", "sdxl", "pipeline.family"),
        ("pipeline.vae", "autoencoder_vq", "pipeline.vae"),
        ("pipeline.default_guidance_scale", 51, "pipeline.default_guidance_scale"),
        ("pipeline.default_guidance_scale", -0.5, "pipeline.default_guidance_scale"),
        ("target", "tflite", "target"),
        ("target", "tensorrt", "components.text_encoder.artifacts"),  # no engine to run
        ("precision", "int8", "precision"),
        ("scheduler.init_noise_sigma", 0, "scheduler.init_noise_sigma"),
        ("scheduler.dynamic_thresholding_ratio", 1.5, "scheduler.dynamic_thresholding_ratio"),
        ("scheduler.clip_sample", 0, "scheduler.clip_sample"),
        ("scheduler.config.num_train_timesteps", 0, "scheduler.config.num_train_timesteps"),
        ("scheduler.config.thresholding", True, "scheduler.config.thresholding"),  # disagrees with the copy
        ("tokenizers.0.max_length", 0, "tokenizers[0].max_length"),
        ("tokenizers.0.pad_id", -1, "tokenizers[0].pad_id"),
        ("tokenizers.0.path", "text_encoder/config.json", "tokenizers[0].path"),
        ("files.0.size", -1, "files[0].size"),
        ("files.0.sha256", "A" * 64, "files[0].sha256"),
        ("components.unet.batch_multiplier", 2, "components.unet.batch_multiplier"),
        ("components.unet.artifacts.onnx.precision", "fp16", "components.unet.artifacts.onnx.precision"),
        ("components.unet.inputs.0.dtype", "float16", "components.unet.inputs[0].dtype"),
        ("components.text_encoder.inputs.0.dtype", "int32", "components.text_encoder.inputs[0].dtype"),
        ("components.unet.inputs.0.shape.1", 3, "components.unet.inputs[0].shape"),  # not latent_channels
        ("components.unet.inputs.0.shape.2", 0, "components.unet.inputs[0].shape[2]"),
        ("components.unet.inputs.0.name", "latents", "components.unet.inputs"),
        ("components.unet.artifacts.onnx.format", "tensorrt", "components.unet.artifacts.onnx.path"),  # .onnx
        ("components.unet.artifacts.onnx.path", "vae_decoder/model.onnx", "components.unet.artifacts.onnx.path"),
        ("components.unet.artifacts.onnx.path", "unet/config.json", "components.unet.artifacts.onnx.path"),
        ("components.unet.artifacts.onnx.path", "unet\\model.onnx", "components.unet.artifacts.onnx.path"),
        ("components.unet.artifacts.onnx.path", "unet/./model.onnx", "components.unet.artifacts.onnx.path"),
        ("components.unet.artifacts.onnx.path", "C:/unet/model.onnx", "components.unet.artifacts.onnx.path"),
        ("files.1.path", "scheduler/../model_index.json", "files[1].path"),
        ("files.1.path", "manifest.json", "files[1].path"),
        ("format_version", 1.0, None),
        ("format_version", True, None),
    ],
)
def test_bad_value_names_its_field(bundle, path, value, field) -> None:
    edit(bundle, _set(path, value))
    if field is None:  # the format version has its own message
        with pytest.raises(BundleError, match="format version"):
            load_manifest(bundle)
        return
    rejected(bundle, field)


def test_no_field_error_has_a_second_line(bundle) -> None:
    original = read(bundle)
    edit(bundle, _set("components.unet.inputs.0.name", "sample\nTraceback (most recent call last):"))
    rejected(bundle, "components.unet.inputs[0].name")
    write(bundle, original)
    edit(bundle, lambda d: d["components"].update({"bad\nname": {}}))
    rejected(bundle, r'components["bad\nname"]')


# -- the scheduler tables -----------------------------------------------------------------------------------------


def test_timesteps_strictly_decrease_below_num_train_timesteps(bundle) -> None:
    edit(bundle, _set("scheduler.tables.2.timesteps", [499, 999]))
    rejected(bundle, "scheduler.tables.2.timesteps[1]")
    edit(bundle, _set("scheduler.config.num_train_timesteps", 500))
    rejected(bundle, "scheduler.tables.1.timesteps[0]")


def test_table_columns_have_the_step_count_length(bundle) -> None:
    edit(bundle, lambda d: d["scheduler"]["tables"]["3"]["c_skip"].pop())
    assert "exactly 3" in rejected(bundle, "scheduler.tables.3.c_skip")


def test_tables_cover_one_to_n_steps(bundle) -> None:
    original = read(bundle)
    edit(bundle, lambda d: d["scheduler"]["tables"].pop("2"))
    rejected(bundle, "scheduler.tables.2")
    write(bundle, original)
    edit(bundle, lambda d: d["scheduler"]["tables"].update({"02": d["scheduler"]["tables"]["2"]}))
    rejected(bundle, "scheduler.tables.02")
    write(bundle, original)
    edit(bundle, lambda d: d["scheduler"]["tables"].update({"7": d["scheduler"]["tables"]["1"]}))
    rejected(bundle, "scheduler.tables.7.timesteps")


def test_table_values_are_one_lcm_schedule(bundle) -> None:
    last = len(read(bundle)["scheduler"]["tables"]["2"]["timesteps"]) - 1
    cases = [
        ("scheduler.tables.2.c_out.1", 0.5, "scheduler.tables.2.c_out[1]"),  # c_skip + c_out² != 1
        ("scheduler.tables.2.sqrt_beta_prod.0", 0.5, "scheduler.tables.2.sqrt_beta_prod[0]"),
        ("scheduler.tables.2.sqrt_alpha_prod_next.0", 0.5, "scheduler.tables.2.sqrt_alpha_prod_next[0]"),
        ("scheduler.tables.2.c_skip.0", 0, "scheduler.tables.2.c_skip[0]"),
        ("scheduler.tables.2.c_skip.0", -1e-9, "scheduler.tables.2.c_skip[0]"),
        (f"scheduler.tables.2.sqrt_alpha_prod.{last}", math.nan, f"scheduler.tables.2.sqrt_alpha_prod[{last}]"),
    ]
    original = read(bundle)
    for path, value, field in cases:
        write(bundle, original)
        edit(bundle, _set(path, value))
        rejected(bundle, field)
    write(bundle, original)
    edit(bundle, _set("scheduler.tables.2.timesteps.1", 0))  # 499's values at t=0: above smaller timesteps'
    with pytest.raises(BundleError, match=r"smaller timestep 0 at scheduler\.tables\.2\.timesteps\[1\]"):
        load_manifest(bundle)


def test_the_same_timestep_has_the_same_values_in_every_table(bundle) -> None:
    data = read(bundle)
    table = data["scheduler"]["tables"]["2"]
    table["c_skip"][0] *= 1.0000001  # still c_skip + c_out² = 1 within float32 rounding
    write(bundle, data)
    assert "function of the timestep" in rejected(bundle, "scheduler.tables.2.timesteps[0]")


# -- components ---------------------------------------------------------------------------------------------------


def test_runtime_components_and_their_io(bundle) -> None:
    original = read(bundle)
    cases: list[tuple[Edit, str]] = [
        (lambda d: d["components"].pop("unet"), "components.unet"),  # its files are still listed
        (lambda d: d["components"].update(text_encoder_2=d["components"]["text_encoder"]), "components.text_encoder_2"),
        (lambda d: d["components"]["unet"]["inputs"].pop(), "components.unet.inputs"),  # timestep_cond
        (lambda d: d["components"]["unet"]["outputs"][0].update(name="noise"), "components.unet.outputs"),
        (lambda d: d["components"]["text_encoder"]["outputs"].pop(0), "components.text_encoder.outputs"),
        (lambda d: unet_input(d, "timestep").update(shape=[1]), "components.unet.inputs[1].shape"),
        (
            lambda d: unet_input(d, "encoder_hidden_states")["shape"].__setitem__(2, 64),
            "components.unet.inputs[2].shape[2]",
        ),
        (lambda d: unet_input(d, "timestep_cond")["shape"].__setitem__(1, 64), "components.unet.inputs[3].shape"),
        (
            lambda d: d["components"]["unet"]["outputs"].append(unet_input(d, "sample")),
            "components.unet.outputs[1].name",
        ),
        (lambda d: d["components"]["unet"].update(artifacts={}), "components.unet.artifacts"),
        (
            lambda d: d["components"]["vae_encoder"]["outputs"][0].update(name="latents"),
            "components.vae_encoder.outputs",
        ),
    ]
    for change, field in cases:
        write(bundle, original)
        edit(bundle, change)
        rejected(bundle, field)


def test_a_bundle_exported_without_a_component_loads(bundle) -> None:
    """Partial bundles (the library can export any subset) load; the pipeline then names what is missing."""
    data = read(bundle)
    data["components"].pop("unet")
    data["files"] = [entry for entry in data["files"] if not entry["path"].startswith("unet/")]
    shutil.rmtree(bundle / "unet")
    write(bundle, data)
    assert "unet" not in load_manifest(bundle).components


def test_guidance_modes_are_consistent(bundle) -> None:
    def cfg_without_timestep_cond(data: dict[str, Any]) -> None:
        data["pipeline"].update(guidance="cfg", time_cond_proj_dim=None)
        for name in ("text_encoder", "unet"):
            data["components"][name]["batch_multiplier"] = 2

    edit(bundle, cfg_without_timestep_cond)
    assert "timestep_cond" in rejected(bundle, "components.unet.inputs")  # fed only with time_cond_proj_dim


# -- files and paths ----------------------------------------------------------------------------------------------


def test_files_are_unique_and_hashed(bundle) -> None:
    edit(bundle, lambda d: d["files"].append(dict(d["files"][0])))
    assert "repeats files[0].path" in rejected(bundle, f"files[{len(read(bundle)['files']) - 1}].path")


def test_duplicate_keys_are_ambiguous(bundle) -> None:
    text = (bundle / MANIFEST_NAME).read_text().replace('"target": "onnx"', '"target": "onnx", "target": "coreml"')
    (bundle / MANIFEST_NAME).write_text(text)
    with pytest.raises(BundleError, match='key "target" appears twice'):
        load_manifest(bundle)


def test_a_listed_symlink_out_of_the_bundle_is_rejected(bundle, tmp_path) -> None:
    outside = tmp_path / "outside.txt"
    outside.write_text("not part of the bundle\n")
    (bundle / "scheduler" / "link.txt").symlink_to(outside)
    edit(bundle, lambda d: list_file(d, bundle, "scheduler/link.txt"))
    assert "outside the bundle" in rejected(bundle, f"files[{len(read(bundle)['files']) - 1}].path")


def test_a_symlinked_folder_out_of_the_bundle_is_rejected(bundle, tmp_path) -> None:
    shutil.move(bundle / "unet", tmp_path / "unet")
    (bundle / "unet").symlink_to(tmp_path / "unet", target_is_directory=True)
    index = next(i for i, entry in enumerate(read(bundle)["files"]) if entry["path"].startswith("unet/"))
    rejected(bundle, f"files[{index}].path")


def test_a_symlink_inside_the_bundle_is_followed_and_verified(bundle) -> None:
    (bundle / "unet" / "config.json").unlink()
    (bundle / "unet" / "config.json").symlink_to(bundle / "text_encoder" / "config.json")
    with pytest.raises(BundleError, match="sha256"):  # inside the bundle, but not the file that was hashed
        load_manifest(bundle)


# -- default_guidance_scale ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("guidance", ["embedding", "cfg"])
def test_default_guidance_scale_defaults_by_guidance_for_older_bundles(bundle, guidance) -> None:
    data = read(bundle)
    data["pipeline"].pop("default_guidance_scale", None)
    if guidance == "cfg":
        data["pipeline"].update(guidance="cfg", time_cond_proj_dim=None)
        data["components"]["unet"]["inputs"] = [
            t for t in data["components"]["unet"]["inputs"] if t["name"] != "timestep_cond"
        ]
        for name in ("text_encoder", "unet"):
            data["components"][name]["batch_multiplier"] = 2
    write(bundle, data)
    manifest = load_manifest(bundle)
    assert (
        manifest.pipeline.default_guidance_scale
        == DEFAULT_GUIDANCE_SCALE[guidance]
        == {"embedding": 8.5, "cfg": 1.0}[guidance]
    )
    assert manifest.pipeline.to_json()["default_guidance_scale"] == DEFAULT_GUIDANCE_SCALE[guidance]


def test_default_guidance_scale_is_read_and_written(bundle) -> None:
    edit(bundle, _set("pipeline.default_guidance_scale", 2))
    manifest = load_manifest(bundle)
    assert manifest.pipeline.default_guidance_scale == 2.0
    assert manifest.to_json()["pipeline"]["default_guidance_scale"] == 2.0


# -- what loads ---------------------------------------------------------------------------------------------------


def test_the_exported_manifest_round_trips(tiny_lcm_bundle) -> None:
    data = read(tiny_lcm_bundle)
    assert Manifest.from_json(data).to_json() == data


def test_unknown_keys_are_ignored(bundle) -> None:
    """Forward compatibility: a newer exporter may add information; a change of meaning bumps format_version."""

    def add_keys(data: dict[str, Any]) -> None:
        data["signed_by"] = "someone"
        data["pipeline"]["refiner"] = None
        data["components"]["unet"]["inputs"][0]["layout"] = "NCHW"
        data["files"][0]["mtime"] = 0

    edit(bundle, add_keys)
    load_manifest(bundle)


def _fake_artifact_file(bundle: Path, path: str, content: bytes) -> None:
    (bundle / path).parent.mkdir(parents=True, exist_ok=True)
    (bundle / path).write_bytes(content)


def as_tensorrt_bundle(bundle: Path) -> None:
    """The tiny ONNX bundle rewritten as the TensorRT target writes it (fake engines: nothing runs them here)."""
    data = read(bundle)
    data["target"] = "tensorrt"
    shape_range = ShapeRange((1, 1, 4), (16, 32, 48), (16, 32, 48))
    for name, component in data["components"].items():
        spec = ComponentSpec.from_json(name, component)
        profiles = ComponentProfiles.derive(spec, shape_range, data["pipeline"]["vae_scale_factor"])
        io = [
            {
                "name": t.name,
                "mode": mode,
                "dtype": t.dtype,
                "shape": [-1 if isinstance(d, str) else d for d in t.shape],
            }
            for mode, tensors in (("input", spec.inputs), ("output", spec.outputs))
            for t in tensors
        ]
        _fake_artifact_file(bundle, f"{name}/model.plan", f"engine of {name}".encode())
        component["artifacts"]["tensorrt"] = {
            "format": "tensorrt",
            "path": f"{name}/model.plan",
            "precision": component["artifacts"]["onnx"]["precision"],
            "flavor": "rtx",
            "trt_version": "1.2.0.54",
            "compute_capabilities": [],
            "strongly_typed": True,
            "builder_optimization_level": 3,
            "shape_range": shape_range.to_json(),
            "vae_scale_factor": data["pipeline"]["vae_scale_factor"],
            "profiles": profiles.to_json(),
            "io": io,
            "build_seconds": 1.5,
        }
        list_file(data, bundle, f"{name}/model.plan")
    write(bundle, data)


def as_coreml_bundle(bundle: Path) -> None:
    """The tiny ONNX bundle rewritten as the Core ML target writes it: an mlpackage folder per component."""
    data = read(bundle)
    data["target"] = "coreml"
    values = ShapeRange.static(1, 32, 32).symbol_values("opt", data["pipeline"]["vae_scale_factor"])
    for name, component in data["components"].items():
        spec = ComponentSpec.from_json(name, component)

        def coreml(tensor) -> dict[str, Any]:
            dtype = "int32" if tensor.dtype == "int64" else tensor.dtype
            return {"name": tensor.name, "dtype": dtype, "shape": list(tensor.concrete_shape(values)) or [1]}

        package = f"{name}/model.mlpackage"
        for inner in (
            "Manifest.json",
            "Data/com.apple.CoreML/model.mlmodel",
            "Data/com.apple.CoreML/weights/weight.bin",
        ):
            _fake_artifact_file(bundle, f"{package}/{inner}", f"{name} {inner}".encode())
            list_file(data, bundle, f"{package}/{inner}")
        component["artifacts"]["mlpackage"] = {
            "format": "mlpackage",
            "path": package,
            "precision": component["artifacts"]["onnx"]["precision"],
            "coreml_inputs": [coreml(t) for t in spec.inputs],
            "coreml_outputs": [coreml(t) for t in spec.outputs],
            "minimum_deployment_target": "iOS16/macOS13",
            "shapes": {**ShapeRange.static(1, 32, 32).to_json(), "flexible": False},
        }
    write(bundle, data)


@pytest.mark.parametrize("keep_onnx", [True, False])
def test_tensorrt_manifest_loads_and_its_engine_io_is_checked(bundle, keep_onnx) -> None:
    as_tensorrt_bundle(bundle)
    if not keep_onnx:
        edit(bundle, lambda d: [c["artifacts"].pop("onnx") for c in d["components"].values()])
    manifest = load_manifest(bundle, verify="full")
    assert {fmt for c in manifest.components.values() for fmt in c.artifacts} == (
        {"onnx", "tensorrt"} if keep_onnx else {"tensorrt"}
    )
    original = read(bundle)
    cases: list[tuple[Edit, str]] = [
        (
            lambda d: d["components"]["unet"]["artifacts"]["tensorrt"]["io"][0].update(dtype="float16"),
            "components.unet.artifacts.tensorrt.io[0]",
        ),
        (
            lambda d: d["components"]["unet"]["artifacts"]["tensorrt"]["io"].pop(),
            "components.unet.artifacts.tensorrt.io",
        ),
        (
            lambda d: d["components"]["unet"]["artifacts"]["tensorrt"].update(vae_scale_factor=8),
            "components.unet.artifacts.tensorrt.vae_scale_factor",
        ),
        (
            lambda d: d["components"]["unet"]["artifacts"]["tensorrt"].update(compute_capabilities=["ampere"]),
            "components.unet.artifacts.tensorrt.compute_capabilities[0]",
        ),
        (
            lambda d: d["components"]["unet"]["artifacts"]["tensorrt"]["profiles"]["sample"].update(min=[4, 4, 8, 8]),
            "components.unet.artifacts.tensorrt.profiles.sample",
        ),
        (lambda d: d["components"]["unet"]["artifacts"]["tensorrt"].pop("io"), "components.unet.artifacts.tensorrt.io"),
    ]
    for change, field in cases:
        write(bundle, original)
        edit(bundle, change)
        rejected(bundle, field)


def test_coreml_manifest_loads_and_every_file_of_a_package_must_be_listed(bundle) -> None:
    as_coreml_bundle(bundle)
    manifest = load_manifest(bundle, verify="full")
    assert manifest.target == "coreml"
    (bundle / "unet" / "model.mlpackage" / "Data" / "extra.bin").write_bytes(b"not hashed")
    assert "extra.bin" in rejected(bundle, "components.unet.artifacts.mlpackage.path")
    (bundle / "unet" / "model.mlpackage" / "Data" / "extra.bin").unlink()
    original = read(bundle)
    cases: list[tuple[Edit, str]] = [
        (
            lambda d: d["components"]["unet"]["artifacts"]["mlpackage"]["coreml_inputs"].pop(),
            "components.unet.artifacts.mlpackage.coreml_inputs",
        ),
        (
            lambda d: d["components"]["unet"]["artifacts"]["mlpackage"]["coreml_inputs"][0].update(dtype="int64"),
            "components.unet.artifacts.mlpackage.coreml_inputs[0].dtype",
        ),
        (
            lambda d: d["components"]["unet"]["artifacts"]["mlpackage"]["coreml_inputs"][0].update(bounds=[[1, 1]] * 3),
            "components.unet.artifacts.mlpackage.coreml_inputs[0].bounds",
        ),
        (
            lambda d: d.update(files=[f for f in d["files"] if not f["path"].startswith("unet/model.mlpackage/")]),
            "components.unet.artifacts.mlpackage.path",
        ),
        (
            lambda d: d["components"]["unet"]["artifacts"]["mlpackage"].update(path="unet/model.mlmodel"),
            "components.unet.artifacts.mlpackage.path",
        ),
    ]
    for change, field in cases:
        write(bundle, original)
        edit(bundle, change)
        rejected(bundle, field)


def test_coreml_package_with_an_unlisted_symlink_is_rejected(bundle, tmp_path) -> None:
    as_coreml_bundle(bundle)
    os.symlink(tmp_path, bundle / "unet" / "model.mlpackage" / "Data" / "elsewhere")
    assert "elsewhere" in rejected(bundle, "components.unet.artifacts.mlpackage.path")
