"""The runtime loop: bundles of the previous format, variant selection, the step observer, declared conditioning."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from lcm_export.errors import BundleError, UserError
from lcm_export.runtime import Pipeline
from lcm_export.runtime.manifest import FORMAT_VERSION, Artifact, load_manifest
from lcm_export.runtime.pipeline import StepEvent
from lcm_export.runtime.variants import choose_variant
from tests.helpers import FIXTURES, random_inputs


@pytest.fixture(scope="module")
def runtime(tiny_lcm_bundle) -> Pipeline:
    return Pipeline.load(tiny_lcm_bundle, backend="onnxruntime", precision="fp32")


def test_a_format_1_bundle_loads_and_gives_the_image_it_gave_before(tiny_lcm_bundle, tmp_path) -> None:
    """tests/fixtures holds the manifest the previous exporter (format 1) wrote for the built-in tiny LCM and the
    image the previous runtime made from it. The exporter is deterministic, so today's files are that bundle's
    files: with the old manifest in place, the bundle must pass its hash check and give the same image."""
    old = json.loads((FIXTURES / "manifest-v1-tiny-lcm.json").read_text())
    assert old["format_version"] == 1 and "artifacts" in old["components"]["unet"]
    # Since format 1 the U-Net takes one timestep per row ((batch,): the frame loop's step batching), which changed
    # unet/model.onnx alone: the old U-Net entry gets today's file and timestep shape; every other file and field is
    # as format 1 wrote it (a format-1 bundle with its scalar timestep still loads: the runtime reads both).
    today = json.loads((tiny_lcm_bundle / "manifest.json").read_text())
    unet_file = next(entry for entry in today["files"] if entry["path"] == "unet/model.onnx")
    old["files"] = [unet_file if entry["path"] == "unet/model.onnx" else entry for entry in old["files"]]
    timestep = next(tensor for tensor in old["components"]["unet"]["inputs"] if tensor["name"] == "timestep")
    assert timestep["shape"] == []
    timestep["shape"] = ["batch"]
    bundle = shutil.copytree(tiny_lcm_bundle, tmp_path / "format-1")
    (bundle / "manifest.json").write_text(json.dumps(old))

    manifest = load_manifest(bundle, verify="full")
    assert manifest.format_version == 1
    assert [v.name for v in manifest.components["unet"].variants] == ["fp32"]
    assert manifest.conditioning.guidance_frequencies is None  # format 1: computed in numpy, as then
    pipe = Pipeline.load(bundle, backend="onnxruntime", precision="fp32")
    # The fixture image was made with seed=7 when seeds meant numpy's generator: its draws, passed explicitly.
    rng = np.random.default_rng(7)
    latents = rng.standard_normal((1, 4, 16, 16), dtype=np.float32)
    noise = [rng.standard_normal((1, 4, 16, 16), dtype=np.float32) for _ in range(3)]
    image = pipe("a photo of a cat", latents=latents, noise=noise, num_inference_steps=4, guidance_scale=8.5).images
    expected = np.load(FIXTURES / "image-v1-tiny-lcm.npy")
    assert image.shape == expected.shape
    assert np.abs(image - expected).max() <= 1e-6, np.abs(image - expected).max()

    # Written back, it is a format-2 manifest describing the same bundle.
    rewritten = manifest.to_json()
    assert rewritten["format_version"] == FORMAT_VERSION
    assert rewritten["components"]["unet"]["variants"][0]["files"] == ["unet/model.onnx"]


def test_observer_sees_every_unet_call(runtime) -> None:
    latents, noise = random_inputs((1, 4, 16, 16), steps=4, seed=2)
    events: list[StepEvent] = []
    observed = runtime("a cat", latents=latents, noise=noise, observer=events.append).images
    plain = runtime("a cat", latents=latents, noise=noise).images
    assert np.array_equal(observed, plain)  # observing changes nothing
    table = runtime.denoiser.scheduler.table(4)
    assert [event.timestep for event in events] == list(table.timesteps)
    assert [event.index for event in events] == [0, 1, 2, 3]
    first = events[0]
    assert set(first.feeds) == {"sample", "timestep", "encoder_hidden_states", "timestep_cond"}
    assert np.array_equal(first.feeds["sample"], latents)
    assert first.outputs["out_sample"].shape == latents.shape
    # The observed U-Net output, stepped by the scheduler, gives the next step's input.
    stepped, _ = runtime.denoiser.scheduler.step(table, 0, first.outputs["out_sample"], first.latents, noise[0])
    assert np.allclose(stepped, events[1].feeds["sample"])


def test_variant_selection_and_report(tiny_lcm_bundle, runtime) -> None:
    assert {v.name for v in runtime.variants.values()} == {"fp32"}
    assert "unet fp32" in runtime.variant_summary()
    with pytest.raises(UserError, match=r"has no int8 variant \(it has fp32\)"):
        Pipeline.load(tiny_lcm_bundle, backend="onnxruntime", variant="int8")
    unet = load_manifest(tiny_lcm_bundle).components["unet"]
    # A second variant beside the first: chosen by precision, the first stays the default.
    extra = Artifact("onnx", "unet/model.onnx", "int8", name="int8-qdq")
    both = type(unet)(unet.spec, (*unet.variants, extra), unet.validation)
    assert choose_variant(both, "onnx", "int8").name == "int8-qdq"
    assert choose_variant(both, "onnx", "auto").name == "fp32"
    assert choose_variant(both, "onnx", "fp32").name == "fp32"
    assert both.resolved(extra).spec.inputs[0].dtype == "float32"  # quantised graphs keep float I/O


def test_the_loop_builds_feeds_from_the_declared_conditioning(tiny_lcm_bundle, tmp_path, runtime) -> None:
    """Without timestep_cond in the declaration, the bundle is refused (the U-Net takes it): the loop has no
    hidden knowledge of which inputs an SD U-Net has."""
    bundle = shutil.copytree(tiny_lcm_bundle, tmp_path / "bundle")
    manifest = json.loads((bundle / "manifest.json").read_text())
    del manifest["conditioning"]["unet_inputs"]["timestep_cond"]
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="guidance_embedding"):
        load_manifest(bundle)


def test_guidance_embedding_uses_the_exported_frequencies(runtime) -> None:
    """diffusers' float32 frequencies are in the manifest: the runtime's embedding is diffusers' own."""
    import torch
    from diffusers import LatentConsistencyModelPipeline

    frequencies = runtime.manifest.conditioning.guidance_frequencies
    assert frequencies is not None and len(frequencies) == runtime.manifest.pipeline.time_cond_proj_dim // 2
    seen: list[StepEvent] = []
    runtime("a cat", seed=0, num_inference_steps=1, guidance_scale=8.5, observer=seen.append)
    embedding = LatentConsistencyModelPipeline.get_guidance_scale_embedding(
        None, torch.tensor([8.5 - 1]), embedding_dim=runtime.manifest.pipeline.time_cond_proj_dim
    ).numpy()
    assert np.abs(seen[0].feeds["timestep_cond"] - embedding).max() <= 1e-6


def test_image_to_image_tables_are_keyed_by_strength(runtime) -> None:
    """A distilled LCM's img2img table at strength 0.5 is diffusers' set_timesteps(4, strength=0.5) (NOTES: 499,
    379, 259, 139), beside the text-to-image one; strengths off the exported grid are refused, not approximated."""
    from diffusers import LCMScheduler

    scheduler = LCMScheduler.from_config(runtime.manifest.scheduler.config)
    scheduler.set_timesteps(4, strength=0.5)
    assert list(runtime.denoiser.scheduler.table(4, strength=0.5).timesteps) == scheduler.timesteps.tolist()
    assert list(runtime.denoiser.scheduler.table(4).timesteps) != scheduler.timesteps.tolist()
    with pytest.raises(UserError, match=r"strength=0\.55 with num_inference_steps=4"):
        runtime.denoiser.scheduler.table(4, strength=0.55)
