"""``lcm-run BUNDLE "prompt"``: generate an image from a bundle, optionally profiling every stage."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from lcm_export.errors import UserError, run_cli


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lcm-run", description="Run an lcm-export bundle (no torch needed).")
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
        "--precision",
        default="auto",
        help="auto (the bundle's preferred variant at the device's fastest float), fp32 (parity), int8, fp16",
    )
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: all cores)")
    parser.add_argument(
        "--low-memory",
        action="store_true",
        help="give each stage's working memory back after it runs: lower peak memory, a few %% slower",
    )
    parser.add_argument("--quiet", "-q", action="store_true")
    image = parser.add_argument_group("image-to-image")
    image.add_argument("--image", type=Path, default=None, help="input image (PNG, JPEG, ...): image-to-image")
    image.add_argument("--strength", type=float, default=0.5, help="how much of the image is replaced, (0, 1]")
    image.add_argument(
        "--stream",
        type=Path,
        default=None,
        metavar="DIR",
        help="a folder of frames (one size), each styled in turn into the --output folder; reports frames/s",
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
        reason = error.strerror or str(error)
        raise UserError(
            f"--output '{output}' could not be written ({reason}): pass a path in a writable folder"
        ) from None
    return paths


def run_profile(args: argparse.Namespace) -> int:
    """``--profile``: hand the flags to :func:`profile_bundle`, print its table, write the JSON and the chart."""
    from lcm_export.runtime.profile import profile_bundle

    if args.chart is not None and args.chart.suffix.lower() != ".png":
        raise UserError(f"--chart '{args.chart}': give a .png file name")
    report = profile_bundle(
        args.bundle,
        args.prompt,
        runs=5 if args.runs is None else args.runs,
        warmup=1 if args.warmup is None else args.warmup,
        backend=args.backend,
        precision=args.precision,
        threads=args.threads,
        low_memory=args.low_memory,
        height=args.height,
        width=args.width,
        steps=args.steps,
        guidance=args.guidance,
        seed=args.seed,
        negative_prompt=args.negative_prompt,
        profiling_dir=args.backend_profile,
        progress=None if args.quiet else lambda message: print(message, file=sys.stderr, flush=True),
    )
    print(report.format_table())
    if report.images is not None:
        paths = save_images(report.images, args.output)
        if not args.quiet:
            print(f"last run's image: {', '.join(map(str, paths))}", file=sys.stderr)
    if args.json is not None:
        report.write_json(args.json)
    if args.chart is not None:
        report.write_chart(args.chart)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.stream is not None:
        return run_stream(args)
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
        args.bundle, backend=args.backend, precision=args.precision, threads=args.threads, low_memory=args.low_memory
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
        result = pipe.img2img(args.image, args.prompt, strength=args.strength, **common)
    else:
        result = pipe(args.prompt, height=args.height, width=args.width, **common)
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


def run_stream(args: argparse.Namespace) -> int:
    """``--stream DIR --output DIR``: every frame of DIR through one ``Pipeline.stream``; frames/s and latency."""
    from lcm_export.runtime.pipeline import Pipeline

    if args.image is not None:
        raise UserError("--image and --stream are two modes: pass one (a folder of frames is --stream)")
    if not args.stream.is_dir():
        raise UserError(f"--stream '{args.stream}' is not a folder: pass a folder of frames (PNG, JPEG, ...)")
    frames = sorted(path for path in args.stream.iterdir() if path.suffix.lower() in FRAME_SUFFIXES)
    if not frames:
        raise UserError(f"--stream '{args.stream}' holds no frames ({', '.join(FRAME_SUFFIXES)})")
    if args.output.suffix:
        raise UserError(f"--output '{args.output}': with --stream pass a folder for the styled frames")
    if args.output.exists() and not args.output.is_dir():
        raise UserError(f"--output '{args.output}' is a file: pass a folder")
    check_output_writable(args.output / "frame.png")
    pipe = Pipeline.load(
        args.bundle, backend=args.backend, precision=args.precision, threads=args.threads, low_memory=args.low_memory
    )
    stream = pipe.stream(
        args.prompt,
        strength=args.strength,
        num_inference_steps=args.steps,
        guidance_scale=args.guidance,
        negative_prompt=args.negative_prompt,
        seed=args.seed,
    )
    for frame in frames:
        save_images(stream(frame)[None], args.output / f"{frame.stem}.png")
    latencies = np.array(stream.latencies[1:] or stream.latencies)  # the first frame also opens the encoder
    if not args.quiet:
        print(
            f"{len(frames)} frames -> {args.output}: {1 / latencies.mean():.2f} frames/s, latency per frame median "
            f"{np.median(latencies):.3f}s p90 {np.percentile(latencies, 90):.3f}s on {pipe.backend} "
            f"({args.steps} steps at strength {args.strength:g}; variants: {pipe.variant_summary()})"
        )
    return 0


def entry_point() -> None:
    sys.exit(run_cli(main))


if __name__ == "__main__":
    entry_point()
