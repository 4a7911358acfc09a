"""ControlNet benchmark: our fast INT8 mode with a ControlNet against diffusers fp32, in one run; the frame loop.

    python bench/controlnet.py --work-dir /work/benchwork/controlnet            # 256 and 512 px, 3 rounds
    python bench/controlnet.py --sizes 256 --rounds 2 --frames 8

The model is the bench's SD1.5-shaped random LCM (``bench/models.py``; copied into the work folder when a built one
is found next to it), a full-size random SD1.5-shaped ``ControlNetModel`` built from its U-Net's config
(:func:`models.build_sd15_controlnet`, 361M parameters like lllyasviel's SD1.5 ControlNets) and the TAESD-shaped
tiny VAE. Ours: ``lcm-export --controlnet --tiny-vae --precision int8 --calibration-resolution 256 --keep-fp32``
(INT8 U-Net and ControlNet, TAESD decoder), run with ``variant="int8"`` on onnxruntime; a ``--control-variant fp32``
row runs the same bundle with the float ControlNet (the measurement behind quantising it). diffusers:
``StableDiffusionControlNetPipeline`` + ``LCMScheduler`` in fp32 with the full VAE (what diffusers users run).
optimum-intel 2.2 cannot run a ControlNet: its ``modeling_diffusion.py`` defines no ControlNet pipeline (SD, SDXL,
LCM, SD3, Flux, ... only) and its OpenVINO exporter has no ControlNet model type, so there is no OpenVINO row.

Each engine is a worker process of this file (``--worker``) that loads once; timed calls alternate between the
workers, ``--rounds`` per size with the order rotating, so that both share the machine's load alike. The frame loop
(ours) is ``Pipeline.stream`` with a control image per frame (a drifting edge map), strength 0.5, 2 steps.
Results: ``bench/controlnet-results.json`` and the "ControlNet" section of ``bench/RESULTS.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import common
import models

SECTION_START = "<!-- controlnet: start (bench/controlnet.py writes this section) -->"
SECTION_END = "<!-- controlnet: end -->"
PROMPT = "a photo of a lighthouse on a cliff at dusk, detailed"
BUNDLE = "fast-int8"
# ours on onnxruntime; the same with the fp32 ControlNet; ours on OpenVINO (its default compute precision: bf16 on
# CPUs with AVX-512 BF16); diffusers fp32.
KINDS = ("ours", "ours-float-controlnet", "ours-openvino", "diffusers")
BUILT_MODELS = (Path("/work/benchwork/web/sd15-lcm"), Path("/work/benchwork/web/taesd"))


def parse_arguments(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="ControlNet: ours (fast INT8) vs diffusers fp32; the frame loop.")
    parser.add_argument("--work-dir", type=Path, default=Path("~/.cache/lcm-export/bench-controlnet").expanduser())
    parser.add_argument("--output", type=Path, default=common.BENCH_DIR)
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 512])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--guidance", type=float, default=8.5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--frames", type=int, default=8, help="timed frames of the frame loop")
    parser.add_argument("--worker", choices=KINDS, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def control_image(size: int, shift: int = 0):
    """The control image every engine gets: the calibration's edge map of run 0 (seed 123), shifted by ``shift``
    pixels (the frame loop's moving edges)."""
    import numpy as np

    from lcm_export.calibration.control_images import control_images

    (image,) = control_images(0, 1, size, size, seed=123)
    return np.roll(image, shift, axis=1)


def prepare(work: Path) -> dict[str, Any]:
    """The models (copied from a built bench model when there is one) and our bundle (exported once)."""
    work.mkdir(parents=True, exist_ok=True)
    for built in BUILT_MODELS:
        if not (work / built.name).exists() and (built / models.COMPLETE_MARK).is_file():
            shutil.copytree(built, work / built.name)
    counts = {"sd15-lcm": models.build_sd15_lcm(work / "sd15-lcm"), "taesd": models.build_taesd(work / "taesd")}
    counts["controlnet"] = models.build_sd15_controlnet(work / "controlnet", work / "sd15-lcm")
    bundle = work / BUNDLE
    if not (bundle / "manifest.json").is_file():
        command = [
            sys.executable,
            "-m",
            "lcm_export.exporter.cli",
            str(work / "sd15-lcm"),
            "--output",
            str(bundle),
            "--controlnet",
            str(work / "controlnet"),
            "--tiny-vae",
            str(work / "taesd"),
            "--precision",
            "int8",
            "--calibration-size",
            "8",
            "--calibration-resolution",
            "256",
            "--keep-fp32",
            "--quiet",
        ]
        counts["export"] = common.measured(command, work / "export.log")
    return counts


# -- workers --------------------------------------------------------------------------------------------------


def _ours(work: Path, threads: int, float_controlnet: bool, backend: str = "onnxruntime"):
    from lcm_export.runtime import Pipeline
    from lcm_export.runtime.variants import choose_variant

    pipe = Pipeline.load(work / BUNDLE, backend=backend, variant="int8", threads=threads)
    if float_controlnet:  # the same bundle with the fp32 ControlNet: what quantising the ControlNet gains
        denoiser = pipe.denoiser
        denoiser._variants["controlnet"] = choose_variant(pipe.manifest.components["controlnet"], "onnx", "fp32")
        denoiser._open("controlnet")

    def generate(size: int, steps: int, guidance: float, seed: int):
        out = pipe(
            PROMPT, control_image=control_image(size), height=size, width=size, num_inference_steps=steps,
            guidance_scale=guidance, seed=seed,
        )  # fmt: skip
        return out.images[0], {"unet_s": sum(out.timings["unet"]), "total_s": out.timings["total"]}

    def frames(size: int, count: int) -> dict[str, Any]:
        import numpy as np

        from lcm_export.calibration.control_images import smooth_image

        stream = pipe.stream(PROMPT, strength=0.5, num_inference_steps=2, seed=1)
        base = smooth_image(size, size, np.random.default_rng(5))
        stream(base, control_image=control_image(size))  # warm-up
        started = time.perf_counter()
        for index in range(count):
            stream(np.roll(base, 2 * index, axis=0), control_image=control_image(size, 2 * index))
        seconds = time.perf_counter() - started
        return {"frames": count, "seconds": round(seconds, 2), "frames_per_second": round(count / seconds, 3)}

    return generate, frames


def _diffusers(work: Path, threads: int):
    import torch
    from diffusers import ControlNetModel, LCMScheduler, StableDiffusionControlNetPipeline

    torch.set_num_threads(threads)
    controlnet = ControlNetModel.from_pretrained(str(work / "controlnet"), torch_dtype=torch.float32)
    pipe = StableDiffusionControlNetPipeline.from_pretrained(
        str(work / "sd15-lcm"), controlnet=controlnet, safety_checker=None, requires_safety_checker=False
    )
    pipe.scheduler = LCMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)

    def generate(size: int, steps: int, guidance: float, seed: int):
        started = time.perf_counter()
        with torch.no_grad():
            image = pipe(
                PROMPT, image=control_image(size)[None], height=size, width=size, num_inference_steps=steps,
                guidance_scale=guidance, generator=torch.Generator().manual_seed(seed), output_type="np",
            ).images[0]  # fmt: skip
        return image, {"total_s": time.perf_counter() - started}

    return generate, None


