"""The runtime as a library apps embed (issue 24): forced variants, checked options, threads, one draw order, the
public API. Each test reproduces a failure of the earlier runtime and pins the behaviour that replaced it."""

from __future__ import annotations

import inspect
import threading
from pathlib import Path

import numpy as np
import pytest

import lcm_export.runtime as runtime
from lcm_export.errors import UserError
from lcm_export.runtime import Pipeline
from lcm_export.runtime.manifest import Artifact
from lcm_export.runtime.variants import choose_variant
from tests.helpers import export


@pytest.fixture(scope="module")
def int8_only_bundle(tiny_lcm_dir, tmp_path_factory) -> Path:
    """An INT8 bundle exported without --keep-fp32: its U-Net and VAE decoder exist as INT8 only, its text encoder
    as fp32 only (``--float-text-encoders``)."""
    folder = tmp_path_factory.mktemp("int8-only") / "bundle"
    return export(tiny_lcm_dir, folder, precision="int8", int8_text_encoders=False)


@pytest.fixture(scope="module")
def tiny_vae_bundle(tiny_lcm_dir, tiny_vae_dir, tmp_path_factory) -> Path:
    return export(tiny_lcm_dir, tmp_path_factory.mktemp("tiny-vae") / "bundle", tiny_vae=str(tiny_vae_dir))


# -- variants and options -----------------------------------------------------------------------------------------


def test_fp32_forced_on_an_int8_only_bundle_is_an_error_naming_what_it_has(int8_only_bundle: Path) -> None:
    # Before: Pipeline.load(bundle, precision="fp32") ran the INT8 U-Net and decoder without a word.
    with pytest.raises(UserError, match=r"variant 'fp32': component 'unet' has no fp32 variant .*it has int8-qdq"):
        Pipeline.load(int8_only_bundle, backend="onnxruntime", variant="fp32")
    auto = Pipeline.load(int8_only_bundle, backend="onnxruntime")
    assert auto.variants["unet"].name == "int8-qdq" and auto.variants["unet"].reason == "the only one"
    forced = Pipeline.load(int8_only_bundle, backend="onnxruntime", variant="int8")
    assert forced.variants["unet"].reason == "int8 as asked"
    # The text encoder has no INT8 variant: the closest more precise one, said so.
    assert forced.variants["text_encoder"].name == "fp32"
    assert "closest more precise" in forced.variants["text_encoder"].reason
    assert "unet int8-qdq (int8 as asked)" in forced.variant_summary()


