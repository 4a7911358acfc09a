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
    parser.add_argument("--guidance", type=float, default=8.0, help="guidance scale (default 8.0)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--height", type=int, default=None)
    parser.add_argument("--width", type=int, default=None)
    parser.add_argument("--num-images", type=int, default=1, help="images per prompt")
    parser.add_argument("--output", "-o", type=Path, default=Path("out.png"), help="PNG path (index added for >1)")
    parser.add_argument("--backend", default="auto", help="auto, onnxruntime, openvino, tensorrt or coreml")
    parser.add_argument("--precision", default="auto", help="auto (device's fastest float) or fp32 (parity)")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: all cores)")
    parser.add_argument("--quiet", "-q", action="store_true")
    return parser


def save_images(images: np.ndarray, output: Path) -> list[Path]:
    """Write (N, H, W, 3) floats in [0, 1] as PNG files; returns their paths."""
    from PIL import Image

    output.parent.mkdir(parents=True, exist_ok=True)
    paths = []
    for index, image in enumerate(images):
        path = output if len(images) == 1 else output.with_name(f"{output.stem}-{index}{output.suffix}")
        Image.fromarray((image * 255).round().astype(np.uint8)).save(path)
        paths.append(path)
    return paths


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.output.suffix.lower() != ".png":
        raise UserError(f"--output '{args.output}': give a .png file name")
    from lcm_export.runtime.pipeline import Pipeline

    pipe = Pipeline.load(args.bundle, backend=args.backend, precision=args.precision, threads=args.threads)
    result = pipe(
        args.prompt,
        negative_prompt=args.negative_prompt,
        num_inference_steps=args.steps,
        guidance_scale=args.guidance,
        num_images_per_prompt=args.num_images,
        height=args.height,
        width=args.width,
        seed=args.seed,
    )
    paths = save_images(result.images, args.output)
    if not args.quiet:
        timings = result.timings
        unet = sum(timings["unet"])
        print(
            f"{', '.join(map(str, paths))}: {result.images.shape[2]}x{result.images.shape[1]}, "
            f"{args.steps} steps on {pipe.backend} in {timings['total']:.3f}s "
            f"(text {timings['text_encoder']:.3f}s, U-Net {unet:.3f}s, VAE {timings['vae_decode']:.3f}s)"
        )
    return 0


def entry_point() -> None:
    sys.exit(run_cli(main))


if __name__ == "__main__":
    entry_point()
