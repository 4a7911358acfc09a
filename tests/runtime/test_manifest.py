"""The manifest is a contract read from untrusted input: every malformed field is one BundleError line naming it.

Each test edits a copy of the tiny bundle's ``manifest.json`` (format 2) or its folder the way a broken or tampered
bundle would, and checks the message names the field. The first group are the findings that once gave tracebacks,
silent misbehaviour or an unverified file; the rest cover the cross-checks, the forms every target writes, what
format 2 added (variants, the declared conditioning, image-to-image tables) and the upgrade of format-1 manifests.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from lcm_export.errors import BundleError, UserError
from lcm_export.runtime.manifest import (
    DEFAULT_GUIDANCE_SCALE,
    MANIFEST_NAME,
    Conditioning,
    Manifest,
    load_manifest,
    sha256_file,
    strength_key,
)
from lcm_export.runtime.specs import ComponentProfiles, ComponentSpec, ShapeRange
from lcm_export.runtime.variants import choose_variant, choose_variants
from tests.helpers import as_format_1

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


def variant(data: dict[str, Any], component: str = "unet", index: int = 0) -> dict[str, Any]:
    return data["components"][component]["variants"][index]


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
        _set("components.unet.variants.0.path", "../other/unet/model.onnx"),
        "components.unet.variants[0].path",
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
    edit(bundle, _set("components.unet.variants.0.path", "unet/other.onnx"))
    assert "does not list" in rejected(bundle, "components.unet.variants[0].path")
    edit(bundle, _set("components.unet.variants.0.files", ["unet/other.onnx"]))  # its files agree with it
    assert "does not list" in rejected(bundle, "components.unet.variants[0].files[0]")


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
        ("target", "tensorrt", "components.text_encoder.variants"),  # no engine to run
        ("precision", "bf16", "precision"),
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
        ("components.unet.variants.0.precision", "fp8", "components.unet.variants[0].precision"),
        ("components.unet.variants.0.io_dtype", "float16", "components.unet.variants[0].io_dtype"),  # fp32
        ("components.unet.inputs.0.dtype", "float16", "components.unet.inputs[0].dtype"),  # the spec is float32
        ("components.text_encoder.inputs.0.dtype", "int32", "components.text_encoder.inputs[0].dtype"),
        ("components.unet.inputs.0.shape.1", 3, "components.unet.inputs[0].shape"),  # not latent_channels
        ("components.unet.inputs.0.shape.2", 0, "components.unet.inputs[0].shape[2]"),
        ("components.unet.inputs.0.name", "latents", "components.unet.inputs"),
        ("components.unet.variants.0.format", "tensorrt", "components.unet.variants[0].path"),  # .onnx
        ("components.unet.variants.0.path", "vae_decoder/model.onnx", "components.unet.variants[0].path"),
        ("components.unet.variants.0.path", "unet/config.json", "components.unet.variants[0].path"),
        ("components.unet.variants.0.path", "unet\\model.onnx", "components.unet.variants[0].path"),
        ("components.unet.variants.0.path", "unet/./model.onnx", "components.unet.variants[0].path"),
        ("components.unet.variants.0.path", "C:/unet/model.onnx", "components.unet.variants[0].path"),
        ("components.unet.variants.0.name", "FP32", "components.unet.variants[0].name"),
        ("components.unet.variants.0.io_dtype", "bfloat16", "components.unet.variants[0].io_dtype"),
        ("components.unet.variants.0.files", [], "components.unet.variants[0].files"),
        ("components.unet.variants.0.files", ["unet/config.json"], "components.unet.variants[0].files"),
        ("components.unet.variants.0.files.0", "../unet/model.onnx", "components.unet.variants[0].files[0]"),
        ("components.unet.variants.0.produced_by", [], "components.unet.variants[0].produced_by"),
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
        (lambda d: d["components"]["unet"].update(variants=[]), "components.unet.variants"),
        (lambda d: d["components"]["unet"].update(variants={"fp32": variant(d)}), "components.unet.variants"),
        # format 1's artifacts object in a format-2 manifest: not read, so the variants are missing
        (
            lambda d: d["components"]["unet"].update(artifacts={"onnx": d["components"]["unet"].pop("variants")[0]}),
            "components.unet.variants",
        ),
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

    edit(bundle, cfg_without_timestep_cond)  # the conditioning still feeds the w-embedding
    assert "guidance_embedding" in rejected(bundle, "conditioning.unet_inputs")

    def nor_in_the_conditioning(data: dict[str, Any]) -> None:
        data["conditioning"]["unet_inputs"].pop("timestep_cond")
        data["conditioning"]["guidance_frequencies"] = None

    edit(bundle, nor_in_the_conditioning)  # the U-Net still takes it
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
        data["conditioning"]["unet_inputs"].pop("timestep_cond")
        data["conditioning"]["guidance_frequencies"] = None
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
        data["components"]["unet"]["variants"][0]["graph_optimization"] = "basic"  # a format detail
        data["conditioning"]["clip_skip"] = None
        data["conditioning"]["text_encoders"][0]["projection"] = None
        data["files"][0]["mtime"] = 0

    edit(bundle, add_keys)
    load_manifest(bundle)


def _fake_artifact_file(bundle: Path, path: str, content: bytes) -> None:
    (bundle / path).parent.mkdir(parents=True, exist_ok=True)
    (bundle / path).write_bytes(content)


def as_tensorrt_bundle(bundle: Path, keep_onnx: bool = True, precision: str = "fp32") -> None:
    """The tiny ONNX bundle rewritten as the TensorRT target writes it: the engine variant first, named by its
    precision, the ONNX variant after it when kept (fake engines: nothing runs them here). An fp16 engine takes and
    gives float16."""
    data = read(bundle)
    data["target"] = "tensorrt"
    io_dtype = {"fp32": "float32", "fp16": "float16"}[precision]
    shape_range = ShapeRange((1, 1, 4), (16, 32, 48), (16, 32, 48))
    for name, component in data["components"].items():
        spec = ComponentSpec.from_json(name, component).with_dtypes(io_dtype)
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
        path = f"{name}/model.plan"
        _fake_artifact_file(bundle, path, f"engine of {name}".encode())
        list_file(data, bundle, path)
        onnx = component["variants"][0]
        engine = {
            "name": precision,
            "format": "tensorrt",
            "precision": precision,
            "io_dtype": io_dtype,
            "path": path,
            "files": [path],
            "produced_by": {"tool": "TensorRT-RTX 1.2.0.54", "from": onnx["path"]},
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
        component["variants"] = [engine, onnx] if keep_onnx else [engine]
    write(bundle, data)


PACKAGE_FILES = ("Manifest.json", "Data/com.apple.CoreML/model.mlmodel", "Data/com.apple.CoreML/weights/weight.bin")


def as_coreml_bundle(bundle: Path, keep_onnx: bool = True) -> None:
    """The tiny ONNX bundle rewritten as the Core ML target writes it: an mlpackage folder per component, its
    variant first (named like the ONNX variant) and made of every file in the folder, the ONNX variant after it when
    kept."""
    data = read(bundle)
    data["target"] = "coreml"
    values = ShapeRange.static(1, 32, 32).symbol_values("opt", data["pipeline"]["vae_scale_factor"])
    for name, component in data["components"].items():
        spec = ComponentSpec.from_json(name, component)

        def coreml(tensor) -> dict[str, Any]:
            dtype = "int32" if tensor.dtype == "int64" else tensor.dtype
            return {"name": tensor.name, "dtype": dtype, "shape": list(tensor.concrete_shape(values)) or [1]}

        package = f"{name}/model.mlpackage"
        for inner in PACKAGE_FILES:
            _fake_artifact_file(bundle, f"{package}/{inner}", f"{name} {inner}".encode())
            list_file(data, bundle, f"{package}/{inner}")
        onnx = component["variants"][0]
        package_variant = {
            "name": onnx["name"],
            "format": "mlpackage",
            "precision": onnx["precision"],
            "io_dtype": onnx["io_dtype"],
            "path": package,
            "files": [f"{package}/{inner}" for inner in PACKAGE_FILES],
            "produced_by": {"tool": "coremltools 9.0 (torch.export)"},
            "coreml_inputs": [coreml(t) for t in spec.inputs],
            "coreml_outputs": [coreml(t) for t in spec.outputs],
            "minimum_deployment_target": "iOS16/macOS13",
            "shapes": {**ShapeRange.static(1, 32, 32).to_json(), "flexible": False},
        }
        component["variants"] = [package_variant, onnx] if keep_onnx else [package_variant]
    write(bundle, data)


@pytest.mark.parametrize("keep_onnx", [True, False])
def test_tensorrt_manifest_loads_and_its_engine_io_is_checked(bundle, keep_onnx) -> None:
    as_tensorrt_bundle(bundle, keep_onnx)
    manifest = load_manifest(bundle, verify="full")
    assert {fmt for c in manifest.components.values() for fmt in c.artifacts} == (
        {"onnx", "tensorrt"} if keep_onnx else {"tensorrt"}
    )
    original = read(bundle)
    engine = "components.unet.variants[0]"
    cases: list[tuple[Edit, str]] = [
        (lambda d: variant(d)["io"][0].update(dtype="float16"), f"{engine}.io[0]"),  # not its io_dtype
        (lambda d: variant(d)["io"].pop(), f"{engine}.io"),
        (lambda d: variant(d).update(vae_scale_factor=8), f"{engine}.vae_scale_factor"),
        (lambda d: variant(d).update(compute_capabilities=["ampere"]), f"{engine}.compute_capabilities[0]"),
        (lambda d: variant(d)["profiles"]["sample"].update(min=[4, 4, 8, 8]), f"{engine}.profiles.sample"),
        (lambda d: variant(d).pop("io"), f"{engine}.io"),
        (lambda d: variant(d).update(files=["unet/model.onnx"]), f"{engine}.files"),  # not the engine's path
    ]
    for change, field in cases:
        write(bundle, original)
        edit(bundle, change)
        rejected(bundle, field)


def test_an_fp16_engine_takes_and_gives_its_io_dtype(bundle) -> None:
    """The spec stays float32 (the model's logical I/O); the engine's I/O is its variant's io_dtype, float16."""
    as_tensorrt_bundle(bundle, precision="fp16")
    manifest = load_manifest(bundle)
    unet = manifest.components["unet"]
    engine, onnx = unet.variants
    assert (engine.format, engine.io_dtype, onnx.format, onnx.io_dtype) == ("tensorrt", "float16", "onnx", "float32")
    assert choose_variant(unet, "tensorrt", "fp16").artifact is engine
    assert choose_variant(unet, "onnx", "fp32").artifact is onnx
    assert {t.dtype for t in unet.spec.inputs} == {"float32"}
    assert {t.dtype for t in unet.resolved(engine).spec.inputs} == {"float16"}
    edit(bundle, lambda d: variant(d).update(io_dtype="float32"))  # but the engine's I/O is float16
    assert "float32" in rejected(bundle, "components.unet.variants[0].io[0]")


def test_coreml_manifest_loads_and_every_file_of_a_package_must_be_listed(bundle) -> None:
    as_coreml_bundle(bundle)
    manifest = load_manifest(bundle, verify="full")
    assert manifest.target == "coreml"
    package = "components.unet.variants[0]"
    (bundle / "unet" / "model.mlpackage" / "Data" / "extra.bin").write_bytes(b"not hashed")
    assert "extra.bin" in rejected(bundle, f"{package}.path")
    (bundle / "unet" / "model.mlpackage" / "Data" / "extra.bin").unlink()
    original = read(bundle)
    cases: list[tuple[Edit, str]] = [
        (lambda d: variant(d)["coreml_inputs"].pop(), f"{package}.coreml_inputs"),
        (lambda d: variant(d)["coreml_inputs"][0].update(dtype="int64"), f"{package}.coreml_inputs[0].dtype"),
        (lambda d: variant(d)["coreml_inputs"][0].update(bounds=[[1, 1]] * 3), f"{package}.coreml_inputs[0].bounds"),
        (
            lambda d: d.update(files=[f for f in d["files"] if not f["path"].startswith("unet/model.mlpackage/")]),
            f"{package}.files[0]",  # the package's files, no longer hashed
        ),
        (lambda d: variant(d).update(path="unet/model.mlmodel"), f"{package}.path"),
    ]
    for change, field in cases:
        write(bundle, original)
        edit(bundle, change)
        rejected(bundle, field)


def test_an_mlpackage_variant_lists_every_file_of_its_folder(bundle) -> None:
    """A file of the package that the manifest hashes but the variant leaves out: the variant is not what runs."""
    as_coreml_bundle(bundle)
    edit(bundle, lambda d: variant(d)["files"].remove("unet/model.mlpackage/Data/com.apple.CoreML/weights/weight.bin"))
    assert "must list every file of the folder" in rejected(bundle, "components.unet.variants[0].files")


def test_coreml_package_with_an_unlisted_symlink_is_rejected(bundle, tmp_path) -> None:
    as_coreml_bundle(bundle)
    os.symlink(tmp_path, bundle / "unet" / "model.mlpackage" / "Data" / "elsewhere")
    assert "elsewhere" in rejected(bundle, "components.unet.variants[0].path")


# -- format 2: variants ---------------------------------------------------------------------------------------------


def test_variant_names_are_unique_within_a_format(bundle) -> None:
    original = read(bundle)
    edit(bundle, lambda d: d["components"]["unet"]["variants"].append(copy.deepcopy(variant(d))))
    assert '"fp32"' in rejected(bundle, "components.unet.variants[1].name")
    write(bundle, original)
    as_tensorrt_bundle(bundle, keep_onnx=True)  # an engine named fp32 beside the ONNX variant fp32: two formats
    unet = load_manifest(bundle).components["unet"]
    assert [(v.format, v.name) for v in unet.variants] == [("tensorrt", "fp32"), ("onnx", "fp32")]
    assert choose_variant(unet, "onnx", "fp32").artifact.format == "onnx"
    assert choose_variant(unet, "tensorrt", "fp32").artifact.format == "tensorrt"


def test_every_file_of_a_variant_is_listed_in_files(bundle) -> None:
    _fake_artifact_file(bundle, "unet/model.onnx_data", b"external weights")  # on disk, but not hashed
    original = read(bundle)
    edit(bundle, lambda d: variant(d)["files"].append("unet/model.onnx_data"))
    assert "does not list" in rejected(bundle, "components.unet.variants[0].files[1]")
    write(bundle, original)
    edit(bundle, lambda d: variant(d)["files"].append("vae_decoder/model.onnx"))  # listed, another component's
    assert "unet/" in rejected(bundle, "components.unet.variants[0].files[1]")

    def hashed_external_data(data: dict[str, Any]) -> None:
        list_file(data, bundle, "unet/model.onnx_data")
        variant(data)["files"].append("unet/model.onnx_data")

    write(bundle, original)
    edit(bundle, hashed_external_data)
    assert load_manifest(bundle).components["unet"].variants[0].files == ("unet/model.onnx", "unet/model.onnx_data")


def test_the_spec_is_float32_and_each_variant_gives_its_io_dtype(bundle) -> None:
    original = read(bundle)
    edit(bundle, lambda d: variant(d).update(io_dtype="float16"))
    assert "fp32 variant" in rejected(bundle, "components.unet.variants[0].io_dtype")
    write(bundle, original)
    edit(bundle, lambda d: unet_input(d, "sample").update(dtype="float16"))  # format 1's fp16 spec
    assert "must be float32" in rejected(bundle, "components.unet.inputs[0].dtype")
    write(bundle, original)
    edit(bundle, lambda d: variant(d).update(precision="fp16", io_dtype="float16"))  # an fp16 ONNX variant
    unet = load_manifest(bundle).components["unet"]
    assert {t.dtype for t in unet.spec.inputs} == {"float32"}
    assert {t.dtype for t in unet.resolved(unet.variants[0]).spec.inputs} == {"float16"}


def test_choose_variant_picks_the_first_variant_or_names_what_exists(bundle) -> None:
    """Per component, a precision no variant has runs the closest more precise one (the float text encoder of an
    INT8 bundle); a forced INT8 that no component has is the pipeline's one-line error
    (tests/runtime/test_pipeline.py); a name that is not a variant choice is refused."""
    unet = load_manifest(bundle).components["unet"]
    (only,) = unet.variants
    assert unet.artifacts == {"onnx": only}  # format -> the preferred variant, read-only
    for precision in ("fp32", "auto", "int8", "fp16"):
        assert choose_variant(unet, "onnx", precision).artifact is only
    for not_a_variant in ("bf16", "int8-qdq"):
        with pytest.raises(UserError, match="pick one of auto, int8, fp16, fp32"):
            choose_variants({"unet": unet}, ["unet"], "onnx", not_a_variant, bundle)
    with pytest.raises(BundleError, match=r"no tensorrt variant in this bundle \(it has: onnx\)"):
        choose_variant(unet, "tensorrt", "auto")


def test_choose_and_resolve_among_several_variants(bundle) -> None:
    data = read(bundle)
    for name, precision, io_dtype in (("fp16", "fp16", "float16"), ("int8-qdq", "int8", "float32")):
        path = f"unet/model-{name}.onnx"
        shutil.copy(bundle / "unet" / "model.onnx", bundle / path)  # stands in for the converted graph
        list_file(data, bundle, path)
        variants = data["components"]["unet"]["variants"]
        variants.append({**variants[0], "name": name, "precision": precision, "io_dtype": io_dtype, "path": path})
        variants[-1]["files"] = [path]
    write(bundle, data)
    manifest = load_manifest(bundle)
    unet = manifest.components["unet"]
    fp32, fp16, int8 = unet.variants
    assert unet.artifacts == {"onnx": fp32}
    assert [choose_variant(unet, "onnx", p).artifact for p in ("auto", "fp32", "fp16", "int8")] == [
        fp32,
        fp32,
        fp16,
        int8,
    ]
    hashes = {entry.path: entry.sha256 for entry in manifest.files}
    resolved = unet.resolved(fp16, hashes)
    assert resolved.variants == (fp16,)
    assert resolved.variants[0].digests == (hashes["unet/model-fp16.onnx"],)
    assert {t.dtype for t in (*resolved.spec.inputs, *resolved.spec.outputs)} == {"float16"}
    assert {t.dtype for t in (*unet.spec.inputs, *unet.spec.outputs)} == {"float32"}  # the manifest's stays
    assert unet.resolved(int8).spec == unet.spec  # quantised graphs keep float32 I/O
    assert unet.resolved(fp32).variants[0].digests == ()  # no hashes given


# -- format 2: the declared conditioning ----------------------------------------------------------------------------


def _cfg_pipeline(data: dict[str, Any]) -> None:
    data["pipeline"].update(guidance="cfg", time_cond_proj_dim=None)
    for name in ("text_encoder", "unet"):
        data["components"][name]["batch_multiplier"] = 2


CONDITIONING_CASES: dict[str, tuple[Edit, str, str]] = {
    "unknown source": (
        _set("conditioning.unet_inputs.encoder_hidden_states", "clip_skip"),
        "conditioning.unet_inputs.encoder_hidden_states",
        "must be one of text_hidden_states",
    ),
    "tokenizer that does not exist": (
        _set("conditioning.text_encoders.0.tokenizer", "tokenizer_2"),
        "conditioning.text_encoders[0].tokenizer",
        "names no tokenizer",
    ),
    "guidance_embedding without time_cond_proj_dim": (_cfg_pipeline, "conditioning.unet_inputs", "guidance_embedding"),
    "no text_hidden_states": (
        lambda d: d["conditioning"]["unet_inputs"].pop("encoder_hidden_states"),
        "conditioning.unet_inputs",
        "text_hidden_states",
    ),
    "pooled_text without a pooled output": (
        lambda d: d["conditioning"]["unet_inputs"].update(text_embeds="pooled_text"),
        "conditioning.unet_inputs",
        "no text encoder declares a pooled output",
    ),
    "guidance_frequencies of the wrong length": (
        lambda d: d["conditioning"]["guidance_frequencies"].pop(),
        "conditioning.guidance_frequencies",
        "time_cond_proj_dim // 2 = 16",
    ),
    "a guidance frequency of 0": (
        _set("conditioning.guidance_frequencies.3", 0),
        "conditioning.guidance_frequencies[3]",
        "above 0",
    ),
    "an input the loop feeds": (
        lambda d: d["conditioning"]["unet_inputs"].update(timestep="guidance_embedding"),
        "conditioning.unet_inputs.timestep",
        "fed by the loop",
    ),
    "a component that is no text encoder": (
        _set("conditioning.text_encoders.0.component", "unet"),
        "conditioning.text_encoders[0].component",
        "not a text encoder",
    ),
    "a hidden state the encoder does not give": (
        _set("conditioning.text_encoders.0.hidden_state", "hidden_states"),
        "components.text_encoder.outputs",
        "hidden_states",
    ),
    "a pooled output the encoder does not give": (
        _set("conditioning.text_encoders.0.pooled", "text_embeds"),
        "components.text_encoder.outputs",
        "text_embeds",
    ),
    "empty_negative none": (_set("conditioning.empty_negative", "none"), "conditioning.empty_negative", "encode"),
    "no conditioning": (lambda d: d.pop("conditioning"), "conditioning", "missing"),
}


@pytest.mark.parametrize("case", list(CONDITIONING_CASES))
def test_the_conditioning_fits_the_tokenizers_pipeline_and_components(bundle, case) -> None:
    change, field, words = CONDITIONING_CASES[case]
    edit(bundle, change)
    assert words in rejected(bundle, field)


def test_the_exported_conditioning_is_sd_with_diffusers_frequencies(bundle) -> None:
    manifest = load_manifest(bundle)
    conditioning = manifest.conditioning
    assert dataclasses.replace(conditioning, guidance_frequencies=None) == Conditioning.of_sd(manifest.pipeline)
    assert len(conditioning.guidance_frequencies) == manifest.pipeline.time_cond_proj_dim // 2
    edit(bundle, lambda d: d["conditioning"]["text_encoders"][0].update(pooled="pooler_output"))  # declared, unused
    assert load_manifest(bundle).conditioning.text_encoders[0].pooled == "pooler_output"
    edit(bundle, _set("conditioning.guidance_frequencies", None))  # computed in numpy, as for format 1
    assert load_manifest(bundle).conditioning.guidance_frequencies is None


# -- format 2: image-to-image tables ---------------------------------------------------------------------------------


def _partial_table(key: str, source: str = "4", start: int = 2) -> Edit:
    """Add the table ``key`` as the tail of the ``source``-step table from ``start``: an image-to-image run that
    starts part way down the schedule (each value stays the function of its timestep)."""

    def change(data: dict[str, Any]) -> None:
        tables = data["scheduler"]["tables"]
        tables[key] = {column: values[start:] for column, values in tables[source].items()}

    return change


def test_a_steps_at_strength_table_is_an_image_to_image_table(bundle) -> None:
    original = read(bundle)
    edit(bundle, _partial_table("4@0.5"))
    manifest = load_manifest(bundle)
    table = manifest.scheduler.partial_tables[(4, 0.5)]
    assert list(table.timesteps) == original["scheduler"]["tables"]["4"]["timesteps"][2:]
    assert sorted(manifest.scheduler.tables) == list(range(1, 9))  # the full-strength tables stay "1".."N"
    assert strength_key(4, 0.5) == "4@0.5" and strength_key(4, 1.0) == "4"
    assert manifest.to_json()["scheduler"]["tables"]["4@0.5"] == read(bundle)["scheduler"]["tables"]["4@0.5"]
    for key in ("4@1.5", "4@0", "4@0.0", "4@1", "0@0.5", "4@.5"):
        write(bundle, original)
        edit(bundle, _partial_table(key))
        assert "STEPS@STRENGTH" in rejected(bundle, f'scheduler.tables["{key}"]')
    write(bundle, original)
    edit(bundle, _partial_table("4@0.5"))
    edit(bundle, lambda d: d["scheduler"]["tables"]["4@0.5"]["c_skip"].__setitem__(0, 0.5))
    rejected(bundle, 'scheduler.tables["4@0.5"].c_out[0]')  # held to the same LCM rules


def test_one_strength_has_one_table(bundle) -> None:
    edit(bundle, _partial_table("4@0.5"))
    edit(bundle, _partial_table("4@0.50", start=1))
    with pytest.raises(BundleError, match=r"4@0\.50?"):
        load_manifest(bundle)


# -- format 1 ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("form", ["onnx", "onnx with an fp16 unet", "tensorrt", "tensorrt beside onnx", "coreml"])
def test_a_format_1_manifest_loads_as_the_same_bundle(bundle, form) -> None:
    if form == "onnx with an fp16 unet":
        edit(bundle, lambda d: variant(d).update(name="fp16", precision="fp16", io_dtype="float16"))
    elif form == "tensorrt":
        as_tensorrt_bundle(bundle, keep_onnx=False)
    elif form == "tensorrt beside onnx":  # two variants named fp32, of two formats
        as_tensorrt_bundle(bundle, keep_onnx=True)
    elif form == "coreml":
        as_coreml_bundle(bundle, keep_onnx=False)
    current = load_manifest(bundle)
    write(bundle, as_format_1(read(bundle)))
    upgraded = load_manifest(bundle)
    assert (upgraded.format_version, current.format_version) == (1, 2)
    assert list(upgraded.components) == list(current.components)
    for name, component in current.components.items():
        old = upgraded.components[name]
        assert old.spec == component.spec  # float32 again, each variant's dtype in its io_dtype
        assert old.validation == component.validation
        assert [dataclasses.replace(v, produced_by={}) for v in old.variants] == [
            dataclasses.replace(v, produced_by={}) for v in component.variants
        ]
        assert all("format 1" in v.produced_by["tool"] for v in old.variants)
    assert upgraded.conditioning == dataclasses.replace(current.conditioning, guidance_frequencies=None)
    # Format 1 had no image-to-image tables: the rest of the scheduler is the same.
    assert upgraded.scheduler == dataclasses.replace(current.scheduler, partial_tables={})
    for part in ("target", "precision", "pipeline", "tokenizers", "files", "provenance", "loras"):
        assert getattr(upgraded, part) == getattr(current, part), part
    assert upgraded.to_json()["format_version"] == 2  # written back as the current format


FORMAT_1_FINDINGS: dict[str, tuple[Edit, str]] = {
    "artifacts as a list": (
        lambda d: d["components"]["unet"].update(artifacts=list(d["components"]["unet"]["artifacts"].values())),
        "components.unet.variants",
    ),
    "artifact outside the bundle": (
        _set("components.unet.artifacts.onnx.path", "../other/unet/model.onnx"),
        "components.unet.variants[0].path",
    ),
    "dtype float99": (_set("components.unet.inputs.0.dtype", "float99"), "components.unet.inputs[0].dtype"),
    "files as an object": (lambda d: d.update(files={}), "files"),
    "pipeline as a list": (lambda d: d.update(pipeline=[]), "pipeline"),
}


@pytest.mark.parametrize("finding", list(FORMAT_1_FINDINGS))
def test_a_malformed_format_1_manifest_is_one_line_naming_the_field(bundle, finding) -> None:
    """Malformed parts are left by the upgrade for the format-2 validation to name (at their format-2 place)."""
    change, field = FORMAT_1_FINDINGS[finding]
    data = as_format_1(read(bundle))
    change(data)
    write(bundle, data)
    rejected(bundle, field)


@pytest.mark.parametrize(
    "change",
    [
        lambda d: d.update(files=None),
        lambda d: d.update(files=0),
        lambda d: d["components"]["unet"].update(inputs={}),
        lambda d: d["components"]["unet"].update(outputs="out_sample"),
    ],
    ids=["files null", "files 0", "inputs an object", "outputs a string"],
)
def test_a_format_1_manifest_of_the_wrong_shape_is_one_line(bundle, change) -> None:
    data = as_format_1(read(bundle))
    change(data)
    write(bundle, data)
    with pytest.raises(BundleError):
        load_manifest(bundle)


def test_another_format_version_names_the_ones_this_runtime_reads(bundle) -> None:
    edit(bundle, _set("format_version", 3))
    with pytest.raises(BundleError) as caught:
        load_manifest(bundle)
    message = str(caught.value)
    assert "\n" not in message
    assert f"BUNDLE '{bundle}' has manifest format version 3; this runtime reads versions 1 and 2: " in message
