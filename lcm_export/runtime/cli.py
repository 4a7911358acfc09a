"""``lcm-run BUNDLE "prompt"``: generate an image from a bundle, optionally profiling every stage;
``lcm-run serve BUNDLE``: the bundle in a browser page (:mod:`lcm_export.runtime.serve`)."""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from lcm_export.errors import UserError, is_disk_full, run_cli
from lcm_export.runtime.adapters import ADAPTER_MODES


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lcm-run",
        description="Run an lcm-export bundle (no torch needed). `lcm-run serve BUNDLE` serves it in a browser page.",
    )
    parser.add_argument("bundle", type=Path, help="bundle folder written by lcm-export")
    parser.add_argument("prompt", help="text prompt")
    parser.add_argument("--negative-prompt", default=None, help="negative prompt (CFG bundles, guidance > 1)")
    parser.add_argument("--steps", type=int, default=4, help="LCM steps (default 4)")
    parser.add_argument(
        "--guidance",
        type=float,
        default=None,
        help="guidance scale (default: the bundle's, 8.5 for distilled LCMs, 1.0 for LCM-LoRA)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--height", type=int, default=None)
    parser.add_argument("--width", type=int, default=None)
    parser.add_argument("--num-images", type=int, default=1, help="images per prompt")
    parser.add_argument("--output", "-o", type=Path, default=Path("out.png"), help="PNG path (index added for >1)")
    parser.add_argument("--backend", default="auto", help="auto, onnxruntime, openvino, tensorrt or coreml")
    parser.add_argument(
        "--variant",
        default="auto",
        help="which stored weights run: auto (the bundle's preferred, e.g. INT8 where exported), fp32, fp16 or int8",
    )
    parser.add_argument(
        "--precision",
        default="auto",
        help="how float graphs compute: auto (the device's fastest float, e.g. bf16 in OpenVINO), fp32 (parity), "
        "bf16 or fp16 where the backend runs them",
    )
    parser.add_argument("--device", default="auto", help="the backend's device (default: auto)")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: all cores)")
    parser.add_argument(
        "--low-memory",
        action="store_true",
        help="give each stage's working memory back after it runs: lower peak memory, a few %% slower",
    )
    parser.add_argument(
        "--adapter",
        action="append",
        default=[],
        metavar="FILE[:WEIGHT]",
        help="run-time adapter (lcm-export adapter) at WEIGHT (default 1.0); repeatable: adapters mix",
    )
    parser.add_argument(
        "--adapter-mode",
        choices=ADAPTER_MODES,
        default="auto",
        help="how adapters run: LoRA factors fed to branches (instant switch, per call about the factors' share), "
        "merged weights fed as inputs (switch = the merge) or rebuilt into the sessions (no cost per call); "
        "auto: factors for small adapters, else inputs where the backend and variant allow it, else rebuild",
    )
    parser.add_argument("--quiet", "-q", action="store_true")
    image = parser.add_argument_group("image-to-image")
    image.add_argument("--image", type=Path, default=None, help="input image (PNG, JPEG, ...): image-to-image")
    image.add_argument("--strength", type=float, default=0.5, help="how much of the image is replaced, (0, 1]")
    image.add_argument(
        "--stream",
        type=Path,
        default=None,
        metavar="DIR_OR_VIDEO",
        help="a folder of frames (one size) or a video (.mp4, .gif, ...: needs imageio), each frame styled in turn "
        "into --output (a folder, or a video file); reports frames/s and latency per frame",
    )
    image.add_argument(
        "--batch-steps",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="with --stream: batch the denoising steps of consecutive frames in one U-Net call (StreamDiffusion's "
        "step batching: N frames in flight, N-1 frames more latency; off by default: on a small CPU it gains "
        "little throughput for much more latency, see docs/design-notes.md)",
    )
    control = parser.add_argument_group("ControlNet (bundles exported with --controlnet)")
    control.add_argument(
        "--control-image",
        type=Path,
        action="append",
        default=[],
        metavar="FILE",
        help="control image, the output's size (repeatable: one per ControlNet, in the bundle's order)",
    )
    control.add_argument(
        "--control-scale",
        type=float,
        action="append",
        default=[],
        metavar="S",
        help="conditioning scale (one for all, or one per ControlNet; default: the bundle's)",
    )
    control.add_argument(
        "--control-preprocess",
        choices=("canny",),
        default=None,
        help="canny: the Canny edge map of each control image (with --stream and no --control-image: of each "
        "frame) is the control image; needs OpenCV (pip install 'lcm-edge[canny]')",
    )
    profile = parser.add_argument_group(
        "profiling (--profile: time every stage over repeated runs; --output gets the last run's image)"
    )
    profile.add_argument("--profile", action="store_true", help="profile latency per stage and print a table")
    profile.add_argument("--runs", type=int, default=None, help="timed runs (default 5)")
    profile.add_argument("--warmup", type=int, default=None, help="untimed warm-up runs first (default 1)")
    profile.add_argument("--json", type=Path, default=None, help="write the full profile report as JSON")
    profile.add_argument("--chart", type=Path, default=None, help="write a PNG chart of the median per stage")
    profile.add_argument(
        "--backend-profile",
        type=Path,
        default=None,
        metavar="DIR",
        help="also write the backend's own profile into DIR (onnxruntime trace, OpenVINO per-layer times)",
    )
    return parser