def test_variant_rules_on_a_component_with_several_variants(tiny_lcm_bundle: Path) -> None:
    component = runtime.load_manifest(tiny_lcm_bundle).components["unet"]
    fp32 = component.variants[0]
    int8 = Artifact("onnx", "unet/model-int8.onnx", "int8", name="int8-qdq")
    fp16 = Artifact("onnx", "unet/model-fp16.onnx", "fp16", name="fp16")
    both = type(component)(component.spec, (int8, fp16, fp32), component.validation)
    assert choose_variant(both, "onnx", "auto").name == "int8-qdq"  # the exporter's first: preferred
    assert choose_variant(both, "onnx", "fp32").name == "fp32"
    assert choose_variant(both, "onnx", "fp16").name == "fp16"
    float_only = type(component)(component.spec, (fp32,), component.validation)
    assert choose_variant(float_only, "onnx", "int8").name == "fp32"  # more precise than asked: allowed
    int8_only = type(component)(component.spec, (int8,), component.validation)
    with pytest.raises(UserError, match="no fp16 variant or a more precise one"):
        choose_variant(int8_only, "onnx", "fp16")


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"variant": "int8"}, r"variant 'int8': BUNDLE '.*' has no int8 variant \(it has fp32\)"),
        ({"variant": "int8-qdq"}, r"variant='int8-qdq': pick one of auto, int8, fp16, fp32"),
        ({"precision": "fp23"}, r"precision='fp23': the onnxruntime backend computes in one of auto, fp32"),
        ({"precision": "int8"}, r"int8 is a stored variant: pass variant='int8'"),
        ({"precision": "bf16"}, r"precision='bf16': the onnxruntime backend computes in one of auto, fp32"),
        ({"device": "GPU"}, r"device 'GPU' is not an onnxruntime device: pick auto, cpu, cuda or cuda:N"),
        ({"device": "cuda:0"}, r"device 'cuda:0': this onnxruntime has no CUDA provider"),
        ({"verify": "sometimes"}, r"verify='sometimes': pick one of full, cached, size"),
        ({"cache_dir": ""}, r"cache_dir='': pass a folder, or cache=False to turn caching off"),
        ({"cache": "no"}, r"cache='no': pass True or False"),
        ({"threads": 0}, r"threads=0: pass an integer >= 1"),
        ({"static_shape": (1, 32)}, r"static_shape=\(1, 32\): pass \(batch, height, width\)"),
        ({"static_shape": 5}, r"static_shape=5: pass \(batch, height, width\)"),
        ({"backend": "onnx"}, r"backend 'onnx' is unknown"),
        ({"sessions": {"unett": None}}, r"sessions=\{'unett': ...\}: not a component this pipeline opens \(it opens "),
    ],
)
def test_every_load_option_is_checked_against_the_backend(tiny_lcm_bundle: Path, options, message) -> None:
    # Before: a misspelt precision and device="GPU" ran on onnxruntime's CPU without a word; verify raised
    # ValueError; cache_dir="" meant "off".
    with pytest.raises(UserError, match=message):
        Pipeline.load(tiny_lcm_bundle, **{"backend": "onnxruntime", **options})


def test_openvino_checks_its_precision_and_device(tiny_lcm_bundle: Path) -> None:
    pytest.importorskip("openvino")
    with pytest.raises(UserError, match=r"precision='int8'.*pass variant='int8'"):
        Pipeline.load(tiny_lcm_bundle, backend="openvino", precision="int8")
    with pytest.raises(UserError, match=r"device 'NPU7' is not an OpenVINO device on this machine \(it has CPU"):
        Pipeline.load(tiny_lcm_bundle, backend="openvino", device="NPU7")
    assert Pipeline.load(tiny_lcm_bundle, backend="openvino", device="CPU", precision="fp32").backend == "openvino"


def test_lcm_run_says_which_variant_ran_and_why(tiny_lcm_bundle: Path, tmp_path: Path) -> None:
    from lcm_export.runtime.cli import main

    assert main([str(tiny_lcm_bundle), "a cat", "--backend", "onnxruntime", "--output", str(tmp_path / "x.png")]) == 0
    with pytest.raises(UserError, match="variant 'int8'"):
        main([str(tiny_lcm_bundle), "a cat", "--variant", "int8", "--output", str(tmp_path / "y.png")])


# -- threads ------------------------------------------------------------------------------------------------------

JOBS = [("a red car", 1), ("a blue house", 2), ("a cat", 3), ("a dog in the snow", 4), ("mountains", 5), ("", 6)]


