"""``lcm-export MODEL --target onnx|tensorrt|coreml|web --output DIR``: builds an :class:`ExportConfig`."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from lcm_export.errors import ExportError, run_cli


def parse_lora(value: str):
    """``PATH_OR_ID[:WEIGHT]`` -> LoraSource; the weight must be a number."""
    from lcm_export.exporter.bundle import LoraSource

    source, weight = value, 1.0
    head, separator, tail = value.rpartition(":")
    if separator and head and not (len(head) == 1 and head.isalpha()):  # not a Windows drive letter
        try:
            weight = float(tail)
        except ValueError:
            raise ExportError(
                f"--lora '{value}': weight '{tail}' is not a number: use PATH_OR_ID or PATH_OR_ID:WEIGHT (e.g. :0.5)"
            ) from None
        source = head
    return LoraSource(source, weight)


def _size_triple(name: str, value: str) -> tuple[int, int, int]:
    """``N`` -> (N, N, N); ``MIN:OPT:MAX`` -> that range."""
    try:
        parts = [int(part) for part in value.split(":")]
    except ValueError:
        raise ExportError(f"--{name} '{value}': pass an integer or MIN:OPT:MAX") from None
    if len(parts) == 1:
        parts *= 3
    if len(parts) != 3 or not 0 < parts[0] <= parts[1] <= parts[2]:
        raise ExportError(f"--{name} '{value}': pass an integer or MIN:OPT:MAX with 0 < MIN <= OPT <= MAX")
    return parts[0], parts[1], parts[2]


def read_prompts(path: Path) -> tuple[str, ...]:
    """``--calibration-prompts FILE``: one prompt per line, blank lines skipped."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        reason = getattr(error, "strerror", None) or type(error).__name__
        raise ExportError(f"--calibration-prompts '{path}' cannot be read ({reason}): pass a UTF-8 text file") from None
    return tuple(line.strip() for line in text.splitlines() if line.strip())


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lcm-export",
        description="Export a Latent Consistency Model (or base SD + LCM-LoRA) into a runnable bundle.",
    )
    parser.add_argument(
        "model",
        help="diffusers pipeline folder, hub id, or a built-in tiny model: builtin:tiny-lcm, builtin:tiny-sd, "
        "builtin:tiny-sdxl-lcm, builtin:tiny-sdxl",
    )
    parser.add_argument("--output", "-o", required=True, type=Path, help="bundle folder to write")
    parser.add_argument("--target", default="onnx", help="onnx (default), tensorrt, coreml or web")
    parser.add_argument(
        "--precision",
        default=None,
        help="fp32, fp16 (a VAE whose config sets force_upcast stays fp32, as in diffusers) or int8 (U-Net "
        "calibrated on LCM trajectories; onnx and tensorrt); default fp32 for onnx, fp16 for tensorrt/coreml",
    )
    parser.add_argument(
        "--lora",
        action="append",
        default=[],
        metavar="PATH_OR_ID[:WEIGHT]",
        help="LoRA to fuse into the U-Net (repeatable; weight defaults to 1.0)",
    )
    parser.add_argument(
        "--controlnet",
        action="append",
        default=[],
        metavar="CN[:SCALE]",
        help="a diffusers ControlNetModel folder or hub id, and its default conditioning scale (repeatable: several "
        "ControlNets); the bundle's U-Net then takes their residuals",
    )
    parser.add_argument("--max-steps", type=int, default=8, help="precompute LCM schedules for 1..N steps")
    parser.add_argument("--opset", type=int, default=17)
    parser.add_argument("--no-vae-encoder", action="store_true", help="skip the VAE encoder (text-to-image only)")
    parser.add_argument("--height", default=None, help="engine height: N or MIN:OPT:MAX (default: model size)")
    parser.add_argument("--width", default=None, help="engine width: N or MIN:OPT:MAX (default: model size)")
    parser.add_argument("--batch", default="1", help="engine images per call: N or MIN:OPT:MAX (default 1)")
    parser.add_argument(
        "--dynamic", action="store_true", help="engines accept a range of shapes: batch 1-4, 0.5x-1.5x the default size"
    )
    parser.add_argument(
        "--tiny-vae",
        default=None,
        metavar="PATH",
        help="AutoencoderTiny (TAESD) folder whose decoder replaces the VAE decoder",
    )
    parser.add_argument(
        "--vae",
        default=None,
        metavar="PATH",
        help="AutoencoderKL folder (or hub id) replacing the pipeline's VAE, e.g. madebyollin/sdxl-vae-fp16-fix",
    )
    parser.add_argument(
        "--attention-slicing",
        dest="attention_slicing",
        action="store_const",
        const=True,
        default=None,
        help="U-Net attention one head at a time in every layer: less memory at large sizes on CPUs (ONNX "
        "backends; INT8 on --target onnx slices the layers with the largest scores by default)",
    )
    parser.add_argument(
        "--no-attention-slicing",
        dest="attention_slicing",
        action="store_const",
        const=False,
        help="no layer sliced, not even INT8's default ones",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace an existing bundle folder")
    int8 = parser.add_argument_group("INT8 (--precision int8)")
    int8.add_argument(
        "--calibration-prompts",
        type=Path,
        default=None,
        metavar="FILE",
        help="prompts, one per line (default: shipped)",
    )
    int8.add_argument("--calibration-size", type=int, default=None, metavar="N", help="prompts to use (default 8)")
    int8.add_argument(
        "--calibration-resolution",
        type=int,
        default=None,
        metavar="PX",
        help="square size the calibration trajectories run at (default: the model's up to 256, half of it above)",
    )
    int8.add_argument("--keep-fp32", action="store_true", help="keep the float U-Net beside the INT8 one")
    int8.add_argument(
        "--int8-text-encoders",
        dest="int8_text_encoders",
        action="store_const",
        const=True,
        default=None,
        help="the text encoders' weights as int8 (weight-only, per channel; the default with --target onnx): "
        "SDXL's second encoder in 0.9 GB instead of 2.8",
    )
    int8.add_argument(
        "--float-text-encoders",
        dest="int8_text_encoders",
        action="store_const",
        const=False,
        help="keep the text encoders' weights float in an INT8 bundle",
    )
    parser.add_argument("--quiet", "-q", action="store_true", help="no progress bars")
    trt = parser.add_argument_group("TensorRT")
    trt.add_argument("--trt-flavor", default="auto", help="auto, tensorrt or rtx (TensorRT for RTX)")
    trt.add_argument(
        "--compute-capability",
        action="append",
        default=[],
        metavar="SM",
        help="TensorRT-RTX target GPUs, e.g. 86 or SM89 (repeatable; default: the builder's)",
    )
    trt.add_argument("--builder-optimization-level", type=int, default=3)
    trt.add_argument("--workspace", default=None, help="builder workspace limit, e.g. 4GiB")
    trt.add_argument("--timing-cache", type=Path, default=None, help="timing cache file (read and updated)")
    trt.add_argument("--keep-onnx", action="store_true", help="keep the ONNX the engines were built from")
    trt.add_argument(
        "--trt-refit",
        action="store_true",
        help="build refittable engines (and keep their ONNX as the weights' source): run-time adapters refit them",
    )
    return parser


def config_from_args(args: argparse.Namespace):
    from lcm_export.exporter.bundle import DEFAULT_COMPONENTS, ExportConfig
    from lcm_export.exporter.controlnet import ControlNetSource

    components = tuple(c for c in DEFAULT_COMPONENTS if not (args.no_vae_encoder and c == "vae_encoder"))
    return ExportConfig(
        model=args.model,
        output=args.output,
        target=args.target,
        precision=args.precision,
        loras=tuple(parse_lora(value) for value in args.lora),
        controlnets=tuple(ControlNetSource.parse(value) for value in args.controlnet),
        components=components,
        max_steps=args.max_steps,
        opset=args.opset,
        batch=_size_triple("batch", args.batch),
        height=_size_triple("height", args.height) if args.height else None,
        width=_size_triple("width", args.width) if args.width else None,
        dynamic=args.dynamic,
        tiny_vae=args.tiny_vae,
        vae=args.vae,
        overwrite=args.overwrite,
        calibration_prompts=read_prompts(args.calibration_prompts) if args.calibration_prompts else None,
        calibration_size=args.calibration_size,
        calibration_resolution=args.calibration_resolution,
        keep_fp32=args.keep_fp32,
        int8_text_encoders=args.int8_text_encoders,
        attention_slicing=args.attention_slicing,
        quiet=args.quiet,
        target_options={
            "trt_flavor": args.trt_flavor,
            "compute_capabilities": tuple(args.compute_capability),
            "builder_optimization_level": args.builder_optimization_level,
            "workspace": args.workspace,
            "timing_cache": args.timing_cache,
            "keep_onnx": args.keep_onnx,
            "refit": args.trt_refit,
        },
    )


def require_export_extra() -> None:
    """The exporter needs torch and diffusers; the plain ``pip install lcm-edge`` only has the runtime."""
    import importlib.util

    missing = [
        name for name in ("torch", "diffusers", "transformers", "onnx") if importlib.util.find_spec(name) is None
    ]
    if missing:
        raise ExportError(
            f"the exporter needs {', '.join(missing)}: pip install torch==2.13.0 'lcm-edge[export]' "
            "(torch first, pinned, to get the CPU build)"
        )


def build_adapter_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lcm-export adapter",
        description="Turn a LoRA into a small adapter file that the runtime applies to BUNDLE without re-export.",
    )
    parser.add_argument("lora", metavar="LORA", help="LoRA .safetensors file (diffusers/peft or kohya), or a hub id")
    parser.add_argument("--bundle", required=True, type=Path, help="the bundle the adapter is made for")
    parser.add_argument("--output", "-o", required=True, type=Path, help="adapter file to write (.safetensors)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing file")
    parser.add_argument("--quiet", "-q", action="store_true")
    return parser