def check_output_writable(output: Path) -> None:
    """Fail before any work when ``--output`` cannot be written: its nearest existing folder must take a file.

    Nothing is created here: the folders are made when the image is saved.
    """
    import tempfile

    if output.is_dir():
        raise UserError(f"--output '{output}' is a folder: give a .png file name")
    folder = output.parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    try:
        if not folder.is_dir():
            raise NotADirectoryError(f"'{folder}' is a file")
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".lcm-run-check-"):
            pass
    except OSError as error:
        reason = error.strerror or str(error)
        raise UserError(f"--output '{output}' cannot be written ({reason}): pass a path in a writable folder") from None


def save_images(images: np.ndarray, output: Path) -> list[Path]:
    """Write (N, H, W, 3) floats in [0, 1] as PNG files; returns their paths.

    Each file is written beside its final name and renamed into place, so a failure leaves no partial PNG.
    """
    from PIL import Image

    paths = []
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
        for index, image in enumerate(images):
            path = output if len(images) == 1 else output.with_name(f"{output.stem}-{index}{output.suffix}")
            partial = path.with_name(f".{path.name}.partial")
            try:
                Image.fromarray((image * 255).round().astype(np.uint8)).save(partial, format="PNG")
                partial.replace(path)
            finally:
                partial.unlink(missing_ok=True)
            paths.append(path)
    except OSError as error:
        raise write_error("--output", output, error) from None
    return paths


def write_error(flag: str, path: Path, error: BaseException) -> UserError:
    """The one line for ``flag``'s ``path`` not written: a full disk says to free space, anything else to pick a
    writable folder."""
    if is_disk_full(error):
        return UserError(
            f"{flag} '{path}' could not be written (No space left on device): free space there or pass another path"
        )
    reason = getattr(error, "strerror", None) or str(error)
    return UserError(f"{flag} '{path}' could not be written ({reason}): pass a path in a writable folder")