def worker(kind: str, work: Path, threads: int) -> None:
    """Load once, then answer JSON commands on stdin (one per line) with one JSON line each."""
    import numpy as np

    if kind == "diffusers":
        generate, frames = _diffusers(work, threads)
    else:
        backend = "openvino" if kind == "ours-openvino" else "onnxruntime"
        generate, frames = _ours(work, threads, "float" in kind, backend)
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        command = json.loads(line)
        if command["do"] == "generate":
            image, timings = generate(command["size"], command["steps"], command["guidance"], command["seed"])
            if command.get("save"):
                np.save(command["save"], image)
            print(json.dumps(timings), flush=True)
        elif command["do"] == "frames":
            print(json.dumps(frames(command["size"], command["count"])), flush=True)
        else:
            break


# -- the run --------------------------------------------------------------------------------------------------


class Process:
    def __init__(self, kind: str, work: Path, threads: int) -> None:
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONWARNINGS": "ignore"}
        env["LCM_EXPORT_CACHE_DIR"] = str(work / "cache")
        self.log = open(work / f"worker-{kind}.log", "a")
        command = [sys.executable, __file__, "--worker", kind, "--work-dir", str(work), "--threads", str(threads)]
        self.process = subprocess.Popen(
            command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log, text=True, bufsize=1, env=env
        )
        started = time.perf_counter()
        self.ask_raw()  # "ready"
        self.load_seconds = round(time.perf_counter() - started, 1)

    def ask_raw(self) -> dict[str, Any]:
        line = self.process.stdout.readline()  # type: ignore[union-attr]
        if not line:
            raise SystemExit(f"bench: a worker died; see {self.log.name}")
        return json.loads(line)

    def ask(self, **command: Any) -> dict[str, Any]:
        self.process.stdin.write(json.dumps(command) + "\n")  # type: ignore[union-attr]
        return self.ask_raw()

    def close(self) -> None:
        self.process.stdin.write(json.dumps({"do": "quit"}) + "\n")  # type: ignore[union-attr]
        self.process.wait(timeout=60)


