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

import copy
import json
import math
import random
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from lcm_export.errors import BundleError
from lcm_export.runtime import Pipeline
from lcm_export.runtime.manifest import MANIFEST_NAME, load_manifest
from tests.helpers import as_format_1

SEED = 1729
MUTATIONS = 240
PROMPT = "a cat"
STEPS = 2
GUIDANCE = 8.5  # passed explicitly: a valid pipeline.default_guidance_scale edit must not change the fixed call
# Subtrees whose content is free-form (reports, provenance, what made a variant): each counts as one field for
# drawing.
FREE_FORM = ("validation", "provenance", "loras", "produced_by")
# Valid edits with another meaning: tokenizer pad id 0 (SDXL's second tokenizer pads with "!", id 0), a negative
# VAE shift, and no guidance_frequencies (null, or the key deleted or renamed: the runtime then computes the
# w-embedding's frequencies in numpy, as for a format-1 bundle, which moves timestep_cond by ~1e-4 where torch's
# float32 exp is 1 ulp off). The runtime must accept them and their image differs, so the fixed-image oracle cannot
# judge them.
LEGITIMATE_EDITS = {
    ("tokenizers[*].pad_id", "zero"),
    ("pipeline.vae_shift_factor", "negative"),
    ("conditioning.guidance_frequencies", "null"),
    ("conditioning.guidance_frequencies", "deleted"),
    ("conditioning.guidance_frequencies", "renamed-key"),
}
# Fields that hold bundle paths and get every path change: the files' and tokenizers' paths, each variant's path and
# the files it is made of (an unlisted one would be used without its sha256 check).
PATH_FIELD_ENDINGS = (".path", ".files[*]")
NodePath = tuple[Any, ...]  # keys and indices from the document root
PATH_KINDS = ("absolute", "dot-dot", "inner-dot-dot", "dot", "backslash", "double-slash", "other-file")


@dataclass(frozen=True)
class DuplicateKey:
    """An object written with one key twice (json.dumps cannot express it)."""

    pairs: tuple[tuple[str, Any], ...]


@dataclass(frozen=True)
class Mutation:
    label: str  # "pipeline.vae_scale_factor: stringified"
    text: str  # the whole mutated manifest.json


@dataclass
class Outcome:
    rejected: list[str] = field(default_factory=list)
    same_image: list[str] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)


def dumps(value: Any) -> str:
    """JSON text; NaN and Infinity as Python's json writes them; :class:`DuplicateKey` objects with the key twice."""
    if isinstance(value, DuplicateKey):
        return "{" + ", ".join(f"{json.dumps(key)}: {dumps(item)}" for key, item in value.pairs) + "}"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{json.dumps(key)}: {dumps(item)}" for key, item in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ", ".join(dumps(item) for item in value) + "]"
    return json.dumps(value)


def show(path: NodePath) -> str:
    text = ""
    for key in path:
        text += f"[{key}]" if isinstance(key, int) else (f".{key}" if text else str(key))
    return text


def field_of(path: NodePath) -> str:
    """The field a node belongs to: list indices and table step counts as ``*``, free-form subtrees as a whole."""
    parts: list[Any] = []
    for index, key in enumerate(path):
        if isinstance(key, int) or (index == 2 and path[:2] == ("scheduler", "tables")):
            parts.append("*" if isinstance(key, str) else 0)
        else:
            parts.append(key)
        if key in FREE_FORM:
            break
    return show(tuple(parts)).replace("[0]", "[*]")


def nodes(value: Any, path: NodePath = ()) -> Iterator[NodePath]:
    """Every node under the root (containers and leaves), depth first."""
    children = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, child in children:
        yield (*path, key)
        yield from nodes(child, (*path, key))


def get(document: Any, path: NodePath) -> Any:
    for key in path:
        document = document[key]
    return document


def replaced(document: Any, path: NodePath, value: Any) -> Any:
    result = copy.deepcopy(document)
    get(result, path[:-1])[path[-1]] = value
    return result


def deleted(document: Any, path: NodePath) -> Any:
    result = copy.deepcopy(document)
    del get(result, path[:-1])[path[-1]]
    return result


