"""The manifest fuzz corpus: mutations of a real bundle's ``manifest.json``, drawn with a fixed seed.

Shared by tests/test_manifest_fuzz.py (the Python validator rejects each in one line or loads the same image) and
tests/runtime/test_manifest_schema.py (docs/manifest.schema.json agrees with the validator on each). A plain module,
not a test module, so that neither test imports the other.

The mutations are drawn from every field of the manifest: type changes (null, a bool, a string, a list, an
object), bad values (0, -1, huge, NaN, Infinity, "NaN", a float for an int), path changes (absolute, ``..``, ``.``,
backslashes, another file of the bundle), deleted and renamed keys, unknown keys, list <-> object swaps, duplicated
list entries and keys. Fields are drawn evenly, not nodes: the scheduler tables and the free-form records
(validation reports, provenance) would otherwise take most draws. Every path field, a variant's ``files`` included,
gets every path change. A few changes are valid edits of a manifest with another meaning, not malformed ones, so
they are not drawn (see ``LEGITIMATE_EDITS``).
"""

from __future__ import annotations

import copy
import json
import math
import random
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

SEED = 1729
MUTATIONS = 240
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
    field: str = ""  # the field drawn, list indices and table keys as *: "components.unet.inputs[*].shape[*]"
    kind: str = ""  # the change: "stringified"


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
            # another file of the bundle, not a graph of the same component (a weight-inputs or factor-inputs
            # graph beside a model is a valid ONNX variant path of its own kind: a run, not the manifest, finds its
            # inputs differ)
            adapter_graphs = (".weight-inputs.onnx", ".factor-inputs.onnx")
            others = [file for file in bundle_files if not file.endswith(adapter_graphs)]
            other = others[(others.index(value) + 1) % len(others)] if value in others else None
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


def glob(pattern: str, text: str) -> bool:
    """``*`` matches any text (dots and brackets included); everything else matches itself."""
    return re.fullmatch(re.escape(pattern).replace(r"\*", ".*"), text) is not None


def mutations(
    document: dict[str, Any], count: int, seed: int, required: Iterable[tuple[str, str]] = ()
) -> list[Mutation]:
    """``count`` distinct mutations: one of each ``required`` (field pattern, kind pattern) pair (:func:`glob`
    patterns: the allow-listed rules, so that each is exercised whatever else the bundle holds), every path change
    of every path field (few fields, the riskiest values), then draws evenly over the manifest's fields, then over
    each field's nodes and kinds."""
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
            chosen[label] = Mutation(label, dumps(options[kind]), name, kind)

    for field_pattern, kind_pattern in required:
        matches = [
            (name, path, kind)
            for name in fields
            if glob(field_pattern, name)
            for path in by_field[name]
            for kind in sorted(candidates(document, path, bundle_files))
            if glob(kind_pattern, kind) and (name, kind) not in LEGITIMATE_EDITS
        ]
        assert matches, f"no node of the manifest takes the required mutation {field_pattern}: {kind_pattern}"
        add(*rng.choice(matches))
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