def write_beside(flag: str, path: Path, write: Callable[[Path], Any]) -> None:
    """``write`` a file to a hidden name beside ``path`` (same suffix: writers pick the format from it) and rename
    it into place: a failure (a full disk) is one line naming ``flag`` and leaves no partial file."""
    partial = path.with_name(f".{path.stem}.partial{path.suffix}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write(partial)
        partial.replace(path)
    except OSError as error:
        raise write_error(flag, path, error) from None
    finally:
        partial.unlink(missing_ok=True)


def remove_new_files(folder: Path, before: set[str]) -> None:
    """Remove what a failed run wrote into ``folder`` (the names not in ``before``), and the folder itself when it
    was new and is left empty."""
    import shutil

    if not folder.is_dir():
        return
    for path in folder.iterdir():
        if path.name in before:
            continue
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
    if not before and not any(folder.iterdir()):
        folder.rmdir()


def parse_adapters(values: list[str]) -> dict[str, float]:
    """``--adapter FILE[:WEIGHT]`` flags -> {FILE: WEIGHT} (the weight checked again by set_adapters)."""
    adapters: dict[str, float] = {}
    for value in values:
        path, separator, tail = value.rpartition(":")
        if not separator or not path or (len(path) == 1 and path.isalpha()):  # no weight, or a Windows drive
            path, tail = value, "1"
        try:
            weight = float(tail)
        except ValueError:
            raise UserError(f"--adapter '{value}': weight '{tail}' is not a number: use FILE or FILE:WEIGHT") from None
        if not math.isfinite(weight):
            raise UserError(f"--adapter '{value}': weight '{tail}' is not a finite number: pass e.g. FILE:0.8")
        adapters[path] = weight
    return adapters


def load_options(args: argparse.Namespace) -> dict[str, Any]:
    """The flags that go to :meth:`Pipeline.load`, checked there against the chosen backend."""
    return dict(
        backend=args.backend,
        variant=args.variant,
        precision=args.precision,
        device=args.device,
        threads=args.threads,
        low_memory=args.low_memory,
    )


def control_arguments(args: argparse.Namespace, pipe: Any, *, stream: bool = False) -> dict[str, Any]:
    """The pipeline's ControlNet keyword arguments for ``--control-image`` / ``--control-scale`` /
    ``--control-preprocess`` (none when no flag is given)."""
    from lcm_export.runtime.control import canny_edges

    images: list[Any] = list(args.control_image)
    if not images and not args.control_scale and args.control_preprocess is None:
        return {}
    if pipe.manifest.controlnet is None:
        flag = "--control-image" if images else ("--control-scale" if args.control_scale else "--control-preprocess")
        raise UserError(
            f"{flag}: BUNDLE '{args.bundle}' has no ControlNet: re-export it with --controlnet CN, or drop {flag}"
        )
    if args.control_preprocess == "canny":
        if images:
            images = [canny_edges(image) for image in images]
        elif stream:
            count = len(pipe.manifest.controlnet.models)
            images = [canny_edges] * count  # a function of each frame
        else:
            raise UserError("--control-preprocess canny needs --control-image FILE (or --stream: of each frame)")
    if not images:
        raise UserError("--control-scale applies to a control image: add --control-image FILE")
    scale = args.control_scale[0] if len(args.control_scale) == 1 else (args.control_scale or None)
    return {"control_image": images if len(images) > 1 else images[0], "controlnet_conditioning_scale": scale}


def run_profile(args: argparse.Namespace) -> int:
    """``--profile``: hand the flags to :func:`profile_bundle`, print its table, write the JSON and the chart."""
    from lcm_export.runtime.profile import profile_bundle

    if args.chart is not None and args.chart.suffix.lower() != ".png":
        raise UserError(f"--chart '{args.chart}': give a .png file name")
    profile_dir = args.backend_profile
    existing = {path.name for path in profile_dir.iterdir()} if profile_dir and profile_dir.is_dir() else set()
    try:
        report = profile_bundle(
            args.bundle,
            args.prompt,
            runs=5 if args.runs is None else args.runs,
            warmup=1 if args.warmup is None else args.warmup,
            **load_options(args),
            height=args.height,
            width=args.width,
            steps=args.steps,
            guidance=args.guidance,
            seed=args.seed,
            negative_prompt=args.negative_prompt,
            profiling_dir=args.backend_profile,
            progress=None if args.quiet else lambda message: print(message, file=sys.stderr, flush=True),
        )
    except Exception as error:  # the backend's trace on a full disk: one line, its partial files removed
        if profile_dir is None or isinstance(error, UserError) or not is_disk_full(error):
            raise
        remove_new_files(profile_dir, existing)
        raise write_error("--backend-profile", profile_dir, error) from None
    print(report.format_table())
    if report.images is not None:
        paths = save_images(report.images, args.output)
        if not args.quiet:
            print(f"last run's image: {', '.join(map(str, paths))}", file=sys.stderr)
    if args.json is not None:
        write_beside("--json", args.json, report.write_json)
    if args.chart is not None:
        write_beside("--chart", args.chart, report.write_chart)
    return 0


def main(argv: list[str] | None = None) -> int:
    arguments = sys.argv[1:] if argv is None else list(argv)
    if arguments[:1] == ["serve"]:  # `lcm-run serve BUNDLE`: a browser page (a bundle folder named serve: ./serve)
        from lcm_export.runtime.serve import serve

        return serve(arguments[1:])
    args = build_parser().parse_args(arguments)
    if args.stream is not None:
        return run_stream(args)
    if args.batch_steps is not None:
        raise UserError("--batch-steps applies to a frame loop: add --stream DIR_OR_VIDEO")
    if args.output.suffix.lower() != ".png":
        raise UserError(f"--output '{args.output}': give a .png file name")
    check_output_writable(args.output)
    if args.profile:
        return run_profile(args)
    for flag, value in (("--runs", args.runs), ("--warmup", args.warmup), ("--json", args.json)):
        if value is not None:
            raise UserError(f"{flag} applies to profiling: add --profile")
    for flag, value in (("--chart", args.chart), ("--backend-profile", args.backend_profile)):
        if value is not None:
            raise UserError(f"{flag} applies to profiling: add --profile")
    from lcm_export.runtime.pipeline import Pipeline

    pipe = Pipeline.load(
        args.bundle, **load_options(args), adapters=parse_adapters(args.adapter), adapter_mode=args.adapter_mode
    )
    common = dict(
        negative_prompt=args.negative_prompt,
        num_inference_steps=args.steps,
        guidance_scale=args.guidance,
        num_images_per_prompt=args.num_images,
        seed=args.seed,
    )
    if args.image is not None:
        for flag, value in (("--height", args.height), ("--width", args.width)):
            if value is not None:
                raise UserError(f"{flag} does not apply with --image: the image's own size is used")
        result = pipe.img2img(
            args.image, args.prompt, strength=args.strength, **common, **control_arguments(args, pipe)
        )
    else:
        result = pipe(args.prompt, height=args.height, width=args.width, **common, **control_arguments(args, pipe))
    paths = save_images(result.images, args.output)
    if not args.quiet:
        timings = result.timings
        unet = sum(timings["unet"])
        print(
            f"{', '.join(map(str, paths))}: {result.images.shape[2]}x{result.images.shape[1]}, "
            f"{args.steps} steps on {pipe.backend} in {timings['total']:.3f}s "
            f"(text {timings['text_encoder']:.3f}s, U-Net {unet:.3f}s, VAE {timings['vae_decode']:.3f}s); "
            f"variants: {pipe.variant_summary()}"
        )
    return 0


FRAME_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
# Videos read and written with imageio: GIF through Pillow, the others through imageio-ffmpeg's own ffmpeg.
VIDEO_SUFFIXES = (".mp4", ".mov", ".mkv", ".webm", ".avi", ".gif")
DEFAULT_FRAME_RATE = 24.0  # of an output video made from a folder of frames (a video keeps its own rate)


def _imageio(flag: str, path: Path) -> Any:
    """imageio's v3 API, or a one-line error saying what to install (video is an optional extra)."""
    try:
        import imageio.v3 as iio

        if path.suffix.lower() != ".gif":
            import imageio_ffmpeg  # noqa: F401  (the ffmpeg binary imageio uses for these formats)
    except ImportError as error:
        package = "imageio" if "imageio_ffmpeg" not in str(error) else "imageio-ffmpeg"
        raise UserError(
            f"{flag} '{path}' is a video, which needs {package}: pip install imageio imageio-ffmpeg (or pass a "
            "folder of frames)"
        ) from None
    return iio


class VideoFrames:
    """The frames of a video file, read one at a time with imageio as (H, W, 3) uint8, and its frame rate."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.iio = _imageio("--stream", path)
        try:
            meta = self.iio.immeta(path)
        except Exception as error:  # imageio raises OSError, ValueError or its plugins' own errors
            raise UserError(self._unreadable(error)) from None
        if meta.get("fps"):
            self.frame_rate = float(meta["fps"])
        elif meta.get("duration"):  # a GIF: milliseconds per frame
            self.frame_rate = 1000.0 / float(meta["duration"])
        else:
            self.frame_rate = DEFAULT_FRAME_RATE

    def _unreadable(self, error: BaseException) -> str:
        return (
            f"--stream '{self.path}' is not a video imageio can read ({type(error).__name__}): pass a video file "
            f"({', '.join(VIDEO_SUFFIXES)}) or a folder of frames"
        )

    def __iter__(self) -> Iterator[np.ndarray]:
        frames = iter(self.iio.imiter(self.path))
        while True:
            try:
                frame = next(frames)
            except StopIteration:
                return
            except Exception as error:
                raise UserError(self._unreadable(error)) from None
            frame = np.asarray(frame)
            if frame.ndim == 2:  # grey
                frame = np.repeat(frame[:, :, None], 3, axis=2)
            yield np.ascontiguousarray(frame[:, :, :3])  # an alpha channel dropped


class VideoWriter:
    """Frames appended to a video written beside ``path`` and renamed into place by ``close`` (a failed run leaves
    no partial video: ``discard`` removes it)."""

    def __init__(self, path: Path, frame_rate: float) -> None:
        import imageio.v2 as iio2

        _imageio("--output", path)
        self.path = path
        self.partial = path.with_name(f".{path.stem}.partial{path.suffix}")  # the suffix tells imageio the format
        if path.suffix.lower() == ".gif":
            options: dict[str, Any] = {"mode": "I", "duration": 1000.0 / frame_rate, "loop": 0}
        else:  # ffmpeg: keep the size (no padding to 16) and the best quality
            options = {"fps": frame_rate, "macro_block_size": 1, "quality": 10}
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            self.writer = iio2.get_writer(self.partial, **options)
        except OSError as error:
            raise UserError(
                f"--output '{path}' could not be written ({error.strerror or error}): pass a path in a writable folder"
            ) from None
        self.frames = 0

    def append(self, image: np.ndarray) -> None:
        self.writer.append_data((image * 255).round().astype(np.uint8))
        self.frames += 1

    def close(self) -> None:
        self.writer.close()
        self.partial.replace(self.path)

    def discard(self) -> None:
        try:
            self.writer.close()
        except Exception:  # a writer that failed may fail again on close: the partial file goes regardless
            pass
        self.partial.unlink(missing_ok=True)


def _stream_source(stream: Path) -> tuple[list[Path] | VideoFrames, float]:
    """``--stream``'s frames (a sorted list of image files, or a video read lazily) and their frame rate."""
    if stream.is_dir():
        frames = sorted(path for path in stream.iterdir() if path.suffix.lower() in FRAME_SUFFIXES)
        if not frames:
            raise UserError(f"--stream '{stream}' holds no frames ({', '.join(FRAME_SUFFIXES)})")
        return frames, DEFAULT_FRAME_RATE
    if stream.suffix.lower() in VIDEO_SUFFIXES:
        if not stream.is_file():
            raise UserError(f"--stream '{stream}' does not exist: pass a video file or a folder of frames")
        video = VideoFrames(stream)
        return video, video.frame_rate
    raise UserError(
        f"--stream '{stream}' is not a folder or a video ({', '.join(VIDEO_SUFFIXES)}): pass a folder of frames "
        "(PNG, JPEG, ...) or a video file"
    )


def run_stream(args: argparse.Namespace) -> int:
    """``--stream DIR_OR_VIDEO --output DIR_OR_VIDEO``: every frame through one ``Pipeline.stream``, in order;
    frames/s and latency per frame (median, p90)."""
    from lcm_export.runtime.pipeline import Pipeline

    if args.image is not None:
        raise UserError("--image and --stream are two modes: pass one (a folder of frames or a video is --stream)")
    output = args.output
    video_output = output.suffix.lower() in VIDEO_SUFFIXES
    if output.suffix and not video_output:
        raise UserError(
            f"--output '{output}': with --stream pass a folder for the styled frames or a video file "
            f"({', '.join(VIDEO_SUFFIXES)})"
        )
    if video_output:
        if output.is_dir():
            raise UserError(f"--output '{output}' is a folder: give a video file name, or a folder name without suffix")
        _imageio("--output", output)
    elif output.exists() and not output.is_dir():
        raise UserError(f"--output '{output}' is a file: pass a folder")
    frames, frame_rate = _stream_source(args.stream)
    check_output_writable(output if video_output else output / "frame.png")
    pipe = Pipeline.load(
        args.bundle, **load_options(args), adapters=parse_adapters(args.adapter), adapter_mode=args.adapter_mode
    )
    stream = pipe.stream(
        args.prompt,
        strength=args.strength,
        num_inference_steps=args.steps,
        guidance_scale=args.guidance,
        negative_prompt=args.negative_prompt,
        seed=args.seed,
        batch_steps=args.batch_steps,
        **control_arguments(args, pipe, stream=True),
    )
    names = (f"{frame.stem}.png" for frame in frames) if isinstance(frames, list) else None
    writer = VideoWriter(output, frame_rate) if video_output else None
    count = 0
    try:
        for image in stream.run(frames):
            if writer is not None:
                writer.append(image)
            else:
                save_images(image[None], output / (next(names) if names else f"{count:05d}.png"))
            count += 1
        if count == 0:
            raise UserError(f"--stream '{args.stream}' holds no frames: pass a video with at least one frame")
        if writer is not None:
            writer.close()
    except BaseException as error:
        if writer is not None:
            writer.discard()
            if isinstance(error, Exception) and not isinstance(error, UserError) and is_disk_full(error):
                raise write_error("--output", output, error) from None
        raise
    if not args.quiet:
        latencies = np.array(stream.latencies)
        mode = f"step batching, {stream.steps} frames in flight" if stream.batch_steps else "no step batching"
        print(
            f"{count} frames -> {output}: {stream.frames_per_second:.2f} frames/s, latency per frame median "
            f"{np.median(latencies):.3f}s p90 {np.percentile(latencies, 90):.3f}s on {pipe.backend} "
            f"({args.steps} steps at strength {args.strength:g}, {mode}; variants: {pipe.variant_summary()})"
        )
    return 0


def entry_point() -> None:
    sys.exit(run_cli(main))


if __name__ == "__main__":
    entry_point()
