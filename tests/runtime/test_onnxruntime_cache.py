"""onnxruntime's optimised graph is saved once into the user cache and reopened as it is at later loads."""

from __future__ import annotations

import gc
import sys
from pathlib import Path

import numpy as np
import pytest

from lcm_export.runtime import Pipeline
from tests.helpers import random_inputs


def _files(root: Path) -> set[Path]:
    return {path for path in root.rglob("*") if path.is_file()} if root.exists() else set()


def test_second_load_opens_the_saved_optimised_graph(tiny_lcm_bundle, tmp_path, monkeypatch) -> None:
    cache = tmp_path / "cache"
    monkeypatch.setenv("LCM_EXPORT_CACHE_DIR", str(cache))
    first = Pipeline.load(tiny_lcm_bundle, backend="onnxruntime")
    assert not any(session.loaded_from_cache for session in first.denoiser.sessions.values())
    saved = _files(cache / "onnxruntime")
    assert len([path for path in saved if path.name == "model.onnx"]) == 3  # one per component
    assert not [path for path in (cache / "onnxruntime").iterdir() if path.name.startswith(".")]  # no staging left

    second = Pipeline.load(tiny_lcm_bundle, backend="onnxruntime")
    assert all(session.loaded_from_cache for session in second.denoiser.sessions.values())
    assert _files(cache / "onnxruntime") == saved
    latents, noise = random_inputs((1, 4, 16, 24), steps=4, seed=2)
    expected = first("a cat", latents=latents, noise=noise).images
    assert np.abs(second("a cat", latents=latents, noise=noise).images - expected).max() < 1e-5


def _mapped_files(root: Path) -> set[Path]:
    """Files under ``root`` this process maps (/proc/self/maps)."""
    mapped = set()
    for line in Path("/proc/self/maps").read_text().splitlines():
        fields = line.split(maxsplit=5)
        if len(fields) == 6 and fields[5].startswith(str(root)):
            mapped.add(Path(fields[5]))
    return mapped


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc/self/maps is Linux's")
def test_the_first_start_runs_on_the_saved_copy(tiny_lcm_bundle, tmp_path, monkeypatch) -> None:
    """The session that optimised a graph (weights and packed copies in its heap) is replaced by the copy it saved,
    whose weights are mapped from the cache as at every later start."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("LCM_EXPORT_CACHE_DIR", str(cache))
    first = Pipeline.load(tiny_lcm_bundle, backend="onnxruntime")
    assert not any(session.loaded_from_cache for session in first.denoiser.sessions.values())
    weights = {path for path in _files(cache / "onnxruntime") if path.name == "model.onnx_data"}
    assert len(weights) == 3  # one per component
    assert weights <= _mapped_files(cache.resolve())
    latents, noise = random_inputs((1, 4, 16, 24), steps=4, seed=4)
    image = first("a cat", latents=latents, noise=noise).images
    del first
    gc.collect()
    assert not _mapped_files(cache.resolve())  # nothing of the first start is held once it is gone
    second = Pipeline.load(tiny_lcm_bundle, backend="onnxruntime")
    assert all(session.loaded_from_cache for session in second.denoiser.sessions.values())
    assert np.array_equal(second("a cat", latents=latents, noise=noise).images, image)


def test_a_saved_copy_that_does_not_open_leaves_an_uncached_load(tiny_lcm_bundle, tmp_path, monkeypatch) -> None:
    """Opening the copy the first load just saved is not expected to fail; if it does, the load still works,
    optimised without the cache, and the entry is removed so that the next load writes it again."""
    from lcm_export.runtime.backends import onnxruntime as backend

    cache = tmp_path / "cache"
    monkeypatch.setenv("LCM_EXPORT_CACHE_DIR", str(cache))
    reference = Pipeline.load(tiny_lcm_bundle, backend="onnxruntime", cache=False)

    def refuse(*arguments, **keywords):
        raise RuntimeError("cannot open")

    monkeypatch.setattr(backend, "_open_optimized", refuse)
    runtime = Pipeline.load(tiny_lcm_bundle, backend="onnxruntime")
    assert not any(session.loaded_from_cache for session in runtime.denoiser.sessions.values())
    assert not [path for path in _files(cache / "onnxruntime") if path.name == "model.onnx"]
    latents, noise = random_inputs((1, 4, 16, 24), steps=4, seed=5)
    expected = reference("a cat", latents=latents, noise=noise).images
    assert np.abs(runtime("a cat", latents=latents, noise=noise).images - expected).max() < 1e-5


def test_a_broken_cache_entry_is_rebuilt(tiny_lcm_bundle, tmp_path, monkeypatch) -> None:
    cache = tmp_path / "cache"
    monkeypatch.setenv("LCM_EXPORT_CACHE_DIR", str(cache))
    Pipeline.load(tiny_lcm_bundle, backend="onnxruntime")
    for path in _files(cache / "onnxruntime"):
        if path.name == "model.onnx":
            path.write_bytes(b"not a model")
    reloaded = Pipeline.load(tiny_lcm_bundle, backend="onnxruntime")
    assert not any(session.loaded_from_cache for session in reloaded.denoiser.sessions.values())
    assert all(
        session.loaded_from_cache
        for session in Pipeline.load(tiny_lcm_bundle, backend="onnxruntime").denoiser.sessions.values()
    )


def test_cache_false_turns_caching_off(tiny_lcm_bundle, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("LCM_EXPORT_CACHE_DIR", str(tmp_path / "cache"))
    runtime = Pipeline.load(tiny_lcm_bundle, backend="onnxruntime", cache=False)
    assert not any(session.loaded_from_cache for session in runtime.denoiser.sessions.values())
    assert not _files(tmp_path / "cache" / "onnxruntime")


def test_low_memory_runs_without_arenas_and_gives_the_same_image(tiny_lcm_bundle) -> None:
    default = Pipeline.load(tiny_lcm_bundle, backend="onnxruntime")
    low = Pipeline.load(tiny_lcm_bundle, backend="onnxruntime", low_memory=True)
    assert low.options.low_memory and not default.options.low_memory
    for name, session in low.denoiser.sessions.items():
        assert not session.session.get_session_options().enable_cpu_mem_arena, name
        assert default.denoiser.sessions[name].session.get_session_options().enable_cpu_mem_arena, name
    latents, noise = random_inputs((2, 4, 16, 24), steps=4, seed=3)
    expected = default(["a cat", "a dog"], latents=latents, noise=noise).images
    assert np.array_equal(low(["a cat", "a dog"], latents=latents, noise=noise).images, expected)
