"""``lcm-export --controlnet``: ControlNets that do not fit the model are one line, before anything is written; the
commands end to end (``lcm-export --controlnet CN:SCALE``, ``lcm-run --control-image`` / ``--control-scale`` /
``--control-preprocess canny``); a bundle without ControlNet keeps today's U-Net."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from lcm_export.exporter.tiny import build_controlnet
from lcm_export.runtime.manifest import load_manifest
from tests.helpers import assert_one_line_error, export, export_cli, make_image, no_leftovers, run_module


def _model_with(tiny_lcm_dir: Path, folder: Path, **unet_changes) -> Path:
    """Configs of the tiny LCM with the U-Net's changed: enough for build_controlnet to make a misfit."""
    for name in ("unet", "vae"):
        (folder / name).mkdir(parents=True)
        config = json.loads((tiny_lcm_dir / name / "config.json").read_text())
        if name == "unet":
            config.update(unet_changes)
        (folder / name / "config.json").write_text(json.dumps(config))
    return folder


@pytest.mark.parametrize("misfit", ["sdxl", "cross-attention"])
def test_a_controlnet_that_does_not_fit_is_refused(misfit, tiny_lcm_dir, sdxl_lcm_dir, tmp_path) -> None:
    from lcm_export.errors import ExportError
    from lcm_export.exporter.controlnet import ControlNetSource

    if misfit == "sdxl":
        controlnet = build_controlnet(tmp_path / "cn", sdxl_lcm_dir)
        problem = "is a ControlNet for SDXL, but the model is SD 1.x/2.x: pass one made for it"
    else:
        configs = _model_with(tiny_lcm_dir, tmp_path / "other", cross_attention_dim=48)
        controlnet = build_controlnet(tmp_path / "cn", configs)
        problem = "has cross-attention size 48, the model's U-Net 32: pass a ControlNet made for this model family"
    output = tmp_path / "out"
    with pytest.raises(ExportError) as raised:
        export(tiny_lcm_dir, output, controlnets=(ControlNetSource(str(controlnet)),))
    assert str(raised.value) == f"--controlnet '{controlnet}' {problem}"
    no_leftovers(output)


def test_a_folder_that_is_no_controlnet_is_one_line(tiny_lcm_dir, tmp_path) -> None:
    output = tmp_path / "out"
    result = export_cli(tiny_lcm_dir, "--controlnet", tiny_lcm_dir / "unet", "--output", output)
    needle = "is a 'UNet2DConditionModel', not a ControlNetModel: pass a diffusers ControlNet folder"
    assert_one_line_error(result, f"--controlnet '{tiny_lcm_dir / 'unet'}' {needle}")
    no_leftovers(output)


def test_controlnet_commands_end_to_end(tiny_lcm_dir, tiny_lcm_bundle, tmp_path) -> None:
    from PIL import Image

    controlnet = build_controlnet(tmp_path / "cn", tiny_lcm_dir, seed=3)
    bundle = tmp_path / "bundle"
    result = export_cli(tiny_lcm_dir, "--controlnet", f"{controlnet}:0.7", "--output", bundle, "--no-vae-encoder")
    assert result.returncode == 0, result.stderr[-2000:]
    manifest = load_manifest(bundle)
    jsonschema = pytest.importorskip("jsonschema")
    schema = json.loads((Path(__file__).parents[2] / "docs" / "manifest.schema.json").read_text())
    jsonschema.validate(json.loads((bundle / "manifest.json").read_text()), schema)
    assert manifest.controlnet.models[0].conditioning_scale == pytest.approx(0.7)
    assert manifest.controlnet.residual_inputs[-1] == "mid_block_residual"
    assert set(manifest.controlnet.residual_inputs) <= set(manifest.components["unet"].spec.input_names)
    # A bundle without ControlNet keeps the plain U-Net (what optimum's pipelines feed).
    plain = load_manifest(tiny_lcm_bundle)
    assert plain.controlnet is None
    assert plain.components["unet"].spec.input_names == ["sample", "timestep", "encoder_hidden_states", "timestep_cond"]
    control = tmp_path / "control.png"
    Image.fromarray((make_image(32, 48, 2) * 255).astype(np.uint8)).save(control)
    outputs = {}
    for label, extra in {"default": [], "scaled": ["--control-scale", "0.0"]}.items():
        outputs[label] = tmp_path / f"{label}.png"
        args = ["--control-image", control, "--seed", "3", "--output", outputs[label], "--backend", "onnxruntime"]
        result = run_module("lcm_export.runtime.cli", bundle, "a cat", *args, *extra)
        assert result.returncode == 0, result.stderr[-2000:]
    images = {label: np.asarray(Image.open(path)) for label, path in outputs.items()}
    assert images["default"].shape == (32, 48, 3)  # the control image's size
    plain_run = run_module("lcm_export.runtime.cli", bundle, "a cat", "--seed", "3", "--width", "48", "--height", "32",
                           "--output", tmp_path / "plain.png", "--backend", "onnxruntime")  # fmt: skip
    assert plain_run.returncode == 0, plain_run.stderr[-2000:]
    no_control = np.asarray(Image.open(tmp_path / "plain.png"))
    assert np.array_equal(images["scaled"], no_control)  # scale 0: the ControlNet adds nothing
    assert np.abs(images["default"].astype(int) - no_control).max() > 2


def test_canny_preprocessing() -> None:
    cv2 = pytest.importorskip("cv2")
    from lcm_export.runtime.control import canny_edges

    image = make_image(32, 32, 4)
    edges = canny_edges(image)
    expected = cv2.Canny(np.ascontiguousarray((image * 255).round().astype(np.uint8)), 100, 200)
    assert edges.shape == (32, 32, 3)
    assert np.array_equal(edges[:, :, 0] * 255, expected.astype(np.float32))
    assert 0 < edges.mean() < 1  # some edges, not all
