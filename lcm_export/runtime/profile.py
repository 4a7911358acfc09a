"""Latency profile of a bundle on this device: every stage of an LCM run over repeated runs, and what ran it.

``profile_bundle`` loads a bundle (twice, to time a first and a second load), runs warm-ups, then times N runs and
reports per stage (prepare, tokenize, text_encoder, each U-Net step, each scheduler step, vae_decode, postprocess,
total) the median, p90, min and max, together with the peak resident memory, the machine (CPU, ISA flags, GPUs),
the library versions, the backend and its load options, and the bundle's manifest. Prompt encodings are not cached
between runs, so the tokenizer and the text encoder are timed every run, as in a one-shot generation.

Only the standard library, numpy and Pillow (for the chart) are used: the runtime never imports torch.
"""

from __future__ import annotations

import dataclasses
import gc
import importlib.metadata
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lcm_export.errors import UserError
from lcm_export.runtime.backends import cpu_model_and_flags

PROFILE_FORMAT = "lcm-export-profile"
PROFILE_VERSION = 1
# Stages in run order; the per-step stages (unet[i], scheduler[i]) go between the text encoder and the VAE.
STAGES_BEFORE_STEPS = ("prepare", "tokenize", "text_encoder")
PER_STEP_STAGES = ("unet", "scheduler")
STAGES_AFTER_STEPS = ("vae_decode", "postprocess")
TOTAL = "total"
# CPU features that decide which kernels the backends pick (x86 from "flags", Arm from "Features").
ISA_FLAGS_OF_INTEREST = (
    "avx2",
    "avx512f",
    "avx512_vnni",
    "avx512_bf16",
    "amx_tile",
    "amx_bf16",
    "amx_int8",
    "asimd",
    "sve",
    "i8mm",
    "bf16",
)
# Distributions whose versions matter for a runtime profile, read from metadata (never imported).
LIBRARY_DISTRIBUTIONS = (
    "numpy",
    "tokenizers",
    "pillow",
    "onnxruntime",
    "onnxruntime-gpu",
    "onnxruntime-openvino",
    "openvino",
    "tensorrt",
    "tensorrt-cu12",
    "tensorrt-cu13",
    "tensorrt-rtx-cu12-bindings",
    "tensorrt-rtx-cu12-libs",
    "coremltools",
)
BACKENDS_WITHOUT_CPU_PROFILER = {
    "tensorrt": "TensorRT's per-layer profile (IProfiler) needs a GPU to run the engine: no backend profile written",
    "coreml": "Core ML has no per-layer profiler in coremltools: no backend profile written",
}


# -- statistics ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StageStats:
    """Seconds of one stage over the timed runs. ``p90`` interpolates linearly between ranks (numpy's default)."""

    median: float
    p90: float
    min: float
    max: float
    mean: float

    @classmethod
    def of(cls, seconds: Sequence[float]) -> StageStats:
        values = np.asarray(seconds, dtype=np.float64)
        return cls(
            median=float(np.median(values)),
            p90=float(np.percentile(values, 90)),
            min=float(values.min()),
            max=float(values.max()),
            mean=float(values.mean()),
        )

    def to_json(self) -> dict[str, float]:
        """Milliseconds, the unit of the report."""
        return {f"{name}_ms": getattr(self, name) * 1e3 for name in ("median", "p90", "min", "max", "mean")}


def flatten_timings(timings: Mapping[str, Any]) -> dict[str, float]:
    """One run's ``PipelineOutput.timings`` as flat ``stage -> seconds`` in run order (``unet[0]``, ...).

    Per-step lists become indexed stages, interleaved as they run (unet[0], scheduler[0], unet[1], ...); stages
    this module does not know keep their place before the VAE; ``total`` comes last.
    """
    flat: dict[str, float] = {}
    for name in STAGES_BEFORE_STEPS:
        if name in timings:
            flat[name] = float(timings[name])
    known = {*STAGES_BEFORE_STEPS, *PER_STEP_STAGES, *STAGES_AFTER_STEPS, TOTAL}
    for name, value in timings.items():
        if name not in known and not isinstance(value, list | tuple):
            flat[name] = float(value)
    steps = max((len(timings.get(name, ())) for name in PER_STEP_STAGES), default=0)
    for index in range(steps):
        for name in PER_STEP_STAGES:
            values = timings.get(name, ())
            if index < len(values):
                flat[f"{name}[{index}]"] = float(values[index])
    for name in STAGES_AFTER_STEPS:
        if name in timings:
            flat[name] = float(timings[name])
    if TOTAL in timings:
        flat[TOTAL] = float(timings[TOTAL])
    return flat


