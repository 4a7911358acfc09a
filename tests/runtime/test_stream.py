"""The frame loop (``Pipeline.stream``): step batching across frames equals the unbatched loop, frames come out
once each and in order, and ``lcm-run --stream`` reads and writes videos with imageio.

Step batching (StreamDiffusion's idea) keeps N frames in flight and runs one U-Net batch per frame, each row at its
own step: it needs the U-Net's per-row timestep, which the first test checks on the exported graph itself.
"""

from __future__ import annotations

import itertools
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from lcm_export.errors import UserError
from lcm_export.runtime import Pipeline

# Batched and unbatched runs do the same arithmetic except inside the U-Net's batched kernels; measured on the tiny
# bundles with onnxruntime's CPU provider: 0 (bit-identical) for both families. The bound leaves room for kernels
# that block a batch differently (float32 rounding), far below what a row at a wrong step gives (> 1e-2).
BATCHED_TOLERANCE = 1e-5
FRAMES = 6


def make_frames(count: int, size: int = 32) -> list[np.ndarray]:
    """Blocky random frames (structure the tiny VAE keeps), each unlike the others."""
    rng = np.random.default_rng(11)
    return [np.kron(rng.random((size // 4, size // 4, 3)), np.ones((4, 4, 1))).astype(np.float32) for _ in range(count)]


def test_the_exported_unet_takes_one_timestep_per_row(tiny_lcm_bundle) -> None:
    """A batch of rows at different timesteps gives each row what it gives alone at its own timestep."""
    pipe = Pipeline.load(tiny_lcm_bundle, backend="onnxruntime")
    assert pipe.denoiser._input_shapes["unet"]["timestep"] == ("batch",) and pipe.denoiser.per_row_timesteps
    rng = np.random.default_rng(0)
    sample = rng.standard_normal((2, 4, 8, 8)).astype(np.float32)
    feeds = {
        "encoder_hidden_states": rng.standard_normal((2, 77, 32)).astype(np.float32),
        "timestep_cond": rng.standard_normal((2, 32)).astype(np.float32),
    }
    timesteps = np.array([999.0, 259.0], np.float32)
    batched = pipe.denoiser._run("unet", {**feeds, "sample": sample, "timestep": timesteps})["out_sample"]
    alone = [
        pipe.denoiser._run(
            "unet",
            {name: value[row : row + 1] for name, value in {**feeds, "sample": sample, "timestep": timesteps}.items()},
        )["out_sample"]
        for row in range(2)
    ]
    error = float(np.abs(batched - np.concatenate(alone)).max())
    same_step = pipe.denoiser._run("unet", {**feeds, "sample": sample, "timestep": np.full(2, 999.0, np.float32)})[
        "out_sample"
    ]
    moved = float(np.abs(same_step[1] - batched[1]).max())
    print(f"per-row timesteps: batch vs rows alone max abs {error:.2e}; row 2 at 999 instead of 259 moves {moved:.2e}")
    assert error <= BATCHED_TOLERANCE
    assert moved > 1e-3  # the second row's timestep is really its own


@pytest.mark.parametrize(
    ("family", "steps_asked", "steps_run"),
    [("lcm", 2, 2), ("lcm", 4, 4), ("lcm-lora", 4, 2), ("lcm-lora", 8, 4)],
    ids=["lcm-2", "lcm-4", "lcm-lora-2", "lcm-lora-4"],
)
def test_step_batching_equals_the_unbatched_loop(
    family, steps_asked, steps_run, tiny_lcm_bundle, tiny_cfg_bundle
) -> None:
    """Same frames, same draws: frame k of the batched stream equals frame k of the unbatched one; the first
    N - 1 pushes return nothing, the flush returns the last N - 1 frames, every frame comes out once, in order.
    The LCM-LoRA bundle runs classifier-free guidance (guidance 1.5): its batch doubles with the unconditional half.
    (LCM-LoRA's img2img schedule is diffusers' sliced one: strength 0.5 runs half the steps asked.)"""
    bundle, guidance = (tiny_lcm_bundle, None) if family == "lcm" else (tiny_cfg_bundle, 1.5)
    pipe = Pipeline.load(bundle, backend="onnxruntime")
    frames = make_frames(FRAMES)
    options = dict(strength=0.5, num_inference_steps=steps_asked, guidance_scale=guidance, seed=3)
    plain = pipe.stream("a cat", **options, batch_steps=False)
    unbatched = [plain(frame) for frame in frames]
    assert plain.steps == steps_run and not plain.batch_steps
    assert plain.request.use_cfg == (family == "lcm-lora")

    batched_stream = pipe.stream("a cat", **options, batch_steps=True)
    session = pipe.denoiser.sessions["unet"]
    rows: list[int] = []
    run = session.run
    session.run = lambda feeds: rows.append(len(feeds["sample"])) or run(feeds)  # count each call's batch
    pushed = [batched_stream.push(frame) for frame in frames]
    assert [image is None for image in pushed] == [True] * (steps_run - 1) + [False] * (FRAMES - steps_run + 1)
    assert batched_stream.frames_in == FRAMES and len(batched_stream.in_flight) == steps_run - 1
    flushed = batched_stream.flush()
    assert len(flushed) == steps_run - 1 and not batched_stream.in_flight
    batched = [image for image in pushed if image is not None] + flushed
    session.run = run
    # One U-Net call per push and per flush step: 1..N rows while filling, N, then N-1..1 (twice that with CFG).
    fill = list(range(1, steps_run + 1)) + [steps_run] * (FRAMES - steps_run) + list(range(steps_run - 1, 0, -1))
    assert rows == [count * (2 if family == "lcm-lora" else 1) for count in fill], rows

    assert len(batched) == FRAMES and len(batched_stream.latencies) == FRAMES
    assert len(batched_stream.call_seconds) == FRAMES + steps_run - 1  # every push and every flush step
    errors = [float(np.abs(a - b).max()) for a, b in zip(unbatched, batched, strict=True)]
    apart = min(float(np.abs(a - b).max()) for a, b in itertools.pairwise(unbatched))
    print(
        f"{family}, {steps_run} steps: batched vs unbatched max abs {max(errors):.2e}; frames differ by >= {apart:.2e}"
    )
    assert max(errors) <= BATCHED_TOLERANCE, errors
    assert apart > 1e-2  # the frames differ, so a frame out of order would fail the comparison


def test_the_unbatched_loop_equals_img2img_with_the_same_draws(tiny_lcm_bundle) -> None:
    """The stream is img2img with fixed draws (itself equal to diffusers, tests/runtime/test_img2img.py)."""
    pipe = Pipeline.load(tiny_lcm_bundle, backend="onnxruntime")
    stream = pipe.stream("a cat", strength=0.6, num_inference_steps=4, seed=5)
    frames = make_frames(2)
    outputs = list(stream.run(frames))
    for frame, output in zip(frames, outputs, strict=True):
        expected = pipe.img2img(
            frame,
            "a cat",
            strength=0.6,
            num_inference_steps=4,
            sample_noise=stream.draws.sample_noise,
            image_noise=stream.draws.image_noise,
            noise=stream.draws.noise,
        ).images[0]
        assert np.array_equal(output, expected)


def test_stream_bad_input(tiny_lcm_bundle) -> None:
    pipe = Pipeline.load(tiny_lcm_bundle, backend="onnxruntime")
    batched = pipe.stream("a cat", num_inference_steps=2, batch_steps=True)
    with pytest.raises(UserError, match=r"batches steps .* call push\(frame\) and flush\(\)"):
        batched(make_frames(1)[0])
    with pytest.raises(UserError, match="batch_steps='yes': pass True, False or None"):
        pipe.stream("a cat", batch_steps="yes")
    with pytest.raises(UserError, match="stream\\(\\) takes one prompt"):
        pipe.stream(["a cat", "a dog"])
    batched.push(make_frames(1, 32)[0])
    with pytest.raises(UserError, match="frame 2 is 64x64 but the stream started at 32x32"):
        batched.push(make_frames(1, 64)[0])
    assert batched.frames_in == 1 and len(batched.flush()) == 1  # the refused frame changed nothing

    static = Pipeline.load(tiny_lcm_bundle, backend="onnxruntime", static_shape=(1, 32, 32))
    with pytest.raises(UserError, match="load the pipeline without static_shape, or pass batch_steps=False"):
        static.stream("a cat", batch_steps=True)
    assert static.stream("a cat")(make_frames(1)[0]).shape == (32, 32, 3)


def test_step_batching_needs_a_per_row_timestep(tiny_lcm_bundle) -> None:
    """A bundle exported before per-row timesteps declares a scalar timestep: asking it to batch steps is a one-line
    error, the default runs the unbatched loop."""
    pipe = Pipeline.load(tiny_lcm_bundle, backend="onnxruntime")
    pipe.denoiser._input_shapes["unet"]["timestep"] = ()  # what such a bundle's manifest declares
    with pytest.raises(UserError, match=r"takes one timestep for the whole batch .* re-export it, or pass batch_steps"):
        pipe.stream("a cat", batch_steps=True)
    assert not pipe.stream("a cat").batch_steps
    assert pipe.denoiser._timestep_feed(np.full(2, 759.0)).shape == ()


def run_cli(*args, blocked: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    code = (
        "import sys\n"
        f"for name in {list(blocked)!r}: sys.modules[name] = None\n"
        "from lcm_export.runtime.cli import entry_point\n"
        f"sys.argv = ['lcm-run', *{[str(a) for a in args]!r}, '--backend', 'onnxruntime']\n"
        "entry_point()\n"
    )
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)


def write_video(path: Path, frames: list[np.ndarray], frame_rate: float = 10.0) -> None:
    import imageio.v2 as iio2

    if path.suffix == ".gif":
        options = {"mode": "I", "duration": 1000 / frame_rate}
    else:
        options = {"fps": frame_rate, "macro_block_size": 1}
    with iio2.get_writer(path, **options) as writer:
        for frame in frames:
            writer.append_data((frame * 255).round().astype(np.uint8))


def test_cli_streams_a_video_to_a_video_and_to_frames(tiny_lcm_bundle, tmp_path) -> None:
    """mp4 in (imageio + imageio-ffmpeg), batched steps: the PNG frames equal the library's unbatched stream over
    the decoded frames; the mp4 out has every frame, in order, at the input's size and frame rate."""
    iio = pytest.importorskip("imageio.v3")
    pytest.importorskip("imageio_ffmpeg")
    video = tmp_path / "in.mp4"
    write_video(video, make_frames(5), frame_rate=12.0)
    decoded = [frame.astype(np.float32) / 255 for frame in iio.imiter(video)]
    assert len(decoded) == 5

    result = run_cli(tiny_lcm_bundle, "a cat", "--stream", video, "--output", tmp_path / "frames", "--batch-steps")
    assert result.returncode == 0, result.stderr
    assert "frames/s" in result.stdout and "step batching, 4 frames in flight" in result.stdout
    names = sorted(path.name for path in (tmp_path / "frames").iterdir())
    assert names == [f"{index:05d}.png" for index in range(5)]
    pipe = Pipeline.load(tiny_lcm_bundle, backend="onnxruntime")
    expected = list(pipe.stream("a cat", strength=0.5, seed=0).run(decoded))
    for name, image in zip(names, expected, strict=True):  # batched (CLI) against unbatched (library)
        written = iio.imread(tmp_path / "frames" / name).astype(np.int16)
        assert np.abs(written - (image * 255).round()).max() <= 1  # at most one level of 255 from rounding

    result = run_cli(tiny_lcm_bundle, "a cat", "--stream", video, "--output", tmp_path / "out.mp4", "--steps", "2")
    assert result.returncode == 0, result.stderr
    assert iio.immeta(tmp_path / "out.mp4")["fps"] == 12.0
    styled = [frame.astype(np.float32) / 255 for frame in iio.imiter(tmp_path / "out.mp4")]
    reference = list(pipe.stream("a cat", strength=0.5, num_inference_steps=2, seed=0).run(decoded))
    assert len(styled) == 5 and styled[0].shape == (32, 32, 3)
    # H.264 (yuv420p, chroma at half resolution) moves these frames by more than the tiny model's frames differ
    # from each other; the same frames written by the same writer decode to the same pixels, in the same order.
    from lcm_export.runtime.cli import VideoWriter

    writer = VideoWriter(tmp_path / "reference.mp4", 12.0)
    for image in reference:
        writer.append(image)
    writer.close()
    expected_video = [frame.astype(np.float32) / 255 for frame in iio.imiter(tmp_path / "reference.mp4")]
    errors = [float(np.abs(a - b).max()) for a, b in zip(styled, expected_video, strict=True)]
    lossy = max(float(np.abs(a - b).mean()) for a, b in zip(styled, reference, strict=True))
    print(f"mp4 out vs the stream's frames written alike: max abs {max(errors):.2e} (H.264 itself: mean {lossy:.3f})")
    assert max(errors) <= 1 / 255 and lossy < 0.1
    assert not [path.name for path in tmp_path.iterdir() if "partial" in path.name]


def test_cli_streams_a_gif_without_ffmpeg(tiny_lcm_bundle, tmp_path) -> None:
    """GIF goes through Pillow: it works with imageio-ffmpeg absent. A failed run leaves no partial video."""
    iio = pytest.importorskip("imageio.v3")
    gif = tmp_path / "in.gif"
    write_video(gif, make_frames(3))
    result = run_cli(
        tiny_lcm_bundle, "a cat", "--stream", gif, "--output", tmp_path / "out.gif", blocked=("imageio_ffmpeg",)
    )
    assert result.returncode == 0, result.stderr
    frames = list(iio.imiter(tmp_path / "out.gif"))
    assert len(frames) == 3 and frames[0].shape[:2] == (32, 32)
    assert iio.immeta(tmp_path / "out.gif")["duration"] == 100

    # A folder of frames into a GIF; a frame of another size mid-stream: one line, and no video left behind.
    folder = tmp_path / "frames"
    folder.mkdir()
    for index, frame in enumerate([*make_frames(2), make_frames(1, 64)[0]]):
        iio.imwrite(folder / f"{index:03d}.png", (frame * 255).round().astype(np.uint8))
    result = run_cli(tiny_lcm_bundle, "a cat", "--stream", folder, "--output", tmp_path / "cut.gif", "--batch-steps")
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    assert result.stderr.strip().startswith("error: frame 3 is 64x64 but the stream started at 32x32")
    assert sorted(path.name for path in tmp_path.iterdir()) == ["frames", "in.gif", "out.gif"]


def test_cli_video_without_imageio_is_one_line(tiny_lcm_bundle, tmp_path) -> None:
    video = tmp_path / "in.mp4"
    video.write_bytes(b"\x00" * 64)
    for blocked, package in (
        (("imageio", "imageio.v3", "imageio.v2"), "imageio"),
        (("imageio_ffmpeg",), "imageio-ffmpeg"),
    ):
        result = run_cli(tiny_lcm_bundle, "a cat", "--stream", video, "--output", tmp_path / "out", blocked=blocked)
        assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
        assert result.stderr.strip() == (
            f"error: --stream '{video}' is a video, which needs {package}: pip install imageio imageio-ffmpeg "
            "(or pass a folder of frames)"
        )
        assert not (tmp_path / "out").exists()
