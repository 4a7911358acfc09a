"""One benchmark engine in its own process: load once, then answer ``run`` commands with JSON timings.

Started by ``bench/run.py`` as ``python worker.py '<engine spec JSON>'`` (for optimum-intel with its own venv's
python). It reads one JSON command per line on stdin and writes one JSON reply per line on its protocol channel
(the original stdout; everything the libraries print goes to stderr). Standard library and numpy only at the top:
each engine imports its own libraries, so the same file runs in the optimum-intel venv.

Commands: ``{"cmd": "run", "size": 256, "steps": 4, "guidance": 8.0, "seed": 0, "prompt": "...", "save": path}``
-> ``{"event": "result", "total": s, "unet": s, "vae_decode": s, "text_encoder": s, "unet_calls": n}``;
``{"cmd": "quit"}`` -> ``{"event": "bye", "peak_rss_gb": ..., "peak_anon_gb": ...}``;
``{"cmd": "stream", "size": 256, "steps": 4, "strength": 0.5, "guidance": 8.0, "frames": 12, "warmup": 2, "prompt":
"..."}`` -> ``{"event": "stream", "latencies": [s per frame], "seconds": s, "frames": n}``: the frame loop
(image-to-image of ``frames`` synthetic frames after ``warmup`` untimed ones, ``bench/stream.py``).
Every engine gets the same initial latents and per-step noise (drawn with numpy from ``seed``), so images of
engines that share weights can be compared.

Also ``python worker.py measure -- CMD...``: runs CMD and prints its wall time and peak RSS as JSON;
``python worker.py optimum-export MODEL OUTPUT``: exports a diffusers folder to OpenVINO IR with optimum-intel
(``optimum-export-fp16``: with fp16 weights, for the SDXL bench's fp16 checkpoint);
``python worker.py optimum-taesd-encoder '<JSON>'``: the peer's fast IR with TAESD's encoder as its VAE encoder; and
``python worker.py optimum-int8 '<JSON>'``: the peer's fast INT8 pipeline (FastSD CPU's recipe) from that IR: the
TAESD decoder converted to IR in place of the VAE decoder, and the U-Net quantised with ``nncf.quantize`` on inputs
recorded from optimum-intel's own pipeline (as OpenVINO's LCM notebook does).
"""

from __future__ import annotations

import json
import os
import resource
import sys
import threading
import time
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

GIGABYTE = 1e9


def peak_rss_gb() -> float:
    """Peak resident set size of this process (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIGABYTE


def _status_gb(field: str) -> float:
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024 / GIGABYTE
    except OSError:
        pass
    return 0.0


class AnonymousMemorySampler:
    """Peak of RssAnon (memory not backed by a file), sampled every 50 ms in a thread.

    Peak RSS also counts file pages a runtime maps (weights read straight from disk), which the kernel can drop
    at any time; the anonymous peak is the memory the process really needs. The libraries release the GIL while
    they compute, so the thread keeps sampling.
    """

    def __init__(self) -> None:
        self.peak = 0.0
        thread = threading.Thread(target=self._sample, daemon=True)
        thread.start()

    def _sample(self) -> None:
        while True:
            self.peak = max(self.peak, _status_gb("RssAnon"))
            time.sleep(0.05)


def draw_inputs(seed: int, shape: tuple[int, ...], steps: int) -> tuple[np.ndarray, list[np.ndarray]]:
    """Initial latents and one noise tensor per step but the last: the only random draws of an LCM run."""
    rng = np.random.default_rng(seed)
    latents = rng.standard_normal(shape).astype(np.float32)
    return latents, [rng.standard_normal(shape).astype(np.float32) for _ in range(steps - 1)]


def stream_frames(size: int, count: int, seed: int = 0) -> list[np.ndarray]:
    """``count`` frames (size, size, 3) uint8 of a scene that moves: smooth colour fields drifting a few pixels per
    frame (every engine gets the same frames)."""
    rng = np.random.default_rng(seed)
    field = rng.random((size // 16 + 4, size // 16 + 4, 3))
    smooth = np.kron(field, np.ones((16, 16, 1)))  # (size + 64, size + 64, 3)
    return [
        (smooth[index * 3 % 64 : index * 3 % 64 + size, index * 2 % 64 : index * 2 % 64 + size] * 255).astype(np.uint8)
        for index in range(count)
    ]


class StageTimer:
    """Seconds spent in wrapped callables, per stage, since the last ``reset``."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self.calls: dict[str, int] = {}

    def reset(self) -> None:
        self.seconds, self.calls = {}, {}

    def wrap(self, stage: str, function: Callable) -> Callable:
        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                self.seconds[stage] = self.seconds.get(stage, 0.0) + time.perf_counter() - start
                self.calls[stage] = self.calls.get(stage, 0) + 1

        return timed


