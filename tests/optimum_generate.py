"""Generate images with optimum-onnx's ORT diffusers pipelines from our bundles, as their users would open them.

Run by ``tests/test_optimum.py`` with the optimum venv's python (``tests/optimum_env.py``), where lcm_export is
not installed: it imports only numpy, torch, transformers, diffusers and optimum. ``python optimum_generate.py
JOBS.json`` reads ``{"images": [job, ...], "tokenizer_prompts": [...]}``, each job ``{"bundle", "pipeline" (an
optimum.onnxruntime class name), "prompt", "negative_prompt", "guidance_scale", "num_inference_steps", "height",
"width", "latents" (.npy), "noise" ([.npy, ...]), "output" (.npy)}``. It opens every bundle with
``from_pretrained(bundle)`` and nothing else, writes the images (``output_type="np"``), and writes a JSON report
beside the jobs file: the loaded classes, the venv's versions, and the ids that this transformers' slow and fast
CLIP tokenizers give the prompts from each bundle's tokenizer folders (``tokenizer/``, and SDXL's ``tokenizer_2/``).

The scheduler's per-step noise is replaced by the job's tensors, in order, the way ``tests/helpers.py``
``fixed_scheduler_noise`` does for diffusers: with the same latents and noise, the images are deterministic.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import json
import sys
from pathlib import Path

import numpy as np
import torch
from diffusers.schedulers import scheduling_lcm

VERSIONS = ("optimum-onnx", "optimum", "onnxruntime", "diffusers", "transformers", "torch", "huggingface_hub")


@contextlib.contextmanager
def fixed_scheduler_noise(noise: list[np.ndarray]):
    """Make LCMScheduler.step draw ``noise`` in order instead of random tensors (all of it must be used)."""
    queue = [torch.from_numpy(np.asarray(tensor, dtype=np.float32)) for tensor in noise]
    original = scheduling_lcm.randn_tensor

    def next_noise(shape, generator=None, device=None, dtype=None, layout=None):
        tensor = queue.pop(0)
        if tuple(tensor.shape) != tuple(shape):
            raise ValueError(f"noise of shape {tuple(tensor.shape)} given where the scheduler draws {tuple(shape)}")
        return tensor.to(dtype=dtype)

    scheduling_lcm.randn_tensor = next_noise
    try:
        yield
        if queue:
            raise ValueError(f"{len(queue)} noise tensors were not used")
    finally:
        scheduling_lcm.randn_tensor = original


def tokenizer_ids(tokenizer_dir: str, prompts: list[str]) -> dict[str, list[list[int]]]:
    """Padded ids of ``prompts`` from the slow and the fast CLIP tokenizer, both loaded from ``tokenizer_dir``."""
    from transformers import CLIPTokenizer, CLIPTokenizerFast

    return {
        tokenizer_class.__name__: tokenizer_class.from_pretrained(tokenizer_dir)(
            prompts, padding="max_length", max_length=77, truncation=True
        ).input_ids
        for tokenizer_class in (CLIPTokenizer, CLIPTokenizerFast)
    }


def run_jobs(jobs: list[dict]) -> dict:
    import optimum.onnxruntime

    pipelines: dict[tuple[str, str], object] = {}
    loaded: dict[str, dict[str, str]] = {}
    for job in jobs:
        key = (job["bundle"], job["pipeline"])
        if key not in pipelines:
            pipeline = getattr(optimum.onnxruntime, job["pipeline"]).from_pretrained(job["bundle"])
            pipeline.set_progress_bar_config(disable=True)
            pipelines[key] = pipeline
            loaded[f"{job['pipeline']}:{job['bundle']}"] = {
                "pipeline": type(pipeline).__name__,
                "tokenizer": type(pipeline.tokenizer).__name__,
                "tokenizer_2": type(getattr(pipeline, "tokenizer_2", None)).__name__,
                "text_encoder_2": type(getattr(pipeline, "text_encoder_2", None)).__name__,
                "scheduler": type(pipeline.scheduler).__name__,
            }
        pipeline = pipelines[key]
        options = {}
        if job.get("negative_prompt") is not None:
            options["negative_prompt"] = job["negative_prompt"]
        with fixed_scheduler_noise([np.load(path) for path in job["noise"]]), torch.no_grad():
            images = pipeline(
                job["prompt"],
                num_inference_steps=job["num_inference_steps"],
                guidance_scale=job["guidance_scale"],
                height=job["height"],
                width=job["width"],
                latents=torch.from_numpy(np.load(job["latents"])),
                output_type="np",
                **options,
            ).images
        np.save(job["output"], np.asarray(images, dtype=np.float32))
    return {
        "loaded": loaded,
        "versions": {package: importlib.metadata.version(package) for package in VERSIONS},
    }


def main() -> None:
    jobs_path = Path(sys.argv[1])
    request = json.loads(jobs_path.read_text(encoding="utf-8"))
    report = run_jobs(request["images"])
    bundles = sorted({job["bundle"] for job in request["images"]})
    report["tokenizer_ids"] = {
        bundle: {
            folder: tokenizer_ids(str(Path(bundle) / folder), request["tokenizer_prompts"])
            for folder in ("tokenizer", "tokenizer_2")
            if (Path(bundle) / folder).is_dir()
        }
        for bundle in bundles
    }
    jobs_path.with_name("report.json").write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
