"""The work each stage does and this CPU's float32 matmul rate: the yardsticks the timings are read against.

``count_flops(work_dir, size)`` counts floating-point operations per call (2 per multiply-add) of the bench
model's text encoder, U-Net, VAE decoder and TAESD decoder at ``size`` px, with ``torch.utils.flop_counter`` on
the meta device: the modules are built from the saved configs and run on shapes only, no weight is read.
``matmul_rate(threads)`` times a 4096×4096 float32 matmul with onnxruntime's MLAS (the kernels of our default CPU
backend) and, when ``threads`` is every core, numpy's BLAS, and returns the best GFLOP/s: about what the float
units of this CPU can sustain, against which an engine's U-Net rate (its FLOPs over its time) shows the headroom.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

MATMUL_SIZE = 4096


def count_flops(work_dir: Path, size: int) -> dict[str, float]:
    """FLOPs per call of each stage at ``size``×``size`` px, batch 1 (one U-Net call: one step, no CFG batch)."""
    import torch
    from diffusers import AutoencoderKL, AutoencoderTiny, UNet2DConditionModel
    from torch.utils.flop_counter import FlopCounterMode
    from transformers import CLIPTextConfig, CLIPTextModel

    model = work_dir / "sd15-lcm"
    latent = size // 8

    def flops(build, run) -> float:
        with torch.device("meta"):
            module = build().eval()
            with torch.no_grad(), FlopCounterMode(display=False) as counter:
                run(module)
        return float(counter.get_total_flops())

    unet_config = UNet2DConditionModel.load_config(model / "unet")
    text_config = CLIPTextConfig.from_pretrained(model / "text_encoder")
    counts = {
        "text_encoder": flops(
            lambda: CLIPTextModel(text_config),
            lambda m: m(torch.zeros(1, text_config.max_position_embeddings, dtype=torch.long)),
        ),
        "unet": flops(
            lambda: UNet2DConditionModel.from_config(unet_config),
            lambda m: m(
                torch.zeros(1, unet_config["in_channels"], latent, latent),
                torch.tensor(999.0),
                encoder_hidden_states=torch.zeros(1, 77, unet_config["cross_attention_dim"]),
                timestep_cond=torch.zeros(1, unet_config["time_cond_proj_dim"]),
            ),
        ),
        "vae_decoder": flops(
            lambda: AutoencoderKL.from_config(AutoencoderKL.load_config(model / "vae")),
            lambda m: m.decode(torch.zeros(1, 4, latent, latent)),
        ),
    }
    taesd = work_dir / "taesd"
    if taesd.is_dir():
        counts["taesd_decoder"] = flops(
            lambda: AutoencoderTiny.from_config(AutoencoderTiny.load_config(taesd)),
            lambda m: m.decode(torch.zeros(1, 4, latent, latent)),
        )
    return counts


def matmul_rate(threads: int, repeats: int = 5) -> dict[str, Any]:
    """Best GFLOP/s of a 4096² float32 matmul on ``threads`` threads: numpy's BLAS and onnxruntime's MLAS."""
    import numpy as np

    n = MATMUL_SIZE
    rng = np.random.default_rng(0)
    a = rng.random((n, n), dtype=np.float32)
    b = rng.random((n, n), dtype=np.float32)

    def best(call) -> float:
        call()
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            call()
            times.append(time.perf_counter() - start)
        return 2 * n**3 / min(times) / 1e9

    import os

    rates: dict[str, Any] = {}
    if threads == os.cpu_count():  # numpy's BLAS runs on every core: comparable only at that thread count
        rates["numpy"] = best(lambda: a @ b)
    try:
        import onnxruntime
        from onnx import TensorProto, helper, numpy_helper

        graph = helper.make_graph(
            [helper.make_node("MatMul", ["a", "b"], ["c"])],
            "matmul",
            [helper.make_tensor_value_info("a", TensorProto.FLOAT, [n, n])],
            [helper.make_tensor_value_info("c", TensorProto.FLOAT, [n, n])],
            [numpy_helper.from_array(b, "b")],
        )
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads
        session = onnxruntime.InferenceSession(
            helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString(),
            options,
            providers=["CPUExecutionProvider"],
        )
        rates["onnxruntime"] = best(lambda: session.run(None, {"a": a}))
    except ImportError:
        pass
    rates["best"] = max(value for value in rates.values())
    rates["threads"] = threads
    return rates