def run(arguments: argparse.Namespace) -> dict[str, Any]:
    import numpy as np

    from lcm_export.calibration.quality import psnr

    work = arguments.work_dir
    counts = prepare(work)
    kinds = KINDS
    processes = {kind: Process(kind, work, arguments.threads) for kind in kinds}
    results: dict[str, Any] = {
        "machine": common.machine_info(),
        "models": counts,
        "settings": {key: str(value) for key, value in vars(arguments).items() if key != "worker"},
        "load_seconds": {kind: process.load_seconds for kind, process in processes.items()},
        "optimum_intel": "not run: optimum-intel 2.2 has no ControlNet pipeline or exporter",
        "sizes": {},
    }
    for size in arguments.sizes:
        common.log(f"{size} px: warm-up")
        call = dict(do="generate", size=size, steps=arguments.steps, guidance=arguments.guidance, seed=0)
        for kind, process in processes.items():
            process.ask(**call, save=str(work / f"image-{kind}-{size}.npy"))
        times: dict[str, list[dict[str, Any]]] = {kind: [] for kind in kinds}
        for round_index in range(arguments.rounds):
            order = kinds[round_index % len(kinds) :] + kinds[: round_index % len(kinds)]
            for kind in order:
                times[kind].append(processes[kind].ask(**{**call, "seed": 1 + round_index}))
            common.log(f"{size} px: round {round_index + 1}/{arguments.rounds}")
        medians = {
            kind: {key: round(statistics.median(run[key] for run in runs), 3) for key in runs[0]}
            for kind, runs in times.items()
        }
        images = {kind: np.load(work / f"image-{kind}-{size}.npy") for kind in kinds}
        results["sizes"][str(size)] = {
            "median": medians,
            "runs": times,
            "speedup_vs_diffusers": round(medians["diffusers"]["total_s"] / medians["ours"]["total_s"], 2),
            "openvino_speedup_vs_diffusers": round(
                medians["diffusers"]["total_s"] / medians["ours-openvino"]["total_s"], 2
            ),
            "int8_controlnet_gain": round(medians["ours-float-controlnet"]["total_s"] / medians["ours"]["total_s"], 3),
            "psnr_int8_vs_float_controlnet_db": round(psnr(images["ours-float-controlnet"], images["ours"]), 2),
            "psnr_openvino_vs_onnxruntime_db": round(psnr(images["ours"], images["ours-openvino"]), 2),
        }
        common.log(f"{size} px: {json.dumps(results['sizes'][str(size)]['median'])}")
    results["frame_loop"] = {
        kind: {str(size): processes[kind].ask(do="frames", size=size, count=arguments.frames) for size in [256]}
        for kind in ("ours", "ours-openvino")
    }
    for process in processes.values():
        process.close()
    return results


def section_lines(results: dict[str, Any]) -> list[str]:
    machine = results.get("machine", {})
    isa = ", ".join(flag for flag, present in machine.get("isa", {}).items() if present)
    lines = [
        SECTION_START,
        "## ControlNet (bench/controlnet.py)",
        "",
        "SD1.5-shaped random LCM + a full-size random SD1.5 ControlNet (361M parameters), 4 steps, guidance 8.5, "
        f"{results['settings']['threads']} threads, medians of {results['settings']['rounds']} alternating rounds "
        f"({machine.get('cpu', 'CPU')}: {isa}). Ours: fast INT8 (INT8 U-Net and ControlNet, TAESD decoder) on "
        "onnxruntime and on OpenVINO (its default compute precision on this CPU); diffusers: "
        "StableDiffusionControlNetPipeline + LCMScheduler, fp32, full VAE. optimum-intel 2.2 has no ControlNet "
        "pipeline or exporter (no row). Ratios, measured in one run with alternating engines, are the figures to read.",
        "",
        "| size | ours onnxruntime (s) | ours OpenVINO (s) | ours, fp32 ControlNet (s) | diffusers fp32 (s) "
        "| onnxruntime vs diffusers | OpenVINO vs diffusers | INT8 ControlNet gain | INT8 vs fp32 ControlNet (PSNR) "
        "| OpenVINO vs onnxruntime (PSNR) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for size, entry in results["sizes"].items():
        median = entry["median"]
        lines.append(
            f"| {size} | {median['ours']['total_s']:.2f} | {median['ours-openvino']['total_s']:.2f} | "
            f"{median['ours-float-controlnet']['total_s']:.2f} | {median['diffusers']['total_s']:.2f} | "
            f"{entry['speedup_vs_diffusers']:.2f}x | {entry['openvino_speedup_vs_diffusers']:.2f}x | "
            f"{entry['int8_controlnet_gain']:.3f}x | {entry['psnr_int8_vs_float_controlnet_db']:.1f} dB | "
            f"{entry['psnr_openvino_vs_onnxruntime_db']:.1f} dB |"
        )
    for kind, loops in results.get("frame_loop", {}).items():
        backend = "OpenVINO" if kind == "ours-openvino" else "onnxruntime"
        for size, loop in loops.items():
            lines += [
                "",
                f"Frame loop with ControlNet (ours on {backend}, {size} px, img2img strength 0.5, 2 steps, a control "
                f"image per frame): {loop['frames_per_second']:.2f} frames/s over {loop['frames']} frames.",
            ]
    return [*lines, SECTION_END]


def main(argv: list[str] | None = None) -> int:
    arguments = parse_arguments(sys.argv[1:] if argv is None else argv)
    if arguments.worker:
        worker(arguments.worker, arguments.work_dir, arguments.threads)
        return 0
    results = run(arguments)
    common.publish_section(
        arguments.output, "controlnet-results.json", results, section_lines(results), SECTION_START, SECTION_END
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
