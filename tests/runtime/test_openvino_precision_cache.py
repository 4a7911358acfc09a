"""OpenVINO's compiled-blob cache and the compute precision: an f32 blob must never serve a bf16 run.

OpenVINO keys its cache on the model and the compile properties, but does not tell a blob compiled with an
explicit f32 hint from one compiled with no hint: a pipeline loaded with ``precision="fp32"`` and then one with
the default ``"auto"`` (bf16 on CPUs with AVX-512 BF16) imported the f32 blob into a bf16 run, whose images were
NaN. The backend now always writes the hint out and keeps each precision's blobs in a folder of their own.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from lcm_export.runtime import Pipeline

pytest.importorskip("openvino")


def test_a_cached_fp32_blob_never_serves_the_default_precision(tiny_lcm_bundle: Path, tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    latents = rng.standard_normal((1, 4, 24, 24), dtype=np.float32)
    noise = [rng.standard_normal((1, 4, 24, 24), dtype=np.float32) for _ in range(3)]
    cache = tmp_path / "cache"
    parity = Pipeline.load(tiny_lcm_bundle, backend="openvino", precision="fp32", cache_dir=cache)
    parity("a cat", seed=0, num_inference_steps=1)  # the f32 blobs are written
    default = Pipeline.load(tiny_lcm_bundle, backend="openvino", cache_dir=cache)
    uncached = Pipeline.load(tiny_lcm_bundle, backend="openvino", cache=False)
    info = default.session_info()
    precisions = {session.inference_precision for session in info.values()}
    assert not any(session.loaded_from_cache for session in info.values()) or precisions == {"f32"}
    image = default("a lighthouse at dusk", latents=latents, noise=noise).images
    assert np.isfinite(image).all()
    assert np.array_equal(image, uncached("a lighthouse at dusk", latents=latents, noise=noise).images)
    folders = sorted(path.name for path in (cache).iterdir() if path.is_dir())
    assert "f32" in folders  # each precision in its own folder
    again = Pipeline.load(tiny_lcm_bundle, backend="openvino", cache_dir=cache)
    assert all(session.loaded_from_cache for session in again.session_info().values())
    assert np.array_equal(again("a lighthouse at dusk", latents=latents, noise=noise).images, image)
