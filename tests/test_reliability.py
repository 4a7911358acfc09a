"""docs/reliability.md is the table of every bad input and fault the commands handle; this test runs each row.

A row gives the command (placeholders: ``{bundle}`` a copy of the tiny LCM bundle, ``{cfg_bundle}`` a copy of a
tiny LCM-LoRA (CFG) bundle, ``{model}`` the tiny LCM pipeline folder, ``{vae_8_channels}`` and ``{vae_scale_4}``
AutoencoderKL folders that do not fit it (8 latent channels; scale factor 4), ``{tmp}`` the row's own folder holding
``notes.txt``, a file ``a-file`` and an empty folder ``folder.png``, and ``clip.mp4``, a text file named like a
video, where the row names it; run-time adapters: ``{lora}`` a LoRA for ``{model}``, ``{lora_nothing}`` one whose
keys match no module, ``{adapter}`` that LoRA made into an adapter for ``{bundle}``, ``{adapter_misfit}`` a copy
whose factors have another shape, ``{bundle_fewer_weights}`` a copy of ``{bundle}`` whose U-Net weight map lacks the
``to_q`` weights), the exit code, the exact message (``…``
stands for text that depends on the machine, e.g. free memory) and what is on disk afterwards: ``nothing`` (no
file at ``--output``, no partial file beside it), ``unchanged`` (what was at ``--output`` is exactly as before)
or ``image`` (the PNG was written). The table and the commands cannot drift apart: a message changed in the code
fails here until the document says the same.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shlex
import shutil
import struct
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

DOCUMENT = Path(__file__).resolve().parent.parent / "docs" / "reliability.md"
COMMANDS = {"lcm-run": "lcm_export.runtime.cli", "lcm-export": "lcm_export.exporter.cli"}
DISK_STATES = ("nothing", "unchanged", "image")
# AutoencoderKL folders (for --vae) that do not fit {model}, whose VAE has 4 latent channels and scale factor 2.
MISFIT_VAES = {"vae_8_channels": {"latent_channels": 8}, "vae_scale_4": {"block_out_channels": (16, 16, 32)}}


@dataclass(frozen=True)
class Row:
    case: str
    command: str
    exit_code: int
    message: str
    on_disk: str


def read_rows() -> list[Row]:
    """Rows of the tables in docs/reliability.md whose command cell starts with `lcm-run` or `lcm-export`."""
    rows = []
    for line in DOCUMENT.read_text().splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if len(cells) != 5 or not cells[1].startswith(("`lcm-run ", "`lcm-export ")):
            continue
        case, command, exit_code, message, on_disk = cells
        rows.append(Row(case, command.strip("`"), int(exit_code), message.strip("`"), on_disk))
    return rows


ROWS = read_rows()


def test_the_document_has_the_rows() -> None:
    assert len(ROWS) >= 15, [row.case for row in ROWS]
    assert {row.on_disk for row in ROWS} <= set(DISK_STATES)


def message_pattern(message: str, values: dict[str, str]) -> re.Pattern:
    parts = [re.escape(part) for part in message.format(**values).split("…")]
    return re.compile("^" + ".+?".join(parts) + "$")


def snapshot(path: Path) -> dict[str, bytes]:
    """Every file at or under ``path`` with its bytes (an empty folder counts as itself)."""
    if path.is_file():
        return {path.name: path.read_bytes()}
    return {str(p.relative_to(path)): p.read_bytes() if p.is_file() else b"<dir>" for p in sorted(path.rglob("*"))}


ADAPTER_PLACEHOLDERS = ("lora", "lora_nothing", "adapter", "adapter_misfit", "bundle_fewer_weights")


def _without_weights(bundle: Path, word: str) -> Path:
    """``bundle`` with the U-Net weight-map entries whose module names hold ``word`` removed, and the manifest's
    size and sha256 of that file updated (a bundle whose export could not map those modules)."""
    weight_map = bundle / "unet" / "weights.json"
    data = json.loads(weight_map.read_text())
    data["weights"] = {name: entry for name, entry in data["weights"].items() if word not in entry["module"]}
    weight_map.write_text(json.dumps(data))
    manifest = json.loads((bundle / "manifest.json").read_text())
    for entry in manifest["files"]:
        if entry["path"] == "unet/weights.json":
            entry["size"] = weight_map.stat().st_size
            entry["sha256"] = hashlib.sha256(weight_map.read_bytes()).hexdigest()
    (bundle / "manifest.json").write_text(json.dumps(manifest, indent=1))
    return bundle


@pytest.fixture(scope="module")
def adapter_inputs(tiny_lcm_dir, tiny_lcm_bundle, tmp_path_factory) -> dict[str, str]:
    """The run-time adapter placeholders (built once, only when a row names one)."""
    import numpy as np
    from safetensors.numpy import save_file

    from lcm_export.exporter.adapter import make_adapter
    from lcm_export.exporter.bundle import LoraSource
    from lcm_export.exporter.tiny import build_tiny_lora

    folder = tmp_path_factory.mktemp("reliability-adapters")
    lora = build_tiny_lora(folder / "style.safetensors", tiny_lcm_dir, rank=2, target_modules=("to_q", "conv1"))
    nothing = folder / "nothing.safetensors"
    save_file(
        {
            "lora_unet_no_such_block.lora_down.weight": np.zeros((2, 8), np.float32),
            "lora_unet_no_such_block.lora_up.weight": np.zeros((8, 2), np.float32),
        },
        str(nothing),
    )
    adapter = folder / "style.adapter"
    make_adapter(LoraSource(str(lora)), tiny_lcm_bundle, adapter)
    raw = adapter.read_bytes()
    (size,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + size])
    key = next(name for name in sorted(header) if name.endswith(".down"))
    rows, columns = header[key]["shape"]
    header[key]["shape"] = [rows * columns, 1]  # the same bytes as another shape
    encoded = json.dumps(header).encode()
    misfit = folder / "misfit.adapter"
    misfit.write_bytes(struct.pack("<Q", len(encoded)) + encoded + raw[8 + size :])
    fewer = _without_weights(shutil.copytree(tiny_lcm_bundle, folder / "fewer-weights"), "to_q")
    return {
        "lora": str(lora),
        "lora_nothing": str(nothing),
        "adapter": str(adapter),
        "adapter_misfit": str(misfit),
        "bundle_fewer_weights": str(fewer),
    }


@pytest.mark.parametrize("row", ROWS, ids=[row.case for row in ROWS])
def test_row(row: Row, tiny_lcm_bundle, tiny_cfg_bundle, tiny_lcm_dir, tmp_path, request) -> None:
    work = tmp_path / "work"
    work.mkdir()
    values = {"tmp": str(work), "model": str(tiny_lcm_dir)}
    if any(f"{{{name}}}" in row.command for name in ADAPTER_PLACEHOLDERS):
        values.update(request.getfixturevalue("adapter_inputs"))
    if "{bundle}" in row.command:
        values["bundle"] = str(shutil.copytree(tiny_lcm_bundle, tmp_path / "bundle"))
    if "{cfg_bundle}" in row.command:
        values["cfg_bundle"] = str(shutil.copytree(tiny_cfg_bundle, tmp_path / "cfg-bundle"))
    for name, shape in MISFIT_VAES.items():
        if f"{{{name}}}" in row.command:
            from lcm_export.exporter.tiny import build_tiny_autoencoder_kl

            values[name] = str(build_tiny_autoencoder_kl(tmp_path / name, **shape))
    (work / "notes.txt").write_text("my notes")  # a user's file, for the rows about --overwrite
    (work / "a-file").write_text("not a folder")
    if "{tmp}/clip.mp4" in row.command:  # only there: the rows that list the folder's files stay as they are
        (work / "clip.mp4").write_text("not a video")
    (work / "folder.png").mkdir()
    arguments = shlex.split(row.command.format(**values))
    output = Path(arguments[arguments.index("--output") + 1]) if "--output" in arguments else None
    before = snapshot(output) if output is not None and output.exists() else None

    environment = {**os.environ, "TMPDIR": str(tmp_path)}  # what a run leaves in the temp folder is checked too
    result = subprocess.run(
        [sys.executable, "-m", COMMANDS[arguments[0]], *arguments[1:]],
        capture_output=True,
        text=True,
        timeout=600,
        env=environment,
    )

    assert result.returncode == row.exit_code, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith(("error:", "warning:"))]
    assert len(lines) == 1, result.stderr
    assert message_pattern(row.message, values).match(lines[0]), (lines[0], row.message)
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(("lcm-export-", "tmp"))]
    assert not leftovers, leftovers  # no temporary folder left behind (built-in models are built in one)
    if row.on_disk == "image":
        assert output is not None and output.is_file() and output.stat().st_size > 0
    elif row.on_disk == "unchanged":
        assert output is not None and snapshot(output) == before
    else:
        assert output is None or not output.exists()
    if output is not None and output.parent.is_dir():
        partial = [p.name for p in output.parent.iterdir() if ".partial" in p.name or p.name.startswith(".lcm-")]
        assert not partial, partial
