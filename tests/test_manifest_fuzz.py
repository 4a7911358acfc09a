"""Fuzz the manifest: each mutation of a real bundle's ``manifest.json`` is rejected with one BundleError line, or
it loads and gives exactly the image of the unmutated bundle. Anything else (another exception, a traceback, a
different image) is a hole in the validation at the border.

The mutations are drawn with a fixed seed from every field of the tiny bundle's manifest: type changes (null, a
bool, a string, a list, an object), bad values (0, -1, huge, NaN, Infinity, "NaN", a float for an int), path
changes (absolute, ``..``, ``.``, backslashes, another file of the bundle), deleted and renamed keys, unknown keys,
list <-> object swaps, duplicated list entries and keys. Fields are drawn evenly, not nodes: the scheduler tables
and the free-form records (validation reports, provenance) would otherwise take most draws.

The manifest is format 2: components with a list of ``variants`` (each with its ``files``, hashed in ``files``, and
its free-form ``produced_by``) and the declared ``conditioning``. Every path field, a variant's ``files`` included,
gets every path change. A few changes are valid edits of a manifest with another meaning, not malformed ones, so
they are not drawn (see ``LEGITIMATE_EDITS``). Mutating ``manifest.json`` leaves the other files' hashes valid (it
is not in ``files``). The same mutations of the manifest written back as format 1 check the upgrade on read.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from lcm_export.errors import BundleError
from lcm_export.runtime import Pipeline
from lcm_export.runtime.manifest import MANIFEST_NAME, load_manifest
from tests.runtime.manifest_corpus import MUTATIONS, SEED, mutations
from tests.test_manifest import as_format_1

PROMPT = "a cat"
STEPS = 2
GUIDANCE = 8.5  # passed explicitly: a valid pipeline.default_guidance_scale edit must not change the fixed call


@dataclass
class Outcome:
    rejected: list[str] = field(default_factory=list)
    same_image: list[str] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)


def fixed_call(bundle: Path) -> np.ndarray:
    pipeline = Pipeline.load(bundle, backend="onnxruntime")
    return pipeline(PROMPT, num_inference_steps=STEPS, guidance_scale=GUIDANCE, seed=0).images


def run_fuzz(
    bundle: Path, workdir: Path, count: int = MUTATIONS, seed: int = SEED, document: dict[str, Any] | None = None
) -> Outcome:
    """Apply each mutation to a copy of ``bundle`` (whose manifest is replaced by ``document`` if given) and judge
    it (see the module docstring)."""
    copy_dir = Path(shutil.copytree(bundle, workdir / "bundle"))
    if document is not None:
        (copy_dir / MANIFEST_NAME).write_text(json.dumps(document, indent=2))
    original = (copy_dir / MANIFEST_NAME).read_text()
    reference = fixed_call(copy_dir)
    outcome = Outcome()
    for mutation in mutations(json.loads(original), count, seed):
        (copy_dir / MANIFEST_NAME).write_text(mutation.text)
        try:
            load_manifest(copy_dir)
        except BundleError as error:
            message = str(error)
            if "\n" in message or "\r" in message or not message.startswith(f"BUNDLE '{copy_dir}'"):
                outcome.failures.append(f"{mutation.label}: not one line naming the bundle: {message!r}")
            else:
                outcome.rejected.append(mutation.label)
            continue
        except Exception as error:  # the point: any other exception is a finding
            outcome.failures.append(f"{mutation.label}: load_manifest raised {type(error).__name__}: {error}")
            continue
        try:
            image = fixed_call(copy_dir)
        except Exception as error:
            outcome.failures.append(f"{mutation.label}: accepted, then {type(error).__name__}: {error}")
            continue
        if image.shape != reference.shape or not np.array_equal(image, reference):
            outcome.failures.append(f"{mutation.label}: accepted, but the image differs")
        else:
            outcome.same_image.append(mutation.label)
    (copy_dir / MANIFEST_NAME).write_text(original)
    return outcome


def report(capsys, name: str, outcome: Outcome) -> None:
    with capsys.disabled():
        print(
            f"\n{name}: {MUTATIONS} mutations, {len(outcome.rejected)} rejected with one line, "
            f"{len(outcome.same_image)} loaded with the same image, {len(outcome.failures)} failed"
        )


def test_every_mutation_is_rejected_in_one_line_or_changes_nothing(tiny_lcm_bundle, tmp_path, capsys) -> None:
    outcome = run_fuzz(tiny_lcm_bundle, tmp_path)
    report(capsys, "manifest fuzz", outcome)
    assert not outcome.failures, "\n".join(outcome.failures)
    assert len(outcome.rejected) + len(outcome.same_image) == MUTATIONS
    assert len(outcome.rejected) > MUTATIONS // 2  # most mutations break the contract


def test_every_format_1_mutation_is_rejected_in_one_line_or_changes_nothing(tiny_lcm_bundle, tmp_path, capsys) -> None:
    """The same, on the bundle's manifest written back as format 1: the upgrade on read must leave whatever is
    malformed for the validation to name in one line."""
    document = as_format_1(json.loads((tiny_lcm_bundle / MANIFEST_NAME).read_text()))
    outcome = run_fuzz(tiny_lcm_bundle, tmp_path, document=document)
    report(capsys, "format-1 manifest fuzz", outcome)
    assert not outcome.failures, "\n".join(outcome.failures)
    assert len(outcome.rejected) + len(outcome.same_image) == MUTATIONS


CLI_MUTATIONS = {
    "vae_scale_factor as a string": lambda data: data["pipeline"].update(vae_scale_factor="8"),
    "absolute files path": lambda data: data["files"][0].update(path="/etc/hostname"),
    "components as a list": lambda data: data.update(components=list(data["components"].values())),
    "artifact outside the bundle": lambda data: data["components"]["unet"]["variants"][0].update(
        path="../other/unet/model.onnx"
    ),
}


@pytest.mark.parametrize("name", sorted(CLI_MUTATIONS))
def test_cli_fails_in_one_line_without_an_image(tiny_lcm_bundle, tmp_path, name) -> None:
    bundle = Path(shutil.copytree(tiny_lcm_bundle, tmp_path / "bundle"))
    data = json.loads((bundle / MANIFEST_NAME).read_text())
    CLI_MUTATIONS[name](data)
    (bundle / MANIFEST_NAME).write_text(json.dumps(data))
    output = tmp_path / "out.png"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "lcm_export.runtime.cli",
            str(bundle),
            PROMPT,
            "--backend",
            "onnxruntime",
            "--quiet",
            "--output",
            str(output),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "manifest.json" in errors[0], result.stderr
    assert not output.exists() and not list(tmp_path.glob("*.png"))
