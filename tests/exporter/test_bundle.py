"""The bundle: optimum-style layout, a complete manifest, LCM tables from diffusers, the real CLIP tokenizer."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest

from lcm_export.runtime.manifest import FORMAT_VERSION, load_manifest, sha256_file
from lcm_export.runtime.tokenizer import PromptTokenizer
from tests.helpers import export, random_inputs

OPTIMUM_IO = {
    "text_encoder": (["input_ids"], ["last_hidden_state", "pooler_output"]),
    "unet": (["sample", "timestep", "encoder_hidden_states", "timestep_cond"], ["out_sample"]),
    "vae_decoder": (["latent_sample"], ["sample"]),
    "vae_encoder": (["sample"], ["latent_parameters"]),
}


def test_layout_follows_optimum(tiny_lcm_bundle) -> None:
    for name, (inputs, outputs) in OPTIMUM_IO.items():
        model = onnx.load(str(tiny_lcm_bundle / name / "model.onnx"), load_external_data=False)
        assert [i.name for i in model.graph.input] == inputs
        assert [o.name for o in model.graph.output] == outputs
        assert (tiny_lcm_bundle / name / "config.json").is_file()
    index = json.loads((tiny_lcm_bundle / "model_index.json").read_text())
    assert index["scheduler"] == ["diffusers", "LCMScheduler"]
    assert {"text_encoder", "unet", "vae_decoder", "tokenizer"} <= set(index)
    scheduler = json.loads((tiny_lcm_bundle / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler["_class_name"] == "LCMScheduler"
    assert (tiny_lcm_bundle / "tokenizer" / "tokenizer.json").is_file()


def test_manifest_is_complete(tiny_lcm_bundle) -> None:
    manifest = load_manifest(tiny_lcm_bundle, verify="full")
    data = json.loads((tiny_lcm_bundle / "manifest.json").read_text())
    assert data["format_version"] == FORMAT_VERSION
    assert manifest.target == "onnx" and manifest.precision == "fp32"
    assert manifest.pipeline.vae_scale_factor == 2 and manifest.pipeline.vae_scaling_factor == pytest.approx(0.18215)
    assert manifest.pipeline.guidance == "embedding" and manifest.pipeline.time_cond_proj_dim == 32
    assert {"torch", "diffusers", "onnx"} <= set(manifest.provenance["versions"])
    listed = {entry.path: entry for entry in manifest.files}
    on_disk = {p.relative_to(tiny_lcm_bundle).as_posix() for p in tiny_lcm_bundle.rglob("*") if p.is_file()}
    assert on_disk - {"manifest.json"} == set(listed)
    for path, entry in listed.items():
        assert entry.sha256 == sha256_file(tiny_lcm_bundle / path)
        assert entry.size == (tiny_lcm_bundle / path).stat().st_size
    unet = manifest.components["unet"]
    assert unet.spec.inputs[0].shape == ("batch", 4, "latent_height", "latent_width")
    assert unet.validation["max_abs_error"]["out_sample"] < 1e-4
    for component in manifest.components.values():
        assert component.validation["max_abs_error"], component.spec.name


@pytest.mark.parametrize("config", [{}, {"original_inference_steps": 30}, {"original_inference_steps": 100}])
def test_schedules_equal_diffusers(config) -> None:
    from diffusers import LCMScheduler

    from lcm_export.exporter.schedule import scheduler_info

    info = scheduler_info(dict(LCMScheduler(**config).config), max_steps=8)
    reference = LCMScheduler(**config)
    for steps, table in info.tables.items():
        reference.set_timesteps(steps)
        assert list(table.timesteps) == reference.timesteps.tolist()
        for index, t in enumerate(reference.timesteps):
            c_skip, c_out = reference.get_scalings_for_boundary_condition_discrete(t)
            assert table.c_skip[index] == pytest.approx(float(c_skip), rel=1e-6)
            assert table.c_out[index] == pytest.approx(float(c_out), rel=1e-6)
            assert table.sqrt_alpha_prod[index] ** 2 == pytest.approx(float(reference.alphas_cumprod[t]), rel=1e-5)
    if not config:
        assert list(info.tables[4].timesteps) == [999, 759, 499, 259]


def test_tokenizer_ids_equal_transformers(tiny_lcm_bundle, tiny_lcm_dir) -> None:
    from transformers import CLIPTokenizer

    reference = CLIPTokenizer.from_pretrained(str(tiny_lcm_dir / "tokenizer"))
    manifest = load_manifest(tiny_lcm_bundle)
    tokenizer = PromptTokenizer(tiny_lcm_bundle, manifest.tokenizers[0])
    prompts = [
        "a photo of an astronaut riding a horse on mars",
        "",
        "Café, WORLD!!  tabs\tand\nnewlines 1234 ",
        "a very long prompt " * 30,
        "émojis 🐱 and ünïcödé",
    ]
    expected = reference(prompts, padding="max_length", max_length=77, truncation=True).input_ids
    ids = tokenizer(prompts)
    assert ids.shape == (len(prompts), 77) and ids.dtype == np.int64
    assert ids.tolist() == expected
    assert ids[0, 0] == 49406 and ids[1, 1] == 49407  # real CLIP BOS/EOS, EOS-padded


def test_large_weights_go_to_external_data(tiny_lcm_dir, tiny_lcm_bundle, tmp_path, monkeypatch) -> None:
    """Files over protobuf's 2 GB limit keep weights in model.onnx_data; forced here with a zero threshold."""
    from lcm_export.exporter import onnx_export
    from lcm_export.runtime import Pipeline

    monkeypatch.setattr(onnx_export, "EXTERNAL_DATA_THRESHOLD", 0)
    bundle = export(tiny_lcm_dir, tmp_path / "external", components=("text_encoder", "unet", "vae_decoder"))
    unet_dir = bundle / "unet"
    assert (unet_dir / "model.onnx_data").stat().st_size > 10 * (unet_dir / "model.onnx").stat().st_size
    manifest = load_manifest(bundle, verify="full")
    assert "unet/model.onnx_data" in {entry.path for entry in manifest.files}
    assert "vae_encoder" not in manifest.components
    latents, noise = random_inputs((1, 4, 16, 16), steps=4)
    image = Pipeline.load(bundle, backend="onnxruntime")("a cat", latents=latents, noise=noise).images
    reference = Pipeline.load(tiny_lcm_bundle, backend="onnxruntime")("a cat", latents=latents, noise=noise).images
    assert image.shape == (1, 32, 32, 3) and image.std() > 0.01
    assert np.abs(image - reference).max() < 1e-5  # same weights, only stored differently
