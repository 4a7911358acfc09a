"""The activation statistics are gathered as the model runs: one call never holds all its calibrated tensors at once.

onnxruntime's calibrator adds a ReduceMin and a ReduceMax after every tensor to quantise; in onnxruntime's default
execution order those ran late, so every calibrated tensor of a call stayed alive until the end (an SD1.5-shaped
U-Net at 512 px: about 20 GB). :func:`calibration_session` runs them in priority order. The check is on a chain of
convolutions whose activations are large enough to read in the process's peak RSS: the memory a call adds over the
loaded session must stay within a few activations, where the default order's holds them all (measured here too, so
the test shows what it would catch).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np

LAYERS = 16
CHANNELS = 32
SIDE = 256
REPO_ROOT = Path(__file__).resolve().parents[2]
ACTIVATION_MB = CHANNELS * SIDE * SIDE * 4 / 2**20  # 8 MB: one Conv output


def probe(which: str, folder: Path) -> dict:
    folder.mkdir()
    # A fresh process each: peak RSS is per process.
    probe_module = "tests.calibration.memory_probe"
    command = [sys.executable, "-m", probe_module, str(LAYERS), str(CHANNELS), str(SIDE), str(folder), which]
    result = subprocess.run(command, capture_output=True, text=True, cwd=REPO_ROOT, timeout=300, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_a_calibration_call_holds_a_few_activations_not_all(tmp_path) -> None:
    ours = probe("ours", tmp_path / "ours")
    default = probe("default", tmp_path / "default")
    # The same statistics, tensor by tensor (2 per Conv input and output): only the order of the nodes differs.
    assert len(ours["ranges"]) == 2 * 2 * LAYERS
    assert ours["ranges"] == default["ranges"]
    # Each Conv's input and output are calibrated: 2 * LAYERS tensors of ACTIVATION_MB. Ours frees each after its
    # Reduce nodes: a few activations at a time; the default order held them all (measured: 255 MB against 8 MB).
    assert ours["added_mb"] < 6 * ACTIVATION_MB, ours["added_mb"]
    assert default["added_mb"] > LAYERS * ACTIVATION_MB, default["added_mb"]
    assert np.isfinite(list(ours["ranges"].values())).all()