# -- engines ------------------------------------------------------------------------------------------------


class LcmExportEngine:
    """This project's runtime on a bundle (no torch in the process)."""

    def __init__(self, spec: dict[str, Any]) -> None:
        import importlib

        from lcm_export.runtime import Pipeline

        self.spec = spec
        backend = spec.get("backend", "auto")
        if backend != "auto":  # import the backend's library before the load is timed (as for every engine)
            importlib.import_module({"openvino": "openvino", "onnxruntime": "onnxruntime"}.get(backend, "numpy"))
        self.Pipeline = Pipeline

    def load(self) -> dict[str, Any]:
        static = self.spec.get("static_shape")
        # A row's "precision" names the mode: "int8" runs the bundle's INT8 variants at the device's float
        # elsewhere, "fp32" the float variants in float32 (parity), "auto" the bundle's preferred variants at the
        # device's fastest float.
        mode = self.spec.get("precision", "auto")
        variant, precision = {"int8": ("int8", "auto"), "fp32": ("fp32", "fp32")}.get(mode, ("auto", mode))
        self.pipeline = self.Pipeline.load(
            self.spec["bundle"],
            backend=self.spec.get("backend", "auto"),
            variant=variant,
            precision=precision,
            threads=self.spec["threads"],
            static_shape=tuple(static) if static else None,
            low_memory=self.spec.get("low_memory", False),
            cache=self.spec.get("cache_dir") != "",  # "": no compile cache
            **({"cache_dir": self.spec["cache_dir"]} if self.spec.get("cache_dir") else {}),
        )
        sessions = self.pipeline.session_info().values()
        precisions = sorted({session.inference_precision or "f32" for session in sessions})
        return {
            "backend": self.pipeline.backend,
            "inference_precision": precisions,
            "vae": self.pipeline.manifest.pipeline.vae,
            "loaded_from_cache": all(bool(session.loaded_from_cache) for session in sessions),
            "variants": {name: choice.name for name, choice in self.pipeline.variants.items()},  # which weights ran
        }

    def run(self, prompt: str, latents: np.ndarray, noise: list[np.ndarray], steps: int, guidance: float):
        output = self.pipeline(prompt, num_inference_steps=steps, guidance_scale=guidance, latents=latents, noise=noise)
        timings = output.timings
        stages = {
            "total": timings["total"],
            "unet": float(sum(timings["unet"])),
            "unet_calls": len(timings["unet"]),
            "vae_decode": timings["vae_decode"],
            "text_encoder": timings["text_encoder"] + timings.get("tokenize", 0.0),
        }
        return output.images, stages

    def stream(self, command: dict[str, Any]) -> dict[str, Any]:
        """``Pipeline.stream`` over the frames: warm-up frames through a stream of their own, then the timed one."""
        frames = stream_frames(int(command["size"]), int(command["warmup"]) + int(command["frames"]))
        options = dict(
            strength=float(command["strength"]),
            num_inference_steps=int(command["steps"]),
            guidance_scale=float(command["guidance"]),
            batch_steps=bool(command.get("batch_steps", self.spec.get("batch_steps", False))),
        )
        warmup = frames[: int(command["warmup"])]
        if warmup:
            list(self.pipeline.stream(command["prompt"], **options).run(warmup))
        stream = self.pipeline.stream(command["prompt"], **options)
        start = time.perf_counter()
        images = list(stream.run(frames[len(warmup) :]))
        seconds = time.perf_counter() - start
        count = len(images)
        if command.get("save"):  # the styled frames, (F, H, W, 3) float32: batched and unbatched are compared
            Path(command["save"]).parent.mkdir(parents=True, exist_ok=True)
            np.save(command["save"], np.stack(images))
        return {"latencies": stream.latencies, "seconds": seconds, "frames": count, "unet_rows": stream.steps}


