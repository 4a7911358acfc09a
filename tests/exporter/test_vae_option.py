"""``--vae PATH`` and the VAE's fp16 rule (issue 17), and the tiny VAE on SDXL.

``--vae`` puts another AutoencoderKL (e.g. madebyollin/sdxl-vae-fp16-fix) in the bundle in place of the pipeline's
VAE, decoder and encoder; the reference is diffusers' pipeline given ``vae=AutoencoderKL.from_pretrained(PATH)``,
whose ``vae.config.scaling_factor`` scales the latents. The VAE here has the tiny pipelines' shape, other weights and
another scaling factor (0.2), so an image equal to diffusers' with it, and unlike the one with the pipeline's own
VAE, shows that both the weights and the factor came from PATH. An fp16 export keeps a VAE fp32 exactly where
diffusers upcasts it: where its config sets ``force_upcast``. The tiny VAE on SDXL is TAESDXL's shape (an
AutoencoderTiny with 4 latent channels and the tiny SDXL VAE's scale factor). The bad inputs of ``--vae`` are rows
of docs/reliability.md (tests/test_reliability.py runs them); the ones the table cannot set up are here.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from lcm_export.exporter.tiny import build_tiny_autoencoder_kl
from lcm_export.runtime import Pipeline
from tests.helpers import (
    PROMPT,
    TOLERANCE,
    assert_one_line_error,
    diffusers_images,
    diffusers_sdxl_images,
    export,
    export_cli,
    image_psnr,
    needs_rtx,
    no_leftovers,
    random_inputs,
    sdxl_img2img_parity,
)

VAE_COMPONENTS = ("vae_decoder", "vae_encoder")
OWN_VAE_DIFFERENCE = 0.05  # an image with the pipeline's own VAE is at least this far (max abs) from --vae's


@pytest.fixture(scope="session")
def other_vae_dir(tmp_path_factory) -> Path:
    """The tiny pipelines' VAE shape with other random weights and scaling factor 0.2 (force_upcast: default)."""
    return build_tiny_autoencoder_kl(tmp_path_factory.mktemp("other-vae"), scaling_factor=0.2, seed=7)


@pytest.fixture(scope="session")
def fp16_fixed_vae_dir(tmp_path_factory) -> Path:
    """As other_vae_dir, with force_upcast false: what an fp16-fixed VAE's config says."""
    return build_tiny_autoencoder_kl(
        tmp_path_factory.mktemp("fp16-fixed-vae"), scaling_factor=0.2, force_upcast=False, seed=8
    )


def _autoencoder(folder: Path):
    from diffusers import AutoencoderKL, AutoencoderTiny

    config = json.loads((folder / "config.json").read_text())
    return {"AutoencoderKL": AutoencoderKL, "AutoencoderTiny": AutoencoderTiny}[config["_class_name"]].from_pretrained(
        str(folder)
    )


def _sdxl_pipeline(model_dir: Path, vae_dir: Path | None = None, *, img2img: bool = False):
    """diffusers' SDXL pipeline (LCMScheduler, as saved), with the VAE at ``vae_dir`` where given."""
    from diffusers import LCMScheduler, StableDiffusionXLImg2ImgPipeline, StableDiffusionXLPipeline

    cls = StableDiffusionXLImg2ImgPipeline if img2img else StableDiffusionXLPipeline
    options = {} if vae_dir is None else {"vae": _autoencoder(vae_dir)}
    pipeline = cls.from_pretrained(str(model_dir), **options)
    pipeline.scheduler = LCMScheduler.from_config(pipeline.scheduler.config)
    return pipeline


def _check_bundle_names_the_vae(bundle: Path, vae_dir: Path, kind: str = "autoencoder_kl") -> None:
    """The manifest's latent factors and provenance, and the bundle's VAE configs, are the VAE passed."""
    manifest = json.loads((bundle / "manifest.json").read_text())
    vae_config = json.loads((vae_dir / "config.json").read_text())
    assert manifest["pipeline"]["vae"] == kind
    assert manifest["pipeline"]["vae_scaling_factor"] == vae_config["scaling_factor"]
    assert manifest["provenance"]["source_vae"] == str(vae_dir)
    for name in VAE_COMPONENTS:
        written = json.loads((bundle / name / "config.json").read_text())
        assert written["_class_name"] == vae_config["_class_name"]
        assert written["scaling_factor"] == vae_config["scaling_factor"]