def summarize(runs: Sequence[Mapping[str, Any]]) -> dict[str, StageStats]:
    """Per-stage statistics over runs, each a ``PipelineOutput.timings`` dict (seconds) or its flattened form."""
    if not runs:
        raise ValueError("summarize needs at least one run")
    flat_runs = [flatten_timings(run) for run in runs]
    stages = list(flat_runs[0])
    for index, run in enumerate(flat_runs[1:], start=1):
        if list(run) != stages:
            raise ValueError(f"run {index} has stages {list(run)}, run 0 has {stages}")
    return {stage: StageStats.of([run[stage] for run in flat_runs]) for stage in stages}


def untimed_seconds(flat_run: Mapping[str, float]) -> float:
    """``total`` minus the sum of the stages of one flattened run: time the pipeline does not attribute."""
    return flat_run[TOTAL] - sum(value for stage, value in flat_run.items() if stage != TOTAL)


# -- the machine and the libraries -------------------------------------------------------------------------------


@dataclass(frozen=True)
class MachineInfo:
    """What ran the profile. ``isa_flags`` is None where the OS does not list CPU flags (macOS, Windows)."""

    cpu: str
    logical_cores: int | None
    usable_cores: int | None  # the process's CPU affinity, where the OS has one (containers often limit it)
    isa_flags: tuple[str, ...] | None
    os: str
    python: str
    gpus: tuple[str, ...]
    load_average: tuple[float, float, float] | None = None  # 1, 5, 15 min, before the profile: is it busy?

    def to_json(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["isa_flags"] = list(self.isa_flags) if self.isa_flags is not None else None
        data["isa_flags_checked"] = list(ISA_FLAGS_OF_INTEREST)
        data["gpus"] = list(self.gpus)
        data["load_average"] = list(self.load_average) if self.load_average is not None else None
        return data


def read_cpuinfo(path: Path = Path("/proc/cpuinfo")) -> tuple[str | None, tuple[str, ...] | None]:
    """CPU model name and the ISA flags of interest it has, from Linux's ``/proc/cpuinfo``; Nones elsewhere."""
    model, flags = cpu_model_and_flags(path)
    if flags is None:
        return None, None
    return model, tuple(flag for flag in ISA_FLAGS_OF_INTEREST if flag in flags)


def gpu_names() -> tuple[str, ...]:
    """NVIDIA GPU names from ``nvidia-smi`` when that tool exists; () otherwise or when it fails."""
    tool = shutil.which("nvidia-smi")
    if tool is None:
        return ()
    try:
        result = subprocess.run(
            [tool, "--query-gpu=name", "--format=csv,noheader"], capture_output=True, text=True, timeout=15
        )
    except (OSError, subprocess.SubprocessError):
        return ()
    if result.returncode != 0:
        return ()
    return tuple(line.strip() for line in result.stdout.splitlines() if line.strip())


def machine_info() -> MachineInfo:
    """Describe this machine: CPU model, cores, ISA flags (Linux), OS, Python and NVIDIA GPUs."""
    model, flags = read_cpuinfo()
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    load_average = tuple(round(value, 2) for value in os.getloadavg()) if hasattr(os, "getloadavg") else None
    return MachineInfo(
        cpu=model or platform.processor() or platform.machine() or "unknown",
        logical_cores=os.cpu_count(),
        usable_cores=usable,
        isa_flags=flags,
        os=platform.platform(),
        python=platform.python_version(),
        gpus=gpu_names(),
        load_average=load_average,
    )


def library_versions() -> dict[str, str]:
    """Installed versions of the runtime's libraries and backends (package metadata only: nothing is imported)."""
    versions = {}
    for name in LIBRARY_DISTRIBUTIONS:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return versions


def peak_rss_bytes() -> int | None:
    """This process's peak resident memory so far (``getrusage``: KiB on Linux, bytes on macOS); None without it."""
    try:
        import resource
    except ImportError:  # Windows
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak) if sys.platform == "darwin" else int(peak) * 1024