@contextmanager
def fixed_lcm_noise(noise: list[np.ndarray]):
    """Make diffusers' LCMScheduler draw ``noise`` in order (the same tensors every engine gets)."""
    import torch
    from diffusers.schedulers import scheduling_lcm

    queue = [torch.from_numpy(tensor) for tensor in noise]
    original = scheduling_lcm.randn_tensor

    def next_noise(shape, generator=None, device=None, dtype=None, layout=None):
        return queue.pop(0).to(dtype=dtype)

    scheduling_lcm.randn_tensor = next_noise
    try:
        yield
    finally:
        scheduling_lcm.randn_tensor = original


def _time_text_encoders(pipe, timer: StageTimer) -> None:
    """Both of SDXL's text encoders (one for SD1.5) count as the text-encoder stage."""
    for name in ("text_encoder", "text_encoder_2"):
        module = getattr(pipe, name, None)
        if module is not None:
            module.forward = timer.wrap("text_encoder", module.forward)


def _size_options(pipe, latents: np.ndarray) -> dict[str, int]:
    """The image size of ``latents``, passed explicitly: SDXL's pipelines would otherwise build ``time_ids`` for
    their default size (1024 px), not the one the latents make."""
    factor = int(getattr(pipe, "vae_scale_factor", 8))
    return {"height": latents.shape[-2] * factor, "width": latents.shape[-1] * factor}


class DiffusersEngine:
    """A diffusers pipeline in fp32 on torch's CPU build: ``spec["pipeline"]`` (default
    LatentConsistencyModelPipeline; StableDiffusionXLPipeline for the SDXL bench, whose folder holds LCMScheduler)."""

    def __init__(self, spec: dict[str, Any]) -> None:
        import torch

        torch.set_num_threads(spec["threads"])
        import diffusers  # noqa: F401  (imported before the load is timed)

        self.spec = spec
        self.timer = StageTimer()

    def load(self) -> dict[str, Any]:
        import diffusers
        import torch

        kind = getattr(diffusers, self.spec.get("pipeline", "LatentConsistencyModelPipeline"))
        extra = {"safety_checker": None, "requires_safety_checker": False} if "Consistency" in kind.__name__ else {}
        pipe = kind.from_pretrained(self.spec["model"], torch_dtype=torch.float32, **extra)
        pipe.set_progress_bar_config(disable=True)
        pipe.unet.forward = self.timer.wrap("unet", pipe.unet.forward)
        pipe.vae.decode = self.timer.wrap("vae_decode", pipe.vae.decode)
        _time_text_encoders(pipe, self.timer)
        self.pipe = pipe
        return {"backend": f"torch {torch.__version__}", "inference_precision": ["f32"], "vae": type(pipe.vae).__name__}

    def run(self, prompt: str, latents: np.ndarray, noise: list[np.ndarray], steps: int, guidance: float):
        import torch

        self.timer.reset()
        start = time.perf_counter()
        with fixed_lcm_noise(noise), torch.no_grad():
            images = self.pipe(
                prompt,
                num_inference_steps=steps,
                guidance_scale=guidance,
                latents=torch.from_numpy(latents),
                output_type="np",
                **_size_options(self.pipe, latents),
            ).images
        total = time.perf_counter() - start
        return images, {"total": total, **self.timer.seconds, "unet_calls": self.timer.calls.get("unet", 0)}


