"""The OpenVINO backend: parity with diffusers in fp32, the default precision's PSNR, static shapes, the cache."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from lcm_export.errors import UserError
from lcm_export.runtime import Pipeline
from tests.helpers import TOLERANCE, diffusers_images, image_psnr, random_inputs

pytest.importorskip("openvino")
pytestmark = pytest.mark.openvino

# Default precision against fp32 on the tiny model: identical on CPUs without bf16 (OpenVINO runs f32 there);
# bf16 keeps 8 mantissa bits, which on these images stays far above this bound.
MIN_DEFAULT_PSNR = 30.0


def _cache_files(root: Path) -> set[Path]:
    return {path for path in root.rglob("*") if path.is_file()} if root.exists() else set()


@pytest.fixture(scope="module")
def parity_runtime(tiny_lcm_bundle):
    return Pipeline.load(tiny_lcm_bundle, backend="openvino", precision="fp32", threads=2)


@pytest.mark.parametrize(("guidance", "size"), [(8.0, (32, 32)), (1.0, (48, 64)), (4.0, (64, 32))])
def test_fp32_matches_diffusers(parity_runtime, tiny_lcm_dir, tiny_lcm_pipeline, guidance, size) -> None:
    height, width = size
    latents, noise = random_inputs((1, 4, height // 2, width // 2), steps=4, seed=height + width + int(guidance))
    expected = diffusers_images(
        tiny_lcm_dir, "a photo of a cat", latents, noise, guidance=guidance, pipeline=tiny_lcm_pipeline
    )
    result = parity_runtime("a photo of a cat", guidance_scale=guidance, latents=latents, noise=noise)
    assert result.images.shape == (1, height, width, 3)
    error = float(np.abs(result.images - expected).max())
    assert error < TOLERANCE, error
    assert all(session.inference_precision == "f32" for session in parity_runtime.denoiser.sessions.values())


def test_batch_matches_diffusers(parity_runtime, tiny_lcm_dir, tiny_lcm_pipeline) -> None:
    prompts = ["a cat", "a red car"]
    latents, noise = random_inputs((4, 4, 16, 16), steps=4, seed=5)
    expected = diffusers_images(
        tiny_lcm_dir, prompts, latents, noise, num_images_per_prompt=2, pipeline=tiny_lcm_pipeline
    )
    result = parity_runtime(prompts, num_images_per_prompt=2, latents=latents, noise=noise)
    assert np.abs(result.images - expected).max() < TOLERANCE


def test_default_precision_psnr_against_fp32(parity_runtime, tiny_lcm_bundle) -> None:
    default = Pipeline.load(tiny_lcm_bundle, backend="openvino", threads=2)
    latents, noise = random_inputs((1, 4, 24, 24), steps=4, seed=3)
    reference = parity_runtime("a lighthouse at dusk", latents=latents, noise=noise).images
    image = default("a lighthouse at dusk", latents=latents, noise=noise).images
    precisions = sorted({session.inference_precision for session in default.denoiser.sessions.values()})
    value = image_psnr(reference, image)
    print(f"OpenVINO default precision {precisions}: PSNR against fp32 {value:.1f} dB")
    assert value >= MIN_DEFAULT_PSNR, (precisions, value)


def test_auto_backend_picks_openvino_where_it_has_a_faster_float(tiny_lcm_bundle) -> None:
    import openvino

    from lcm_export.runtime.backends import openvino as openvino_backend

    capabilities = set(openvino.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES"))
    expected = "openvino" if capabilities & {"BF16", "FP16"} else "onnxruntime"
    assert openvino_backend.auto_eligible() == (expected == "openvino")
    assert Pipeline.load(tiny_lcm_bundle).backend == expected


def test_unknown_and_unsupported_precisions_are_user_errors(tiny_lcm_bundle) -> None:
    import openvino

    with pytest.raises(
        UserError, match=r"precision='int3': the openvino backend computes in one of auto, fp32, bf16, fp16"
    ):
        Pipeline.load(tiny_lcm_bundle, backend="openvino", precision="int3")
    if "BF16" not in openvino.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES"):
        with pytest.raises(UserError, match="does not run it"):
            Pipeline.load(tiny_lcm_bundle, backend="openvino", precision="bf16")


def test_static_shape_runs_and_rejects_other_sizes(parity_runtime, tiny_lcm_bundle) -> None:
    static = Pipeline.load(tiny_lcm_bundle, backend="openvino", precision="fp32", static_shape=(1, 32, 48))
    unet_inputs = {
        port.get_any_name(): port.get_partial_shape() for port in static.denoiser.sessions["unet"].compiled.inputs
    }
    assert unet_inputs["sample"].is_static and list(unet_inputs["sample"].to_shape()) == [1, 4, 16, 24]
    latents, noise = random_inputs((1, 4, 16, 24), steps=4, seed=9)
    expected = parity_runtime("a cat", latents=latents, noise=noise).images
    assert np.abs(static("a cat", latents=latents, noise=noise).images - expected).max() < 1e-4
    with pytest.raises(UserError, match=r"static_shape for 1 image\(s\) of 48x32 .* called for 1 image\(s\) of 32x32"):
        static("a cat", height=32, width=32)
    with pytest.raises(UserError, match=r"called for 2 image\(s\)"):
        static("a cat", num_images_per_prompt=2)


def test_second_load_uses_the_compiled_model_cache(tiny_lcm_bundle, tmp_path, monkeypatch) -> None:
    cache = tmp_path / "cache"
    monkeypatch.setenv("LCM_EXPORT_CACHE_DIR", str(cache))
    first = Pipeline.load(tiny_lcm_bundle, backend="openvino", precision="fp32")
    blobs = _cache_files(cache / "openvino")
    assert len([path for path in blobs if path.suffix == ".blob"]) == 3  # one per component
    assert not any(session.loaded_from_cache for session in first.denoiser.sessions.values())
    second = Pipeline.load(tiny_lcm_bundle, backend="openvino", precision="fp32")
    assert all(session.loaded_from_cache for session in second.denoiser.sessions.values())
    assert _cache_files(cache / "openvino") == blobs  # nothing recompiled
    latents, noise = random_inputs((1, 4, 16, 16), steps=4, seed=1)
    assert np.array_equal(
        first("a cat", latents=latents, noise=noise).images, second("a cat", latents=latents, noise=noise).images
    )


def test_static_shapes_are_cached_too(tiny_lcm_bundle, tmp_path, monkeypatch) -> None:
    cache = tmp_path / "cache"
    monkeypatch.setenv("LCM_EXPORT_CACHE_DIR", str(cache))
    Pipeline.load(tiny_lcm_bundle, backend="openvino", static_shape=(1, 32, 32))
    files = _cache_files(cache / "openvino")
    second = Pipeline.load(tiny_lcm_bundle, backend="openvino", static_shape=(1, 32, 32))
    assert all(session.loaded_from_cache for session in second.denoiser.sessions.values())
    assert _cache_files(cache / "openvino") == files


def test_cache_dir_option_overrides_and_cache_false_turns_it_off(tiny_lcm_bundle, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("LCM_EXPORT_CACHE_DIR", str(tmp_path / "environment"))
    Pipeline.load(tiny_lcm_bundle, backend="openvino", cache_dir=str(tmp_path / "explicit"))
    assert _cache_files(tmp_path / "explicit")
    assert not _cache_files(tmp_path / "environment" / "openvino")
    uncached = Pipeline.load(tiny_lcm_bundle, backend="openvino", cache=False)
    assert not any(session.loaded_from_cache for session in uncached.denoiser.sessions.values())
    assert not _cache_files(tmp_path / "environment" / "openvino")


def test_the_mapped_weights_are_released_during_the_compile_and_the_first_call(
    tiny_lcm_bundle, tmp_path, monkeypatch
) -> None:
    from lcm_export.runtime.backends import mapped_files

    cache = tmp_path / "cache"
    monkeypatch.setenv("LCM_EXPORT_CACHE_DIR", str(cache))
    latents, noise = random_inputs((1, 4, 16, 16), steps=2, seed=3)
    reference = Pipeline.load(tiny_lcm_bundle, backend="openvino", cache=False)
    expected = reference("a cat", latents=latents, noise=noise, num_inference_steps=2).images
    Pipeline.load(tiny_lcm_bundle, backend="openvino")  # fills the cache
    # The blocks run with the pages released beside them (not each release: the thread's count depends on time).
    released: list[tuple[Path, ...]] = []
    real_released_while = mapped_files.released_while

    def spy(roots):
        released.append(tuple(roots))
        return real_released_while(roots)

    monkeypatch.setattr(mapped_files, "released_while", spy)
    warm = Pipeline.load(tiny_lcm_bundle, backend="openvino")
    sessions = len(warm.denoiser.sessions)
    assert len(released) == sessions  # once per session, around its compile
    assert all(roots[0].is_relative_to(cache / "openvino") for roots in released)
    assert all(roots[1].is_relative_to(tiny_lcm_bundle) for roots in released)
    images = [warm("a cat", latents=latents, noise=noise, num_inference_steps=2).images for _ in range(2)]
    used = {"text_encoder", "unet", "vae_decoder"} & set(warm.denoiser.sessions)
    assert len(released) == sessions + len(used)  # and around each session's first call, never again
    for image in images:  # the pages read again come back from the file: the same images
        np.testing.assert_array_equal(image, expected)