# -- the report ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RunSettings:
    """What every profiled run generated; ``height``/``width`` are the image's actual size."""

    prompt: str
    steps: int
    guidance: float
    height: int
    width: int
    seed: int
    runs: int
    warmup: int


@dataclass(frozen=True)
class ProfileReport:
    """A latency profile: per-stage statistics plus everything needed to compare it with another one."""

    bundle: Mapping[str, Any]
    settings: RunSettings
    backend: str
    options: Mapping[str, Any]
    machine: MachineInfo
    libraries: Mapping[str, str]
    load_seconds: tuple[float, float]  # first load, second load in the same process
    peak_rss: int | None  # bytes, after the timed runs (before the second load)
    stages: Mapping[str, StageStats]  # includes "total"
    untimed: StageStats  # total minus the sum of the stages, per run
    runs: tuple[Mapping[str, float], ...]  # flattened seconds of every timed run
    backend_profiles: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()
    images: np.ndarray | None = dataclasses.field(default=None, repr=False, compare=False)  # the last run's

    @property
    def stage_names(self) -> list[str]:
        """The stages in run order, without ``total``."""
        return [name for name in self.stages if name != TOTAL]

    def to_json(self) -> dict[str, Any]:
        """The full report as JSON-ready data; times in milliseconds, memory in bytes and MiB."""
        stage_sums = [sum(run[name] for name in self.stage_names) for run in self.runs]
        totals = [run[TOTAL] for run in self.runs]
        return {
            "format": PROFILE_FORMAT,
            "format_version": PROFILE_VERSION,
            "unit": "ms",
            "bundle": dict(self.bundle),
            "run": {**dataclasses.asdict(self.settings), "prompt_cache": "cleared before every run (uncached)"},
            "backend": {"name": self.backend, "options": dict(self.options)},
            "machine": self.machine.to_json(),
            "libraries": dict(self.libraries),
            "load_seconds": {"first": self.load_seconds[0], "second": self.load_seconds[1]},
            "memory": {
                "peak_rss_bytes": self.peak_rss,
                "peak_rss_mib": None if self.peak_rss is None else self.peak_rss / 2**20,
                "measured": "getrusage ru_maxrss after the timed runs, before the second load",
            },
            "stages": {name: stats.to_json() for name, stats in self.stages.items()},
            "untimed": self.untimed.to_json(),
            "consistency": {
                "sum_of_stage_medians_ms": sum(self.stages[name].median for name in self.stage_names) * 1e3,
                "median_total_ms": self.stages[TOTAL].median * 1e3,
                "max_run_gap_percent": max(
                    abs(total - stage_sum) / total * 100 for total, stage_sum in zip(totals, stage_sums, strict=True)
                ),
            },
            "runs": [{name: value * 1e3 for name, value in run.items()} for run in self.runs],
            "backend_profiles": list(self.backend_profiles),
            "notes": list(self.notes),
        }

    def title(self) -> str:
        """One line naming what was profiled: backend, precision, image size, steps."""
        settings = self.settings
        threads = self.options.get("threads") or "all"
        return (
            f"{self.bundle.get('name', 'bundle')} on {self.backend} ({self.bundle.get('precision', '?')} bundle, "
            f"precision={self.options.get('precision', 'auto')}, threads={threads}"
            f"{', low memory' if self.options.get('low_memory') else ''}): "
            f"{settings.width}x{settings.height}, {settings.steps} steps, guidance {settings.guidance:g}"
        )

    def format_table(self) -> str:
        """A compact text table of the stages (milliseconds) and one line each for load, memory and machine."""
        total = self.stages[TOTAL].median
        width = max(len(name) for name in [*self.stages, "(untimed)"])
        lines = [
            self.title(),
            f"{self.settings.runs} runs after {self.settings.warmup} warm-up(s); prompt encoding uncached (the text "
            "encoder runs every time); times in ms",
            f"{'stage':<{width}}  {'median':>9}  {'p90':>9}  {'min':>9}  {'max':>9}  {'share':>6}",
        ]
        rows = [*((name, self.stages[name]) for name in self.stage_names), ("(untimed)", self.untimed)]
        for name, stats in rows:
            share = stats.median / total * 100 if total > 0 else 0.0
            lines.append(
                f"{name:<{width}}  {stats.median * 1e3:9.2f}  {stats.p90 * 1e3:9.2f}  {stats.min * 1e3:9.2f}  "
                f"{stats.max * 1e3:9.2f}  {share:5.1f}%"
            )
        stats = self.stages[TOTAL]
        lines.append(
            f"{TOTAL:<{width}}  {stats.median * 1e3:9.2f}  {stats.p90 * 1e3:9.2f}  {stats.min * 1e3:9.2f}  "
            f"{stats.max * 1e3:9.2f}  {100.0:5.1f}%"
        )
        memory = "n/a" if self.peak_rss is None else f"{self.peak_rss / 2**20:.1f} MiB"
        lines.append(
            f"load: first {self.load_seconds[0]:.3f} s, second {self.load_seconds[1]:.3f} s; peak RSS {memory}"
        )
        machine = self.machine
        flags = "flags unknown" if machine.isa_flags is None else " ".join(machine.isa_flags) or "no AVX2/AVX-512/AMX"
        gpus = f"; GPU {', '.join(machine.gpus)}" if machine.gpus else ""
        cores = f"{machine.logical_cores} logical cores" + (
            f" ({machine.usable_cores} usable)" if machine.usable_cores not in (None, machine.logical_cores) else ""
        )
        busy = f"; load average {machine.load_average[0]:g}" if machine.load_average is not None else ""
        lines.append(f"machine: {machine.cpu}, {cores}, {flags}{gpus}{busy}")
        lines.extend(f"note: {note}" for note in self.notes)
        return "\n".join(lines)

    def write_json(self, path: str | Path) -> Path:
        """Write :meth:`to_json` to ``path`` (folders created)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_json(), indent=2) + "\n")
        return path

    def write_chart(self, path: str | Path) -> Path:
        """Draw a PNG bar chart of the median time per stage, labelled with milliseconds and share of the total."""
        path = Path(path)
        if path.suffix.lower() != ".png":
            raise UserError(f"chart '{path}': give a .png file name")
        path.parent.mkdir(parents=True, exist_ok=True)
        draw_stage_chart(self).save(path)
        return path


# -- the chart ----------------------------------------------------------------------------------------------------

CHART_WIDTH = 1000
CHART_ROW_HEIGHT = 26
CHART_MARGIN = 20
STAGE_COLOURS = {
    "prepare": (150, 150, 150),
    "tokenize": (150, 150, 150),
    "text_encoder": (142, 103, 189),
    "unet": (56, 118, 201),
    "scheduler": (232, 142, 46),
    "vae_decode": (58, 160, 90),
    "postprocess": (150, 150, 150),
}


def draw_stage_chart(report: ProfileReport):
    """Horizontal bars of the median of each stage (a ``PIL.Image``): label, bar, "12.3 ms (45.6%)"."""
    from PIL import Image, ImageDraw, ImageFont

    def font(size: int):
        try:
            return ImageFont.load_default(size=size)
        except TypeError:  # Pillow < 10.1: one bitmap size
            return ImageFont.load_default()

    text_font, title_font = font(14), font(17)
    names = report.stage_names
    total = report.stages[TOTAL].median
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    label_width = max(measure.textlength(name, font=text_font) for name in [*names, TOTAL]) + 12
    value_width = measure.textlength("00000.00 ms (100.0%)", font=text_font) + 10
    bar_left = CHART_MARGIN + label_width
    bar_span = CHART_WIDTH - bar_left - value_width - CHART_MARGIN
    header = 2 * CHART_MARGIN + 44
    height = header + CHART_ROW_HEIGHT * (len(names) + 1) + 2 * CHART_MARGIN + 20
    image = Image.new("RGB", (CHART_WIDTH, int(height)), "white")
    draw = ImageDraw.Draw(image)
    settings = report.settings
    draw.text((CHART_MARGIN, CHART_MARGIN), report.title(), fill="black", font=title_font)
    draw.text(
        (CHART_MARGIN, CHART_MARGIN + 24),
        f"median of {settings.runs} runs after {settings.warmup} warm-up(s), total {total * 1e3:.2f} ms; "
        f"{report.machine.cpu}; prompt encoding uncached",
        fill=(90, 90, 90),
        font=text_font,
    )
    for row, name in enumerate([*names, TOTAL]):
        top = header + row * CHART_ROW_HEIGHT
        median = report.stages[name].median
        share = median / total * 100 if total > 0 else 0.0
        colour = (60, 60, 60) if name == TOTAL else STAGE_COLOURS.get(name.split("[")[0], (120, 120, 120))
        bar = bar_span * min(share, 100.0) / 100  # one scale for all bars: the total is the full width
        draw.text((CHART_MARGIN, top + 5), name, fill="black", font=text_font)
        draw.rectangle((bar_left, top + 4, bar_left + max(bar, 1), top + CHART_ROW_HEIGHT - 4), fill=colour)
        draw.text(
            (bar_left + max(bar, 1) + 6, top + 5), f"{median * 1e3:.2f} ms ({share:.1f}%)", fill="black", font=text_font
        )
    stage_sum = sum(report.stages[name].median for name in names)
    draw.text(
        (CHART_MARGIN, header + CHART_ROW_HEIGHT * (len(names) + 1) + CHART_MARGIN // 2),
        f"bar length = share of the median total; the stage medians add up to "
        f"{stage_sum / total * 100 if total > 0 else 0:.1f}% of it",
        fill=(90, 90, 90),
        font=text_font,
    )
    return image


# -- profiling ----------------------------------------------------------------------------------------------------


def bundle_summary(bundle_dir: Path, manifest: Any) -> dict[str, Any]:
    """What the manifest says about the bundle: target, precision, components and their artifacts, defaults."""
    pipeline = manifest.pipeline
    bundle_dir = bundle_dir.resolve()
    return {
        "name": bundle_dir.name,
        "path": str(bundle_dir),
        "target": manifest.target,
        "precision": manifest.precision,
        "components": {
            name: {variant.name: f"{variant.format} {variant.precision}" for variant in component.variants}
            for name, component in manifest.components.items()
        },
        "default_size": [pipeline.default_height, pipeline.default_width],
        "steps_available": sorted(manifest.scheduler.tables),
        "guidance": pipeline.guidance,
        "vae": pipeline.vae,
        "source_model": manifest.provenance.get("source_model"),
        "exporter": manifest.provenance.get("exporter"),
    }


def profile_bundle(
    bundle_dir: str | Path,
    prompt: str,
    *,
    runs: int = 5,
    warmup: int = 1,
    backend: str = "auto",
    variant: str = "auto",
    precision: str = "auto",
    device: str = "auto",
    threads: int | None = None,
    low_memory: bool = False,
    height: int | None = None,
    width: int | None = None,
    steps: int = 4,
    guidance: float | None = None,
    seed: int = 0,
    negative_prompt: str | None = None,
    cache: bool = True,
    cache_dir: str | None = None,
    profiling_dir: str | Path | None = None,
    progress: Callable[[str], None] | None = None,
) -> ProfileReport:
    """Profile ``runs`` generations of ``prompt`` after ``warmup`` untimed ones, on one backend.

    The bundle is loaded, warmed up and timed; the peak RSS is read; then it is freed and loaded a second time to
    time a warm load (files cached by the OS, hashes known, compiled-model caches filled). The prompt cache is
    cleared before every run, so the text encoder is timed each time. ``profiling_dir`` also turns on the
    backend's own profiler (onnxruntime trace, OpenVINO per-layer counters) for the first load's sessions;
    its overhead is then part of the timings.
    """
    from lcm_export.runtime.pipeline import Pipeline

    if runs < 1:
        raise UserError(f"runs={runs}: profile at least one run (--runs 1 or more)")
    if warmup < 0:
        raise UserError(f"warmup={warmup}: pass 0 or more warm-up runs (--warmup)")
    report_progress = progress or (lambda message: None)
    machine = machine_info()  # before loading: the load average says how busy the machine was
    bundle_dir = Path(bundle_dir)
    if profiling_dir is not None:
        profiling_dir = Path(profiling_dir)
        if profiling_dir.exists() and not profiling_dir.is_dir():
            raise UserError(f"backend profile folder '{profiling_dir}' is a file: give a folder")
        profiling_dir.mkdir(parents=True, exist_ok=True)
    load_options = dict(
        backend=backend,
        variant=variant,
        precision=precision,
        device=device,
        threads=threads,
        cache=cache,
        cache_dir=cache_dir,
        low_memory=low_memory,
    )

    report_progress(f"loading {bundle_dir}")
    start = time.perf_counter()
    profiling_folder = None if profiling_dir is None else str(profiling_dir)
    pipe = Pipeline.load(bundle_dir, **load_options, profiling_dir=profiling_folder)
    first_load = time.perf_counter() - start

    def generate(pipe: Pipeline):
        pipe.clear_prompt_cache()  # uncached: the tokenizer and the text encoder run every time
        return pipe(
            prompt,
            negative_prompt=negative_prompt,
            num_inference_steps=steps,
            guidance_scale=guidance,
            height=height,
            width=width,
            seed=seed,
        )

    for index in range(warmup):
        output = generate(pipe)
        report_progress(f"warm-up {index + 1}/{warmup}: {output.timings[TOTAL]:.3f} s")
    timed = []
    for index in range(runs):
        output = generate(pipe)
        timed.append(flatten_timings(output.timings))
        report_progress(f"run {index + 1}/{runs}: {output.timings[TOTAL]:.3f} s")
    peak = peak_rss_bytes()
    image_height, image_width = output.images.shape[1:3]

    notes = []
    written: list[str] = []
    if profiling_dir is not None:
        written.extend(str(path) for path in pipe.end_profiling())
        if pipe.backend in BACKENDS_WITHOUT_CPU_PROFILER:
            notes.append(BACKENDS_WITHOUT_CPU_PROFILER[pipe.backend])
        elif not written:
            notes.append(f"the {pipe.backend} backend wrote no profile")
        notes.append("the backend profiler was on during the timed runs: its overhead is part of the timings")
    images = output.images
    bundle_default_guidance = pipe.manifest.pipeline.default_guidance_scale
    backend_name = pipe.backend
    options = {
        **dataclasses.asdict(pipe.options),
        "variant": pipe.variant,
        "variants": {name: choice.name for name, choice in pipe.variants.items()},
    }
    bundle = bundle_summary(bundle_dir, pipe.manifest)
    del pipe, output
    gc.collect()

    report_progress("loading again (second load)")
    start = time.perf_counter()
    second = Pipeline.load(bundle_dir, **load_options)
    second_load = time.perf_counter() - start
    del second
    gc.collect()
    notes.append(
        "first load includes importing the backend library and hashing bundle files not verified before; "
        "the second runs in the same process"
    )

    stages = summarize(timed)
    if stages[TOTAL].max > 1.5 * stages[TOTAL].min:
        notes.append(
            f"run totals varied {stages[TOTAL].max / stages[TOTAL].min:.1f}x (min to max): the machine may be busy "
            f"(load average {machine.load_average}); more --runs steady the medians"
        )
    return ProfileReport(
        bundle=bundle,
        settings=RunSettings(
            prompt=prompt,
            steps=steps,
            guidance=float(guidance if guidance is not None else bundle_default_guidance),
            height=int(image_height),
            width=int(image_width),
            seed=seed,
            runs=runs,
            warmup=warmup,
        ),
        backend=backend_name,
        options=options,
        machine=machine,
        libraries=library_versions(),
        load_seconds=(first_load, second_load),
        peak_rss=peak,
        stages=stages,
        untimed=StageStats.of([untimed_seconds(run) for run in timed]),
        runs=tuple(timed),
        backend_profiles=tuple(written),
        notes=tuple(notes),
        images=images,
    )