class OptimumIntelEngine:
    """OpenVINO through optimum-intel's OVLatentConsistencyModelPipeline (its own venv), as its users run it;
    ``spec["pipeline"]`` names another optimum-intel pipeline (OVStableDiffusionXLPipeline for the SDXL bench)."""

    def __init__(self, spec: dict[str, Any]) -> None:
        import torch

        torch.set_num_threads(spec["threads"])
        import optimum.intel  # noqa: F401  (imported before the load is timed)

        self.spec = spec
        self.timer = StageTimer()

    def load(self) -> dict[str, Any]:
        import optimum.intel

        ov_config = {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_NUM_THREADS": str(self.spec["threads"])}
        if self.spec.get("precision") == "fp32":
            ov_config["INFERENCE_PRECISION_HINT"] = "f32"
        if "cache_dir" in self.spec:  # "": no compiled-model cache (optimum-intel's default is beside the IR)
            ov_config["CACHE_DIR"] = self.spec["cache_dir"]
        default = "OVLatentConsistencyModel" + ("Img2ImgPipeline" if self.spec.get("img2img") else "Pipeline")
        kind = getattr(optimum.intel, self.spec.get("pipeline", default))
        pipe = kind.from_pretrained(self.spec["model"], ov_config=ov_config, compile=True)
        pipe.set_progress_bar_config(disable=True)
        pipe.unet.forward = self.timer.wrap("unet", pipe.unet.forward)
        pipe.vae.decoder.forward = self.timer.wrap("vae_decode", pipe.vae.decoder.forward)
        _time_text_encoders(pipe, self.timer)
        self.pipe = pipe
        precision = pipe.unet.request.get_property("INFERENCE_PRECISION_HINT").get_type_name()
        import openvino

        return {"backend": f"optimum-intel + openvino {openvino.__version__}", "inference_precision": [precision]}

    def run(self, prompt: str, latents: np.ndarray, noise: list[np.ndarray], steps: int, guidance: float):
        import torch

        self.timer.reset()
        start = time.perf_counter()
        with fixed_lcm_noise(noise):
            images = self.pipe(
                prompt,
                num_inference_steps=steps,
                guidance_scale=guidance,
                latents=torch.from_numpy(latents),
                output_type="np",
                **_size_options(self.pipe, latents),
            ).images
        total = time.perf_counter() - start
        return images, {"total": total, **self.timer.seconds, "unet_calls": self.timer.calls.get("unet", 0)}

    def stream(self, command: dict[str, Any]) -> dict[str, Any]:
        """OVLatentConsistencyModelImg2ImgPipeline, one call per frame, the prompt encoded once (``prompt_embeds``,
        as our stream does) so that the loops compare on equal work."""
        import torch
        from PIL import Image

        count = int(command["warmup"]) + int(command["frames"])
        frames = [Image.fromarray(frame) for frame in stream_frames(int(command["size"]), count)]
        with torch.no_grad():
            embeds = self.pipe.encode_prompt(command["prompt"], "cpu", 1, False)[0]
        generator = torch.Generator().manual_seed(0)
        options = dict(
            prompt_embeds=embeds,
            strength=float(command["strength"]),
            num_inference_steps=int(command["steps"]),
            guidance_scale=float(command["guidance"]),
            output_type="np",
            generator=generator,
        )
        warmup = int(command["warmup"])
        for frame in frames[:warmup]:
            self.pipe(image=frame, **options)
        self.timer.reset()
        latencies = []
        start = time.perf_counter()
        for frame in frames[warmup:]:
            mark = time.perf_counter()
            self.pipe(image=frame, **options)
            latencies.append(time.perf_counter() - mark)
        seconds = time.perf_counter() - start
        calls = self.timer.calls.get("unet", 0)
        return {"latencies": latencies, "seconds": seconds, "frames": len(latencies), "unet_calls": calls}


ENGINES = {"lcm-export": LcmExportEngine, "diffusers": DiffusersEngine, "optimum-intel": OptimumIntelEngine}


# -- the protocol -------------------------------------------------------------------------------------------


def serve(spec: dict[str, Any]) -> None:
    """Load the engine, then answer commands until ``quit`` or end of input."""
    channel = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # library output (C and Python) goes to stderr, never into the protocol
    sys.stdout = sys.stderr

    def reply(message: dict[str, Any]) -> None:
        channel.write(json.dumps(message) + "\n")

    sampler = AnonymousMemorySampler()
    start = time.perf_counter()
    engine = ENGINES[spec["engine"]](spec)
    imported = time.perf_counter()
    info = engine.load()
    loaded = time.perf_counter()
    reply(
        {
            "event": "ready",
            "import_s": imported - start,
            "load_s": loaded - imported,
            "rss_gb": _status_gb("VmRSS"),
            "info": info,
        }
    )
    for line in sys.stdin:
        command = json.loads(line)
        if command["cmd"] == "quit":
            break
        if command["cmd"] == "stream":
            reply({"event": "stream", **engine.stream(command), "rss_gb": _status_gb("VmRSS")})
            continue
        size = int(command["size"])
        latent = size // int(command.get("vae_scale_factor", 8))  # the model's VAE (8 for SD and SDXL)
        latents, noise = draw_inputs(int(command["seed"]), (1, 4, latent, latent), int(command["steps"]))
        steps, guidance = int(command["steps"]), float(command["guidance"])
        images, stages = engine.run(command["prompt"], latents, noise, steps, guidance)
        if command.get("save"):
            Path(command["save"]).parent.mkdir(parents=True, exist_ok=True)
            np.save(command["save"], np.asarray(images, dtype=np.float32))
        reply({"event": "result", **stages, "rss_gb": _status_gb("VmRSS")})
    reply({"event": "bye", "peak_rss_gb": peak_rss_gb(), "peak_anon_gb": sampler.peak})


def _process_status_gb(pid: int) -> tuple[float, float] | None:
    """(RSS, anonymous RSS) of process ``pid`` in GB from /proc, None once it is gone."""
    values = {}
    try:
        with open(f"/proc/{pid}/status") as handle:
            for line in handle:
                key, _, rest = line.partition(":")
                if key in ("VmRSS", "RssAnon"):
                    values[key] = int(rest.split()[0]) * 1024 / GIGABYTE
    except OSError:
        return None
    return (values["VmRSS"], values["RssAnon"]) if len(values) == 2 else None


def measure(command: list[str]) -> None:
    """Run ``command``; print its wall time, peak RSS (of it and the children it waited for) and exit code, and
    from a 0.5 s sampler of its /proc status: the anonymous peak (memory that is not mapped files), when the RSS
    and anonymous peaks were seen, and a timeline (every 10 s: seconds, RSS GB, anonymous GB)."""
    import subprocess
    import threading

    start = time.perf_counter()
    process = subprocess.Popen(command)
    samples: list[tuple[float, float, float]] = []
    done = threading.Event()

    def sample() -> None:
        while not done.wait(0.5):
            seen = _process_status_gb(process.pid)
            if seen is not None:
                samples.append((time.perf_counter() - start, *seen))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    _, status, usage = os.wait4(process.pid, 0)
    done.set()
    sampler.join()
    seconds = time.perf_counter() - start
    code = os.waitstatus_to_exitcode(status)
    result = {"seconds": seconds, "peak_rss_gb": usage.ru_maxrss * 1024 / GIGABYTE, "returncode": code}
    if samples:
        rss_peak = max(samples, key=lambda entry: entry[1])
        anon_peak = max(samples, key=lambda entry: entry[2])
        result.update(
            sampled_rss_peak_gb=rss_peak[1],
            sampled_rss_peak_at_s=rss_peak[0],
            anon_peak_gb=anon_peak[2],
            anon_peak_at_s=anon_peak[0],
            timeline=[[round(t), round(rss, 2), round(anon, 2)] for t, rss, anon in samples[::20]],
        )
    print(json.dumps(result))
    sys.exit(code)


def optimum_export(model: str, output: str) -> None:
    """Export the diffusers folder ``model`` to OpenVINO IR with optimum-intel (fp32 weights, no compression)."""
    from optimum.intel import OVLatentConsistencyModelPipeline

    pipe = OVLatentConsistencyModelPipeline.from_pretrained(model, export=True, compile=False, load_in_8bit=False)
    pipe.save_pretrained(output)


def optimum_export_fp16(model: str, output: str) -> None:
    """Export the diffusers folder ``model`` (fp16 weights on disk) to OpenVINO IR with fp16 weights, straight into
    ``output``: ``optimum-cli export openvino --weight-format fp16``. The same values as the checkpoint (no rounding);
    optimum-intel's default would instead compress a U-Net of more than 1B parameters to int8 weights (not the
    same weights), and ``from_pretrained(export=True)`` would write the whole IR into a temporary folder first."""
    from optimum.exporters.openvino import main_export
    from optimum.intel import OVConfig

    main_export(
        model_name_or_path=model,
        output=output,
        task="text-to-image",
        library_name="diffusers",
        ov_config=OVConfig(dtype="fp16"),
    )


def _link_tree(source: Path, target: Path, replaced: str) -> None:
    """``target`` mirrors ``source`` with symlinks (no copy of gigabytes of IR), except the subfolder ``replaced``."""
    target.mkdir(parents=True, exist_ok=True)
    for entry in source.iterdir():
        if entry.name != replaced and not (target / entry.name).exists():
            (target / entry.name).symlink_to(entry.resolve(), target_is_directory=entry.is_dir())


def _taesd_decoder_ir(taesd_dir: Path, output_dir: Path, latent_size: int) -> None:
    """TAESD's decoder as OpenVINO IR under optimum-intel's VAE decoder names (``latent_sample`` -> ``sample``)."""
    import shutil

    import openvino
    import torch
    from diffusers import AutoencoderTiny

    vae = AutoencoderTiny.from_pretrained(str(taesd_dir)).eval()

    class Decoder(torch.nn.Module):  # (1, 4, H/8, W/8) -> (1, 3, H, W) in [-1, 1], as AutoencoderTiny.decode
        def __init__(self) -> None:
            super().__init__()
            self.decoder = vae.decoder

        def forward(self, latent_sample: torch.Tensor) -> torch.Tensor:
            return self.decoder(latent_sample)

    example = torch.zeros(1, 4, latent_size, latent_size)
    with torch.no_grad():
        model = openvino.convert_model(Decoder(), example_input=example, input=[(-1, 4, -1, -1)])
    model.inputs[0].get_tensor().set_names({"latent_sample"})
    model.outputs[0].get_tensor().set_names({"sample"})
    output_dir.mkdir(parents=True, exist_ok=True)
    openvino.save_model(model, str(output_dir / "openvino_model.xml"), compress_to_fp16=False)
    shutil.copy(taesd_dir / "config.json", output_dir / "config.json")  # scaling_factor 1.0: what decode divides by


def optimum_taesd_encoder(job: dict[str, Any]) -> None:
    """``job`` = {fast, taesd, output, size}: optimum-intel's fast IR (TAESD decoder) with TAESD's encoder converted
    to IR as its VAE encoder (``sample`` in [-1, 1] -> ``latent_sample``, which optimum-intel hands on as
    ``latents``), so that its img2img encodes with the same tiny VAE as our fast bundle."""
    import shutil

    import openvino
    import torch
    from diffusers import AutoencoderTiny

    fast, output = Path(job["fast"]), Path(job["output"])
    shutil.rmtree(output, ignore_errors=True)
    _link_tree(fast, output, replaced="vae_encoder")
    vae = AutoencoderTiny.from_pretrained(str(job["taesd"])).eval()

    class Encoder(torch.nn.Module):  # (1, 3, H, W) in [-1, 1] -> (1, 4, H/8, W/8), as AutoencoderTiny.encode
        def __init__(self) -> None:
            super().__init__()
            self.encoder = vae.encoder

        def forward(self, sample: torch.Tensor) -> torch.Tensor:
            return self.encoder(sample)

    example = torch.zeros(1, 3, int(job["size"]), int(job["size"]))
    with torch.no_grad():
        model = openvino.convert_model(Encoder(), example_input=example, input=[(-1, 3, -1, -1)])
    model.inputs[0].get_tensor().set_names({"sample"})
    model.outputs[0].get_tensor().set_names({"latent_sample"})
    (output / "vae_encoder").mkdir(parents=True, exist_ok=True)
    openvino.save_model(model, str(output / "vae_encoder" / "openvino_model.xml"), compress_to_fp16=False)
    shutil.copy(Path(job["taesd"]) / "config.json", output / "vae_encoder" / "config.json")


def optimum_int8(job: dict[str, Any]) -> None:
    """The peer's fast INT8 pipeline: ``job`` = {ir, taesd, fast, int8, prompts, size, steps, guidance} and
    optionally {pipeline, vae_scale_factor}.

    ``fast``: optimum-intel's IR with TAESD's decoder in place of the VAE decoder (float U-Net); ``int8``: the same
    with the U-Net quantised by NNCF's post-training quantisation (``model_type=TRANSFORMER``, bias correction off:
    OpenVINO's LCM notebook), calibrated on the U-Net inputs of optimum-intel's own pipeline running ``prompts`` at
    each ``guidance`` (a number or a list). ``pipeline``: the optimum-intel class that runs the IR (default
    OVLatentConsistencyModelPipeline; OVStableDiffusionXLPipeline for an LCM-SDXL); ``vae_scale_factor`` (default 8):
    image size over latent size, for the decoder's example input.
    """
    import gc
    import shutil

    import nncf
    import openvino
    import optimum.intel

    ir, fast, int8 = Path(job["ir"]), Path(job["fast"]), Path(job["int8"])
    for folder in (fast, int8):
        shutil.rmtree(folder, ignore_errors=True)
    _link_tree(ir, fast, replaced="vae_decoder")
    latent_size = int(job["size"]) // int(job.get("vae_scale_factor", 8))
    _taesd_decoder_ir(Path(job["taesd"]), fast / "vae_decoder", latent_size)

    kind = getattr(optimum.intel, job.get("pipeline", "OVLatentConsistencyModelPipeline"))
    pipe = kind.from_pretrained(str(fast), ov_config={"INFERENCE_PRECISION_HINT": "f32"}, compile=True)
    pipe.set_progress_bar_config(disable=True)
    recorded: list[dict[str, np.ndarray]] = []
    request = pipe.unet.request

    def recording(inputs: dict[str, Any], **kwargs):  # what optimum-intel feeds its compiled U-Net, per call
        recorded.append({name: np.array(value) for name, value in inputs.items()})
        return request(inputs, **kwargs)

    pipe.unet.request = recording
    guidances = job["guidance"] if isinstance(job["guidance"], list) else [job["guidance"]]
    for guidance in guidances:
        for prompt in job["prompts"]:
            pipe(
                prompt,
                height=int(job["size"]),
                width=int(job["size"]),
                num_inference_steps=int(job["steps"]),
                guidance_scale=float(guidance),
                output_type="np",
            )
    # The recorder holds the compiled f32 U-Net's request: gone with the pipeline before NNCF compiles its own copy
    # (kept, it took 5 GB of an SSD-1B-shaped U-Net's quantisation, which then ran out of 24 GB).
    pipe.unet.request = request
    del pipe, recording
    request = None
    gc.collect()
    unet = openvino.Core().read_model(str(ir / "unet" / "openvino_model.xml"))
    quantized = nncf.quantize(
        unet,
        nncf.Dataset(recorded),
        subset_size=len(recorded),
        model_type=nncf.ModelType.TRANSFORMER,
        advanced_parameters=nncf.AdvancedQuantizationParameters(disable_bias_correction=True),
    )
    _link_tree(fast, int8, replaced="unet")
    (int8 / "unet").mkdir()
    openvino.save_model(quantized, str(int8 / "unet" / "openvino_model.xml"), compress_to_fp16=False)
    shutil.copy(ir / "unet" / "config.json", int8 / "unet" / "config.json")
    print(json.dumps({"calibration_unet_calls": len(recorded), "nncf": nncf.__version__}), file=sys.stderr)


def main(argv: list[str]) -> None:
    if argv[:1] == ["measure"]:
        measure(argv[argv.index("--") + 1 :])
    elif argv[:1] == ["optimum-export"]:
        optimum_export(argv[1], argv[2])
    elif argv[:1] == ["optimum-export-fp16"]:
        optimum_export_fp16(argv[1], argv[2])
    elif argv[:1] == ["optimum-int8"]:
        optimum_int8(json.loads(argv[1]))
    elif argv[:1] == ["optimum-taesd-encoder"]:
        optimum_taesd_encoder(json.loads(argv[1]))
    else:
        serve(json.loads(argv[0]))


if __name__ == "__main__":
    main(sys.argv[1:])