def _in_threads(call, jobs) -> list:
    """``call(job)`` for every job, each in its own thread, all started together."""
    results: list = [None] * len(jobs)
    errors: list[BaseException] = []
    barrier = threading.Barrier(len(jobs))

    def work(index: int) -> None:
        try:
            barrier.wait()
            results[index] = call(jobs[index])
        except BaseException as error:
            errors.append(error)

    threads = [threading.Thread(target=work, args=(index,)) for index in range(len(jobs))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors
    return results


@pytest.mark.parametrize("backend", ["onnxruntime", "openvino"])
def test_six_threads_on_one_pipeline_give_the_serial_images(tiny_lcm_bundle: Path, backend: str) -> None:
    # Before: on OpenVINO five of six threads raised RuntimeError('Infer Request is busy').
    if backend == "openvino":
        pytest.importorskip("openvino")
    pipe = Pipeline.load(tiny_lcm_bundle, backend=backend, precision="fp32")
    image = pipe("a photo", seed=0, num_inference_steps=2).images[0]

    def text_to_image(job):
        return pipe(job[0], seed=job[1], num_inference_steps=2).images

    def image_to_image(job):
        return pipe.img2img(image, job[0], seed=job[1], strength=0.5).images

    def frame_loop(job):
        stream = pipe.stream(job[0], seed=job[1], strength=0.5)
        return np.stack([stream(image), stream(image)])

    for call in (text_to_image, image_to_image, frame_loop):
        serial = [call(job) for job in JOBS]
        threaded = _in_threads(call, JOBS)
        for one, other in zip(serial, threaded, strict=True):
            assert np.array_equal(one, other), call.__name__
        assert not np.array_equal(serial[0], serial[1])  # different prompts and seeds: different images


def test_openvino_request_pool_serves_concurrent_calls_and_caps(tiny_lcm_bundle: Path) -> None:
    pytest.importorskip("openvino")
    from lcm_export.runtime.backends.openvino import OpenVinoSession

    pipe = Pipeline.load(tiny_lcm_bundle, backend="openvino", precision="fp32")
    session = pipe.denoiser.sessions["unet"]
    assert isinstance(session, OpenVinoSession)
    _in_threads(lambda job: pipe(job[0], seed=job[1], num_inference_steps=1), JOBS)
    assert 1 <= session._created <= len(JOBS) and len(session._idle) == session._created  # all returned
    capped = Pipeline.load(tiny_lcm_bundle, backend="openvino", precision="fp32")
    capped_unet = capped.denoiser.sessions["unet"]
    capped_unet.max_requests = 1  # a lock: calls wait for the one request
    results = _in_threads(lambda job: capped(job[0], seed=job[1], num_inference_steps=1).images, JOBS)
    assert capped_unet._created == 1
    serial = [pipe(job[0], seed=job[1], num_inference_steps=1).images for job in JOBS]
    assert all(np.array_equal(a, b) for a, b in zip(results, serial, strict=True))


def test_sessions_of_backends_that_are_not_thread_safe_are_locked() -> None:
    from lcm_export.runtime.backends import coreml, onnxruntime, openvino, tensorrt
    from lcm_export.runtime.denoiser import LockedSession

    # OpenVINO pools infer requests; the others lock each session (onnxruntime: measured, bench/RESULTS.md).
    assert (onnxruntime.THREAD_SAFE, openvino.THREAD_SAFE, tensorrt.THREAD_SAFE, coreml.THREAD_SAFE) == (
        False,
        True,
        False,
        False,
    )
    inside = 0
    most = 0

    class Counting:
        def run(self, feeds):
            nonlocal inside, most
            inside += 1
            most = max(most, inside)
            threading.Event().wait(0.01)
            inside -= 1
            return feeds

    locked = LockedSession(Counting())
    _in_threads(lambda job: locked.run({"x": job[1]}), JOBS)
    assert most == 1


# -- one way to draw, one way to check ------------------------------------------------------------------------------


@pytest.mark.parametrize("bundle_fixture", ["tiny_vae_bundle", "tiny_lcm_bundle"])
def test_stream_and_img2img_draw_alike(request, bundle_fixture: str) -> None:
    # Before: the stream drew a VAE latent sample even for a tiny VAE, so one seed gave two images.
    pipe = Pipeline.load(request.getfixturevalue(bundle_fixture), backend="onnxruntime", precision="fp32")
    image = pipe("a house", seed=5, num_inference_steps=2).images[0]
    single = pipe.img2img(image, "a watercolor house", seed=11, strength=0.5).images[0]
    stream = pipe.stream("a watercolor house", seed=11, strength=0.5)
    assert np.array_equal(stream(image), single)
    assert np.array_equal(stream(image), single)  # the same draws for every frame
    other = pipe.img2img(image, "a watercolor house", seed=12, strength=0.5).images[0]
    assert not np.array_equal(other, single)


def test_a_tiny_vae_takes_no_latent_sample_noise(tiny_vae_bundle: Path) -> None:
    # Before: the noise was silently ignored (a caller reproducing diffusers' draws would not know it was unused).
    pipe = Pipeline.load(tiny_vae_bundle, backend="onnxruntime", precision="fp32")
    image = np.full((32, 32, 3), 0.5, dtype=np.float32)
    noise = np.zeros((1, 4, 16, 16), dtype=np.float32)
    with pytest.raises(UserError, match="sample_noise: this bundle's tiny VAE encodes deterministically"):
        pipe.img2img(image, "a cat", sample_noise=noise)


def test_load_manifest_checks_verify_before_reading(tmp_path: Path) -> None:
    # Before: a ValueError, and only after the manifest was read and validated.
    with pytest.raises(UserError, match=r"verify='sometimes': pick one of full, cached, size"):
        runtime.load_manifest(tmp_path / "no-such-bundle", verify="sometimes")


def test_strength_and_guidance_take_numbers_in_every_mode(tiny_lcm_bundle: Path) -> None:
    # Before: stream(strength="0.5") raised TypeError inside the scheduler; img2img(strength="0.5") accepted it.
    pipe = Pipeline.load(tiny_lcm_bundle, backend="onnxruntime", precision="fp32")
    image = np.full((32, 32, 3), 0.5, dtype=np.float32)
    message = r"strength='0.5': pass a number in \(0, 1\] \(e.g. 0.5\)"
    with pytest.raises(UserError, match=message):
        pipe.img2img(image, "a cat", strength="0.5")
    with pytest.raises(UserError, match=message):
        pipe.stream("a cat", strength="0.5")
    with pytest.raises(UserError, match=r"guidance_scale='8': pass a number"):
        pipe("a cat", guidance_scale="8")
    numpy_strength = pipe.img2img(image, "a cat", strength=np.float32(0.5), seed=1).images
    assert np.array_equal(numpy_strength, pipe.img2img(image, "a cat", strength=0.5, seed=1).images)


def test_no_seed_gives_a_fresh_seed_that_makes_the_image_again(tiny_lcm_bundle: Path) -> None:
    pipe = Pipeline.load(tiny_lcm_bundle, backend="onnxruntime", precision="fp32")
    first, second = pipe("a cat", num_inference_steps=1), pipe("a cat", num_inference_steps=1)
    assert first.seed != second.seed and not np.array_equal(first.images, second.images)
    again = pipe("a cat", num_inference_steps=1, seed=first.seed)
    assert np.array_equal(again.images, first.images)


# -- the public API -------------------------------------------------------------------------------------------------


def test_public_api_names_every_type_a_user_touches() -> None:
    for name in (
        "Pipeline",
        "PipelineOutput",
        "StepEvent",
        "FrameStream",
        "VariantChoice",
        "SessionInfo",
        "Manifest",
        "load_manifest",
        "UserError",
        "BundleError",
        "NonFiniteError",
        "profile_bundle",
        "ProfileReport",
    ):
        assert name in runtime.__all__ and hasattr(runtime, name), name
    assert issubclass(runtime.BundleError, runtime.UserError) and issubclass(runtime.NonFiniteError, UserError)


def test_nothing_public_by_accident_and_defaults_agree() -> None:
    public = {name for name in dir(Pipeline) if not name.startswith("_")}
    assert not public & {"sessions", "check_size", "decoder_feeds", "check_static_shape"}
    seeds = {
        inspect.signature(method).parameters["seed"].default
        for method in (Pipeline.__call__, Pipeline.img2img, Pipeline.stream)
    }
    assert seeds == {None}
    strengths = {
        inspect.signature(method).parameters["strength"].default for method in (Pipeline.img2img, Pipeline.stream)
    }
    assert strengths == {0.5}
    steps = {
        inspect.signature(method).parameters["num_inference_steps"].default
        for method in (Pipeline.__call__, Pipeline.img2img, Pipeline.stream)
    }
    assert steps == {4}