# -- (a) --vae on SDXL and SD1.5 -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sdxl_other_vae_bundle(sdxl_lcm_dir, other_vae_dir, tmp_path_factory) -> Path:
    return export(sdxl_lcm_dir, tmp_path_factory.mktemp("bundles") / "sdxl-other-vae", vae=str(other_vae_dir))


@pytest.mark.parametrize("size", [(32, 32), (48, 64)])
def test_sdxl_with_another_vae_matches_diffusers_given_that_vae(
    sdxl_lcm_dir, other_vae_dir, sdxl_other_vae_bundle, size
) -> None:
    _check_bundle_names_the_vae(sdxl_other_vae_bundle, other_vae_dir)
    runtime = Pipeline.load(sdxl_other_vae_bundle, backend="onnxruntime", precision="fp32")
    assert runtime.manifest.pipeline.vae_scaling_factor == pytest.approx(0.2)
    height, width = size
    latents, noise = random_inputs((1, 4, height // 2, width // 2), steps=4, seed=height + 1)
    expected = diffusers_sdxl_images(_sdxl_pipeline(sdxl_lcm_dir, other_vae_dir), PROMPT, latents, noise, guidance=8.5)
    own_vae = diffusers_sdxl_images(_sdxl_pipeline(sdxl_lcm_dir), PROMPT, latents, noise, guidance=8.5)
    result = runtime(PROMPT, guidance_scale=8.5, latents=latents, noise=noise)
    assert result.images.shape == (1, height, width, 3)
    error = float(np.abs(result.images - expected).max())
    difference = float(np.abs(result.images - own_vae).max())
    print(
        f"SDXL --vae {height}x{width}: max abs vs diffusers with that VAE {error:.2e}, vs its own VAE {difference:.3f}"
    )
    assert error < TOLERANCE, error
    assert difference > OWN_VAE_DIFFERENCE, difference
    assert result.images.std() > 0.01


def test_sdxl_img2img_encodes_with_the_other_vae(sdxl_lcm_dir, other_vae_dir, sdxl_other_vae_bundle) -> None:
    """The encoder is the --vae one too: diffusers' SDXL img2img given that VAE (its latent sample, its factor)."""
    runtime = Pipeline.load(sdxl_other_vae_bundle, backend="onnxruntime", precision="fp32")
    pipeline = _sdxl_pipeline(sdxl_lcm_dir, other_vae_dir, img2img=True)
    error = sdxl_img2img_parity(runtime, pipeline, (32, 48), 0.5, 8.5, None, seed=4)
    print(f"SDXL --vae img2img 48x32 strength 0.5: max abs {error:.2e}")
    assert error < TOLERANCE, error


def test_sd_with_another_vae_reads_only_that_vae(tiny_lcm_dir, tiny_lcm_pipeline, other_vae_dir, tmp_path, monkeypatch):
    """SD1.5's shape: the image equals diffusers' LatentConsistencyModelPipeline given the VAE, the pipeline's own
    VAE weights are never read (deleted here), and the --vae weights are loaded once, lazily, and released."""
    import onnxruntime
    import torch

    from lcm_export.exporter import loading

    model = Path(shutil.copytree(tiny_lcm_dir, tmp_path / "model"))
    (model / "vae" / "diffusion_pytorch_model.safetensors").unlink()  # the pipeline's own VAE weights
    loads: list[Path] = []
    released: list[str] = []
    load_module, release = loading.load_module, loading.LoadedPipeline.release

    def recording_load(folder, entry):
        loads.append(Path(folder))
        return load_module(folder, entry)

    def recording_release(self, name):
        released.append(name)
        return release(self, name)

    monkeypatch.setattr(loading, "load_module", recording_load)
    monkeypatch.setattr(loading.LoadedPipeline, "release", recording_release)
    bundle = export(model, tmp_path / "bundle", vae=str(other_vae_dir))
    monkeypatch.undo()
    assert sorted(loads) == sorted([model / "text_encoder", model / "unet", other_vae_dir])  # the VAE once
    assert "vae" in released
    _check_bundle_names_the_vae(bundle, other_vae_dir)

    from diffusers import LatentConsistencyModelPipeline

    reference = LatentConsistencyModelPipeline.from_pretrained(
        str(model), vae=_autoencoder(other_vae_dir), safety_checker=None, requires_safety_checker=False
    )
    runtime = Pipeline.load(bundle, backend="onnxruntime", precision="fp32")
    for guidance, (height, width) in [(8.5, (32, 32)), (3.0, (48, 64))]:
        latents, noise = random_inputs((1, 4, height // 2, width // 2), steps=4, seed=width)
        expected = diffusers_images(model, "a lighthouse", latents, noise, guidance=guidance, pipeline=reference)
        own_vae = diffusers_images(
            tiny_lcm_dir, "a lighthouse", latents, noise, guidance=guidance, pipeline=tiny_lcm_pipeline
        )
        result = runtime("a lighthouse", guidance_scale=guidance, latents=latents, noise=noise)
        error = float(np.abs(result.images - expected).max())
        difference = float(np.abs(result.images - own_vae).max())
        print(f"SD --vae {height}x{width} guidance {guidance}: max abs {error:.2e}, vs its own VAE {difference:.3f}")
        assert error < TOLERANCE, error
        assert difference > OWN_VAE_DIFFERENCE, difference

    # The encoder's latent distribution is the --vae AutoencoderKL's.
    image = np.random.default_rng(1).uniform(-1, 1, (1, 3, 32, 48)).astype(np.float32)
    with torch.no_grad():
        parameters = _autoencoder(other_vae_dir).encode(torch.from_numpy(image)).latent_dist.parameters.numpy()
    session = onnxruntime.InferenceSession(
        str(bundle / "vae_encoder" / "model.onnx"), providers=["CPUExecutionProvider"]
    )
    (encoded,) = session.run(["latent_parameters"], {"sample": image})
    error = float(np.abs(encoded - parameters).max())
    print(f"SD --vae encoder: max abs vs AutoencoderKL.encode {error:.2e}")
    assert encoded.shape == (1, 8, 16, 24) and error < 1e-4, error


def test_a_pipeline_folder_passes_its_vae(tiny_lcm_dir, tmp_path) -> None:
    """``--vae`` takes a pipeline folder too (its ``vae/``), as --tiny-vae does."""
    from lcm_export.exporter.loading import resolve_vae_path

    assert resolve_vae_path(str(tiny_lcm_dir)) == tiny_lcm_dir / "vae"
    assert resolve_vae_path(str(tiny_lcm_dir / "vae")) == tiny_lcm_dir / "vae"


# -- (b) the fp16 rule: force_upcast --------------------------------------------------------------------------------


@pytest.mark.parametrize("force_upcast", [True, False], ids=["force-upcast", "fp16-fixed"])
def test_fp16_export_keeps_the_vae_fp32_only_where_its_config_forces_upcast(
    sdxl_lcm_dir, other_vae_dir, fp16_fixed_vae_dir, force_upcast, tmp_path
) -> None:
    import onnx

    vae_dir = other_vae_dir if force_upcast else fp16_fixed_vae_dir
    bundle = export(sdxl_lcm_dir, tmp_path / "bundle", precision="fp16", vae=str(vae_dir))
    manifest = json.loads((bundle / "manifest.json").read_text())
    precision, io_dtype = ("fp32", "float32") if force_upcast else ("fp16", "float16")
    element_type = onnx.TensorProto.FLOAT if force_upcast else onnx.TensorProto.FLOAT16
    for name in VAE_COMPONENTS:
        (variant,) = manifest["components"][name]["variants"]
        assert (variant["precision"], variant["io_dtype"]) == (precision, io_dtype)
        assert ("kept_fp32" in variant["produced_by"]) == force_upcast
        graph = onnx.load(str(bundle / variant["path"]), load_external_data=False).graph
        assert graph.input[0].type.tensor_type.elem_type == element_type
        assert graph.output[0].type.tensor_type.elem_type == element_type
        weights = {initializer.data_type for initializer in graph.initializer}
        assert (onnx.TensorProto.FLOAT16 in weights) != force_upcast
    assert manifest["components"]["unet"]["variants"][0]["precision"] == "fp16"

    # The fp16 bundle against diffusers in fp32 with the same VAE: the fp16 VAE decoder alone, and whole images.
    import onnxruntime
    import torch

    latents = np.random.default_rng(2).standard_normal((1, 4, 16, 16)).astype(np.float32)
    with torch.no_grad():
        decoded = _autoencoder(vae_dir).decode(torch.from_numpy(latents)).sample.numpy()
    session = onnxruntime.InferenceSession(
        str(bundle / "vae_decoder" / "model.onnx"), providers=["CPUExecutionProvider"]
    )
    feed = latents.astype(io_dtype)
    (ours,) = session.run(["sample"], {"latent_sample": feed})
    decoder_error = float(np.abs(ours.astype(np.float32) - decoded).max())
    runtime = Pipeline.load(bundle, backend="onnxruntime")
    latents, noise = random_inputs((1, 4, 16, 16), steps=4, seed=6)
    expected = diffusers_sdxl_images(_sdxl_pipeline(sdxl_lcm_dir, vae_dir), PROMPT, latents, noise, guidance=8.5)
    result = runtime(PROMPT, guidance_scale=8.5, latents=latents, noise=noise)
    image_error = float(np.abs(result.images - expected).max())
    value = image_psnr(expected, result.images)
    print(
        f"fp16 SDXL bundle, VAE {precision}: decoder max abs {decoder_error:.2e} (of {np.abs(decoded).max():.2f}); "
        f"image vs diffusers fp32 max abs {image_error:.2e}, PSNR {value:.1f} dB"
    )
    assert decoder_error < (2e-2 * float(np.abs(decoded).max()) if not force_upcast else 1e-4), decoder_error
    assert value > 35.0, value


ENGINE_TARGETS = [
    pytest.param("tensorrt", "tensorrt", marks=[pytest.mark.tensorrt, needs_rtx]),
    pytest.param(
        "coreml",
        "mlpackage",
        marks=[
            pytest.mark.coreml,
            pytest.mark.skipif(not importlib.util.find_spec("coremltools"), reason="coremltools is not installed"),
        ],
    ),
]


@pytest.mark.parametrize(("target", "artifact_format"), ENGINE_TARGETS)
def test_engine_targets_build_an_fp16_fixed_vae_in_fp16(
    tiny_lcm_dir, fp16_fixed_vae_dir, target, artifact_format, tmp_path
) -> None:
    """TensorRT and Core ML follow the ONNX types: fp16 (their default) builds the fp16-fixed VAE in fp16."""
    from lcm_export.runtime.manifest import load_manifest

    bundle = export(tiny_lcm_dir, tmp_path / target, target=target, vae=str(fp16_fixed_vae_dir))
    manifest = load_manifest(bundle, verify="full")
    assert manifest.precision == "fp16" and manifest.pipeline.vae_scaling_factor == pytest.approx(0.2)
    for name in VAE_COMPONENTS:
        artifact = manifest.components[name].artifacts[artifact_format]
        assert (artifact.precision, artifact.io_dtype) == ("fp16", "float16"), name
        if target == "tensorrt":  # the engine's own I/O, as TensorRT-RTX's parser built it
            assert {entry["dtype"] for entry in artifact.details["io"]} == {"float16"}, name
        else:
            assert artifact.details["compute_precision"] == "float16", name
        print(
            f"{target} {name}: {artifact.precision}, validation {manifest.components[name].validation['max_abs_error']}"
        )


# -- (c) the tiny VAE (TAESDXL's shape) on SDXL ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def sdxl_tiny_vae_bundle(sdxl_lcm_dir, tiny_vae_dir, tmp_path_factory) -> Path:
    return export(sdxl_lcm_dir, tmp_path_factory.mktemp("bundles") / "sdxl-tiny-vae", tiny_vae=str(tiny_vae_dir))


@pytest.mark.parametrize(("guidance", "size"), [(8.5, (32, 32)), (3.0, (48, 64))])
def test_sdxl_with_the_tiny_vae_matches_diffusers_with_autoencoder_tiny(
    sdxl_lcm_dir, tiny_vae_dir, sdxl_tiny_vae_bundle, guidance, size
) -> None:
    _check_bundle_names_the_vae(sdxl_tiny_vae_bundle, tiny_vae_dir, kind="autoencoder_tiny")
    runtime = Pipeline.load(sdxl_tiny_vae_bundle, backend="onnxruntime", precision="fp32")
    height, width = size
    latents, noise = random_inputs((1, 4, height // 2, width // 2), steps=4, seed=height + int(guidance))
    pipeline = _sdxl_pipeline(sdxl_lcm_dir, tiny_vae_dir)
    expected = diffusers_sdxl_images(pipeline, PROMPT, latents, noise, guidance=guidance)
    result = runtime(PROMPT, guidance_scale=guidance, latents=latents, noise=noise)
    assert result.images.shape == (1, height, width, 3)
    error = float(np.abs(result.images - expected).max())
    print(
        f"SDXL --tiny-vae {height}x{width} guidance {guidance}: max abs vs diffusers with AutoencoderTiny {error:.2e}"
    )
    assert error < TOLERANCE, error
    assert result.images.std() > 0.01


def test_sdxl_img2img_with_the_tiny_vae_encoder_matches_diffusers(
    sdxl_lcm_dir, tiny_vae_dir, sdxl_tiny_vae_bundle
) -> None:
    """AutoencoderTiny encodes to latents directly: no latent sample is drawn on either side."""
    runtime = Pipeline.load(sdxl_tiny_vae_bundle, backend="onnxruntime", precision="fp32")
    pipeline = _sdxl_pipeline(sdxl_lcm_dir, tiny_vae_dir, img2img=True)
    error = sdxl_img2img_parity(runtime, pipeline, (48, 32), 0.6, 8.5, None, seed=3)
    print(f"SDXL --tiny-vae img2img 32x48 strength 0.6: max abs {error:.2e}")
    assert error < TOLERANCE, error


# -- (d) bad --vae input the reliability table cannot set up ---------------------------------------------------------


def test_vae_whose_weights_cannot_be_loaded_is_one_line_error(tiny_lcm_dir, other_vae_dir, tmp_path) -> None:
    """Found at the VAE's build (its config was fine): one line, and the staging folder is gone."""
    broken = Path(shutil.copytree(other_vae_dir, tmp_path / "broken-vae"))
    (broken / "diffusion_pytorch_model.safetensors").unlink()
    output = tmp_path / "out"
    line = assert_one_line_error(
        export_cli(tiny_lcm_dir, "--vae", broken, "--output", output), f"--vae '{broken}' could not be loaded: "
    )
    print(line)
    no_leftovers(output)


def test_vae_hub_id_without_network_is_one_line_error(tiny_lcm_dir, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # what a machine without network sees, without waiting on DNS
    output = tmp_path / "out"
    assert_one_line_error(
        export_cli(tiny_lcm_dir, "--vae", "nobody/no-such-vae", "--output", output),
        "--vae 'nobody/no-such-vae' is not a local folder and could not be downloaded from the hub",
    )
    no_leftovers(output)


def test_a_vae_with_per_channel_latent_statistics_is_refused(sdxl_lcm_dir, other_vae_dir, tmp_path) -> None:
    """latents_mean/latents_std (Playground v2.5's VAE): diffusers normalises per channel, the runtime would not."""
    model = Path(shutil.copytree(sdxl_lcm_dir, tmp_path / "model"))
    config_path = model / "vae" / "config.json"
    config = json.loads(config_path.read_text())
    config.update(latents_mean=[0.1, -0.2, 0.3, 0.0], latents_std=[0.9, 1.1, 1.0, 0.8])
    config_path.write_text(json.dumps(config))
    output = tmp_path / "out"
    assert_one_line_error(
        export_cli(model, "--output", output), f"MODEL '{model}': its VAE config sets latents_mean and latents_std"
    )
    no_leftovers(output)
    vae = Path(shutil.copytree(other_vae_dir, tmp_path / "vae"))
    (vae / "config.json").write_text(json.dumps({**json.loads((vae / "config.json").read_text()), **config}))
    assert_one_line_error(
        export_cli(sdxl_lcm_dir, "--vae", vae, "--output", output), f"--vae '{vae}': its VAE config sets latents_mean"
    )
    no_leftovers(output)
