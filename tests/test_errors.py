"""Bad input: one line on stderr naming the input and what to do, exit code 1, no traceback, nothing left behind."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from lcm_export.errors import ExportError
from tests.helpers import assert_one_line_error, export_cli, no_leftovers, run_module


def lcm_run(*args: str) -> subprocess.CompletedProcess:
    return run_module("lcm_export.runtime.cli", *args, "--quiet", "--backend", "onnxruntime")


@pytest.fixture
def bundle_copy(tiny_lcm_bundle, tmp_path) -> Path:
    copy = tmp_path / "bundle"
    shutil.copytree(tiny_lcm_bundle, copy)
    return copy


def test_missing_model_folder(tmp_path) -> None:
    output = tmp_path / "out"
    assert_one_line_error(export_cli(tmp_path / "nope", "--output", output), "nope", "does not exist")
    no_leftovers(output)


def test_folder_is_not_a_pipeline(tmp_path) -> None:
    (tmp_path / "empty").mkdir()
    output = tmp_path / "out"
    assert_one_line_error(export_cli(tmp_path / "empty", "--output", output), "model_index.json")
    no_leftovers(output)


def test_pipeline_that_is_not_an_lcm(tmp_path) -> None:
    from lcm_export.exporter.tiny import TinyPipelineConfig, build_tiny_pipeline

    model = build_tiny_pipeline(tmp_path / "sd", TinyPipelineConfig(kind="sd"))
    output = tmp_path / "out"
    assert_one_line_error(export_cli(model, "--output", output), "not an LCM", "--lora")
    no_leftovers(output)


def test_unknown_target_and_precision(tiny_lcm_dir, tmp_path) -> None:
    output = tmp_path / "out"
    assert_one_line_error(export_cli(tiny_lcm_dir, "--output", output, "--target", "tflite"), "--target tflite")
    assert_one_line_error(export_cli(tiny_lcm_dir, "--output", output, "--precision", "int4"), "--precision int4")
    no_leftovers(output)


def test_existing_output_needs_overwrite(tiny_lcm_dir, tmp_path) -> None:
    output = tmp_path / "out"
    output.mkdir()
    (output / "keep.txt").write_text("mine")
    assert_one_line_error(export_cli(tiny_lcm_dir, "--output", output), "already exists", "--overwrite")
    assert (output / "keep.txt").read_text() == "mine"


def test_failed_export_leaves_nothing(tiny_lcm_dir, tmp_path, monkeypatch) -> None:
    from lcm_export.exporter import bundle

    def fail(*args, **kwargs):
        raise ExportError("unet: simulated failure")

    monkeypatch.setattr(bundle, "scheduler_info", fail)  # the last step before the manifest is written
    output = tmp_path / "out"
    with pytest.raises(ExportError, match="simulated"):
        bundle.export_bundle(bundle.ExportConfig(model=str(tiny_lcm_dir), output=output, quiet=True))
    no_leftovers(output)


def test_overwrite_replaces_a_bundle_only_when_the_new_one_is_complete(
    tiny_lcm_dir, tiny_lcm_bundle, tmp_path, monkeypatch
) -> None:
    from lcm_export.exporter import bundle

    output = shutil.copytree(tiny_lcm_bundle, tmp_path / "out")
    before = {p.name: p.stat().st_mtime_ns for p in output.rglob("*")}
    monkeypatch.setattr(bundle, "scheduler_info", lambda *a, **k: (_ for _ in ()).throw(ExportError("boom")))
    with pytest.raises(ExportError, match="boom"):
        bundle.export_bundle(bundle.ExportConfig(model=str(tiny_lcm_dir), output=output, quiet=True, overwrite=True))
    assert {p.name: p.stat().st_mtime_ns for p in output.rglob("*")} == before  # untouched by the failed export
    no_leftovers(tmp_path / "elsewhere")  # and no staging folder beside it
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]


def test_overwrite_replaces_a_bundle_and_an_empty_folder(tiny_lcm_dir, tiny_lcm_bundle, tmp_path) -> None:
    from lcm_export.exporter import bundle

    old = shutil.copytree(tiny_lcm_bundle, tmp_path / "old")
    (old / "stale.txt").write_text("from an older export")
    empty = tmp_path / "empty"
    empty.mkdir()
    for output in (old, empty):
        bundle.export_bundle(bundle.ExportConfig(model=str(tiny_lcm_dir), output=output, quiet=True, overwrite=True))
        assert (output / "manifest.json").is_file()
    assert not (old / "stale.txt").exists()


def test_builtin_model_leaves_no_temporary_folder(tmp_path, monkeypatch) -> None:
    import tempfile

    from lcm_export.exporter import bundle

    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    bundle.export_bundle(bundle.ExportConfig(model="builtin:tiny-lcm", output=tmp_path / "out", quiet=True))
    assert (tmp_path / "out" / "manifest.json").is_file()
    assert list(scratch.iterdir()) == []


def test_default_guidance_recorded_per_family(tiny_lcm_bundle, tiny_cfg_bundle) -> None:
    from lcm_export.runtime.manifest import load_manifest

    assert load_manifest(tiny_lcm_bundle).pipeline.default_guidance_scale == 8.5  # diffusers' LCM pipeline default
    assert load_manifest(tiny_cfg_bundle).pipeline.default_guidance_scale == 1.0  # LCM-LoRA: no CFG by default


def test_default_guidance_is_the_bundles(tiny_lcm_bundle) -> None:
    from lcm_export.runtime import Pipeline

    pipe = Pipeline.load(tiny_lcm_bundle, backend="onnxruntime")
    default = pipe("a cat", seed=3, num_inference_steps=2).images
    assert np.array_equal(default, pipe("a cat", seed=3, num_inference_steps=2, guidance_scale=8.5).images)
    assert not np.array_equal(default, pipe("a cat", seed=3, num_inference_steps=2, guidance_scale=8.0).images)


def test_non_finite_stage_output_is_an_error_naming_the_stage(tiny_lcm_bundle) -> None:
    from lcm_export.errors import NonFiniteError, UserError
    from lcm_export.runtime import Pipeline

    pipe = Pipeline.load(tiny_lcm_bundle, backend="onnxruntime")
    for stage, pattern in (("vae_decoder", "the VAE decoder"), ("unet", r"the U-Net at step 1 \(timestep 999\)")):
        session = pipe.denoiser.sessions[stage]
        original = session.run

        def poisoned(feeds, original=original):
            outputs = original(feeds)
            return {name: np.full_like(value, np.nan) for name, value in outputs.items()}

        session.run = poisoned
        try:
            with pytest.raises(NonFiniteError, match=pattern):
                pipe("a cat", seed=0)
        finally:
            session.run = original
    with pytest.raises(UserError, match="latents contain NaN"):
        pipe("a cat", latents=np.full((1, 4, 8, 8), np.nan, np.float32))


def test_height_the_vae_cannot_take(tiny_lcm_bundle, tmp_path) -> None:
    line = assert_one_line_error(
        lcm_run(tiny_lcm_bundle, "a cat", "--height", "30", "--output", tmp_path / "x.png"),
        "height=30",
        "multiple of 4",
    )
    assert "28" in line and "32" in line
    assert not (tmp_path / "x.png").exists()


def test_modified_byte_gives_hash_error(bundle_copy, tmp_path) -> None:
    unet = bundle_copy / "unet" / "model.onnx"
    data = bytearray(unet.read_bytes())
    data[len(data) // 2] ^= 0x01
    unet.write_bytes(bytes(data))
    assert_one_line_error(lcm_run(bundle_copy, "a cat", "--output", tmp_path / "x.png"), "unet/model.onnx", "sha256")
    assert not (tmp_path / "x.png").exists()


def test_modified_byte_detected_after_a_cached_verification(bundle_copy, tmp_path) -> None:
    from lcm_export.errors import BundleError
    from lcm_export.runtime.manifest import load_manifest

    load_manifest(bundle_copy)  # hashes and remembers every file
    vae = bundle_copy / "vae_decoder" / "model.onnx"
    data = bytearray(vae.read_bytes())
    data[-10] ^= 0xFF
    vae.write_bytes(bytes(data))
    with pytest.raises(BundleError, match=r"vae_decoder/model\.onnx"):
        load_manifest(bundle_copy)


def test_missing_bundle_file(bundle_copy, tmp_path) -> None:
    (bundle_copy / "tokenizer" / "tokenizer.json").unlink()
    assert_one_line_error(
        lcm_run(bundle_copy, "a cat", "--output", tmp_path / "x.png"), "tokenizer/tokenizer.json", "missing"
    )


def test_other_format_version(bundle_copy, tmp_path) -> None:
    manifest = json.loads((bundle_copy / "manifest.json").read_text())
    manifest["format_version"] = 99
    (bundle_copy / "manifest.json").write_text(json.dumps(manifest))
    assert_one_line_error(lcm_run(bundle_copy, "a cat", "--output", tmp_path / "x.png"), "format version 99")


def test_not_a_bundle(tmp_path) -> None:
    (tmp_path / "folder").mkdir()
    assert_one_line_error(lcm_run(tmp_path / "folder", "a cat", "--output", tmp_path / "x.png"), "no manifest.json")
    assert_one_line_error(lcm_run(tmp_path / "nothing", "a cat", "--output", tmp_path / "x.png"), "not a folder")


def test_steps_outside_the_bundle_schedules(tiny_lcm_bundle, tmp_path) -> None:
    assert_one_line_error(
        lcm_run(tiny_lcm_bundle, "a cat", "--steps", "9", "--output", tmp_path / "x.png"), "num_inference_steps=9"
    )


def test_wrong_latents_and_noise_shapes(tiny_lcm_bundle) -> None:
    import numpy as np

    from lcm_export.errors import UserError
    from lcm_export.runtime import Pipeline

    pipe = Pipeline.load(tiny_lcm_bundle, backend="onnxruntime")
    with pytest.raises(UserError, match="latents have shape"):
        pipe("a cat", latents=np.zeros((2, 4, 8, 8), np.float32))
    with pytest.raises(UserError, match="noise must be 3 arrays"):
        pipe("a cat", latents=np.zeros((1, 4, 8, 8), np.float32), noise=[np.zeros((1, 4, 8, 8), np.float32)])


def test_hub_id_without_network(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # what a machine without network sees, without waiting on DNS
    output = tmp_path / "out"
    assert_one_line_error(export_cli("nobody/no-such-lcm", "--output", output), "nobody/no-such-lcm", "hub")
    no_leftovers(output)


def test_the_unrelated_lcm_export_package_is_named(tmp_path) -> None:
    """The registry's `lcm-export` (an LCM log exporter) installs a module `lcm_export` too: both commands stop."""
    import os

    site = tmp_path / "site"
    info = site / "lcm_export-1.0.1.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: lcm-export\nVersion: 1.0.1\n"
        "Summary: Exports lcm log files to Matlab .mat and Python pickle .pkl files.\n"
    )
    environment = {**os.environ, "PYTHONPATH": str(site)}
    for module in ("lcm_export.runtime.cli", "lcm_export.exporter.cli"):
        result = subprocess.run(
            [sys.executable, "-m", module, str(tmp_path), "a cat", "--output", str(tmp_path / "x.png")],
            capture_output=True,
            text=True,
            env=environment,
            timeout=120,
        )
        assert_one_line_error(result, "'lcm-export' 1.0.1", "Exports lcm log files", "pip uninstall lcm-export")