def candidates(document: dict[str, Any], path: NodePath, bundle_files: list[str]) -> dict[str, Any]:
    """kind -> mutated document for one node. Bad values only: no valid edit of the same type."""
    value = get(document, path)
    parent = get(document, path[:-1])
    result: dict[str, Any] = {"deleted": deleted(document, path)}
    is_int = type(value) is int
    for kind, new in (
        ("null", None),
        ("true", True),
        ("zero", 0),
        ("negative", -1),
        ("huge", 2**63 if is_int else 1e308),
        ("nan", math.nan),
        ("infinity", math.inf),
        ("nan-string", "NaN"),
        ("empty-string", ""),
        ("stringified", json.dumps(value)),
        ("empty-list", []),
        ("empty-object", {}),
    ):
        unchanged = type(new) is type(value) and new == value
        if not unchanged and not (isinstance(value, bool) and isinstance(new, bool)):  # a flipped flag is valid
            result[kind] = replaced(document, path, new)
    if is_int:
        result["fraction"] = replaced(document, path, value + 0.5)
    if isinstance(value, str) and value:
        result["bogus"] = replaced(document, path, "bogus")
        result["upper-case"] = replaced(document, path, value.upper()) if value.upper() != value else None
        if "/" in value or value.endswith((".json", ".onnx")):
            other = bundle_files[(bundle_files.index(value) + 1) % len(bundle_files)] if value in bundle_files else None
            for kind, new in (
                ("absolute", "/etc/hostname"),
                ("dot-dot", f"../other/{value}"),
                ("inner-dot-dot", f"{value.split('/')[0]}/../{value}"),
                ("dot", f"./{value}"),
                ("backslash", value.replace("/", "\\")),
                ("double-slash", value.replace("/", "//", 1)),
                ("other-file", other or bundle_files[0]),
            ):
                result[kind] = replaced(document, path, new)
    if isinstance(value, list):
        result["to-object"] = replaced(document, path, {str(index): item for index, item in enumerate(value)})
        if value:
            result["duplicate-entry"] = replaced(document, path, [*value, value[-1]])
            result["first-entry-removed"] = replaced(document, path, value[1:])
    if isinstance(value, dict):
        result["to-list"] = replaced(document, path, list(value.values()))
        result["unknown-key"] = replaced(document, path, {**value, "x_unknown": 1})
        if value:
            pairs = tuple(value.items())
            result["duplicate-key"] = replaced(document, path, DuplicateKey((*pairs, pairs[0])))
    if isinstance(parent, dict):
        renamed = {(f"{key}_renamed" if key == path[-1] else key): item for key, item in parent.items()}
        result["renamed-key"] = replaced(document, path[:-1], renamed) if len(path) > 1 else renamed
    return {kind: mutated for kind, mutated in result.items() if mutated is not None}


def mutations(document: dict[str, Any], count: int, seed: int) -> list[Mutation]:
    """``count`` distinct mutations: every path change of every path field (few fields, the riskiest values),
    then draws evenly over the manifest's fields, then over each field's nodes and kinds."""
    rng = random.Random(seed)
    bundle_files = [entry["path"] for entry in document["files"]]
    by_field: dict[str, list[NodePath]] = {}
    for path in nodes(document):
        by_field.setdefault(field_of(path), []).append(path)
    fields = sorted(by_field)
    chosen: dict[str, Mutation] = {}

    def add(name: str, path: NodePath, kind: str | None = None) -> None:
        options = candidates(document, path, bundle_files)
        kind = kind or rng.choice(sorted(options))
        label = f"{show(path)}: {kind}"
        if label not in chosen and (name, kind) not in LEGITIMATE_EDITS and len(chosen) < count:
            chosen[label] = Mutation(label, dumps(options[kind]))

    for name in fields:
        if name.endswith(PATH_FIELD_ENDINGS):
            for kind in PATH_KINDS:
                add(name, rng.choice(by_field[name]), kind)
    for _ in range(count * 50):
        if len(chosen) == count:
            break
        name = rng.choice(fields)
        add(name, rng.choice(by_field[name]))
    assert len(chosen) == count, f"only {len(chosen)} distinct mutations"
    return list(chosen.values())


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