def adapter_main(argv: list[str]) -> int:
    """``lcm-export adapter``: see :mod:`lcm_export.exporter.adapter`."""
    args = build_adapter_parser().parse_args(argv)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    require_export_extra()
    from lcm_export.exporter.adapter import make_adapter
    from lcm_export.exporter.bundle import LoraSource

    summary = make_adapter(LoraSource(args.lora), args.bundle, args.output, overwrite=args.overwrite)
    if not args.quiet:
        layers = ", ".join(f"{name} {count}" for name, count in summary["layers"].items())
        ranks = ", ".join(map(str, summary["ranks"]))
        size = summary["size_bytes"] / 1e6
        print(f"adapter written to {args.output} ({size:.2f} MB; layers: {layers}; rank {ranks})")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["adapter"]:  # a model folder named "adapter": pass ./adapter
        return adapter_main(argv[1:])
    args = build_parser().parse_args(argv)
    # Library chatter (e.g. transformers' note that torchvision is absent) is not ours to print; errors are.
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    if args.quiet:
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    require_export_extra()
    config = config_from_args(args)
    from lcm_export.exporter.bundle import export_bundle

    manifest = export_bundle(config)
    if not args.quiet:
        for name, component in manifest.components.items():
            errors = component.validation.get("max_abs_error", {})
            worst = max(errors.values()) if errors else float("nan")
            formats = ", ".join(component.artifacts)
            print(f"  {name:<13} {formats:<16} ONNX max abs vs PyTorch {worst:.2e}")
        int8 = next((v for v in manifest.components["unet"].variants if v.precision == "int8"), None)
        if int8 is not None and "quality" in int8.details:
            from lcm_export.calibration.int8 import COMPONENT_LABELS

            quality = int8.details["quality"]
            quantised = " and ".join(
                label
                for name, label in COMPONENT_LABELS.items()
                if name in manifest.components
                and any(v.precision == "int8" for v in manifest.components[name].variants)
            )
            print(f"  INT8 {quantised} vs float, final images at {quality['size'][1]}x{quality['size'][0]}:")
            for label, per_guidance in quality["sets"].items():
                for guidance, scores in per_guidance.items():
                    print(
                        f"    {label:<12} guidance {guidance:<4} PSNR {scores['psnr_db_mean']:6.2f} dB "
                        f"(min {scores['psnr_db_min']:.2f})  SSIM {scores['ssim_mean']:.4f}"
                    )
        print(f"bundle written to {config.output} (target {manifest.target}, {manifest.precision})")
    return 0


def entry_point() -> None:
    sys.exit(run_cli(main))


if __name__ == "__main__":
    entry_point()
