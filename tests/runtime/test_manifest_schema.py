"""docs/manifest.schema.json against the Python validator (lcm_export/runtime/manifest.py).

The schema is what a second runtime (JavaScript) validates a manifest with before the checks beyond it
(docs/bundle-format.md, "Checks beyond the schema", X1-X15). So: the schema is a valid draft 2020-12 schema; the
manifests real exports write satisfy it; on every mutation of the manifest fuzz corpus the schema's verdict equals
the validator's, except the mutations that only a check beyond the schema catches, each allow-listed here with the
rule that catches it; and a format-1 manifest, upgraded, satisfies it.

The schema's side reads the text as a JavaScript runtime would (``JSON.parse``): NaN and Infinity are not JSON, and a
key given twice keeps its last value (rule X1 refuses that). Its patterns are ECMA-262, where ``$`` is the end of
the string (Python's ``$`` also matches before a final newline, so the validator here uses ``\\Z``).
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from lcm_export.errors import BundleError
from lcm_export.runtime.manifest import MANIFEST_NAME, load_manifest, upgrade_format_1
from tests.runtime.manifest_corpus import MUTATIONS, SEED, glob, mutations

REPOSITORY = Path(__file__).resolve().parents[2]
SCHEMA_PATH = REPOSITORY / "docs" / "manifest.schema.json"
FORMAT_1_FIXTURE = REPOSITORY / "tests" / "fixtures" / "manifest-v1-tiny-lcm.json"
BUNDLE_FORMAT = REPOSITORY / "docs" / "bundle-format.md"

# Mutations the schema accepts and the validator refuses: (field pattern, kind pattern) -> the rule of
# docs/bundle-format.md's "Checks beyond the schema" that refuses them. In a pattern "*" matches anything; fields
# are the corpus's (list indices and table keys as "*"). Every entry must be used by the corpus.
BEYOND_THE_SCHEMA: dict[tuple[str, str], str] = {
    ("*", "duplicate-key"): "X1",  # a key twice in one object (JSON.parse keeps the last)
    ("files[*].path", "other-file"): "X2",  # two entries for one path
    ("components.*.variants", "duplicate-entry"): "X2",  # (format, name) twice among a component's variants
    # a variant's path no longer among its files (the next file is the component's weights.json, in its folder)
    ("components.*.variants[*].files[*]", "other-file"): "X4",
    ("scheduler.tables.*", "*"): "X6",  # column lengths, the next-step columns, the identities
    ("components.*.inputs*", "*"): "X10",  # the tensors the runtime feeds, their shapes
    ("components.*.outputs*", "*"): "X10",  # the tensors the runtime reads, their shapes
    ("scheduler.config.*", "*"): "X14",  # a copy of a scheduler option that differs from it
}
# Mutations the schema's side refuses and the validator accepts: NaN or Infinity in a free-form record the validator
# does not read (Python's json reads them; they are not JSON, and JSON.parse refuses the file): rule X1.
NOT_JSON: dict[tuple[str, str], str] = {
    ("scheduler.config.*", "nan"): "X1",
    ("scheduler.config.*", "infinity"): "X1",
}
RULE_HEADING = re.compile(r"^- \*\*(X\d+)\*\*", re.MULTILINE)


def ecma_pattern(validator: Any, pattern: str, instance: Any, schema: dict[str, Any]) -> Iterator[Any]:
    """``pattern`` as ECMA-262 reads it: a final ``$`` is the end of the string."""
    python = pattern[:-1] + r"\Z" if pattern.endswith("$") else pattern
    if validator.is_type(instance, "string") and not re.search(python, instance):
        yield jsonschema.ValidationError(f"{instance!r} does not match {pattern!r}")


Validator = jsonschema.validators.extend(jsonschema.Draft202012Validator, {"pattern": ecma_pattern})


@pytest.fixture(scope="module")
def validator() -> Any:
    return Validator(json.loads(SCHEMA_PATH.read_text()))


def javascript_parse(text: str) -> Any:
    """``JSON.parse``: NaN and Infinity are refused, a repeated key keeps its last value."""

    def refuse(constant: str) -> None:
        raise ValueError(f"{constant} is not JSON")

    return json.loads(text, parse_constant=refuse)


def schema_accepts(validator: Any, text: str) -> bool:
    try:
        document = javascript_parse(text)
    except ValueError:
        return False
    return validator.is_valid(document)


def entry_for(allow_list: dict[tuple[str, str], str], field: str, kind: str) -> tuple[str, str] | None:
    return next((entry for entry in allow_list if glob(entry[0], field) and glob(entry[1], kind)), None)


def test_the_schema_is_a_valid_draft_2020_12_schema() -> None:
    schema = json.loads(SCHEMA_PATH.read_text())
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    jsonschema.Draft202012Validator.check_schema(schema)


def test_every_allow_listed_rule_is_written_down() -> None:
    written = set(RULE_HEADING.findall(BUNDLE_FORMAT.read_text()))
    assert {*BEYOND_THE_SCHEMA.values(), *NOT_JSON.values()} <= written


@pytest.fixture(scope="module")
def int8_tiny_vae_bundle(tiny_lcm_dir, tiny_vae_dir, tmp_path_factory) -> Path:
    """INT8 with the float U-Net kept beside it (two variants, INT8 first) and the tiny VAE."""
    from lcm_export.exporter.bundle import ExportConfig, export_bundle

    output = tmp_path_factory.mktemp("schema-bundles") / "int8-tiny-vae"
    config = ExportConfig(
        model=str(tiny_lcm_dir), output=output, precision="int8", keep_fp32=True, tiny_vae=str(tiny_vae_dir), quiet=True
    )
    export_bundle(config)
    return output


@pytest.mark.parametrize("bundle", ["tiny_lcm_bundle", "tiny_cfg_bundle", "sdxl_lcm_bundle", "int8_tiny_vae_bundle"])
def test_exported_manifests_satisfy_the_schema(request, validator, bundle: str) -> None:
    folder = request.getfixturevalue(bundle)
    document = javascript_parse((folder / MANIFEST_NAME).read_text())
    errors = [f"{error.json_path}: {error.message}" for error in validator.iter_errors(document)]
    assert not errors, "\n".join(errors)
    load_manifest(folder)  # and the validator agrees


def test_an_upgraded_format_1_manifest_satisfies_the_schema(validator) -> None:
    document = upgrade_format_1(javascript_parse(FORMAT_1_FIXTURE.read_text()))
    document["format_version"] = 2  # the upgrade leaves the number to the reader (Manifest.format_version says 1)
    errors = [f"{error.json_path}: {error.message}" for error in validator.iter_errors(document)]
    assert not errors, "\n".join(errors)
    assert not validator.is_valid(javascript_parse(FORMAT_1_FIXTURE.read_text()))  # format 1 as written is not 2


def test_the_schema_and_the_validator_agree_on_the_fuzz_corpus(tiny_lcm_bundle, validator, tmp_path, capsys) -> None:
    bundle = Path(shutil.copytree(tiny_lcm_bundle, tmp_path / "bundle"))
    original = javascript_parse((bundle / MANIFEST_NAME).read_text())
    assert validator.is_valid(original)
    agreed: list[str] = []
    allowed: dict[tuple[str, str], list[str]] = {}
    disagreements: list[str] = []
    rules = {**BEYOND_THE_SCHEMA, **NOT_JSON}
    for mutation in mutations(original, MUTATIONS, SEED, required=rules):
        (bundle / MANIFEST_NAME).write_text(mutation.text)
        try:
            load_manifest(bundle)
            python = True
        except BundleError:
            python = False
        schema = schema_accepts(validator, mutation.text)
        entry = entry_for(BEYOND_THE_SCHEMA if schema else NOT_JSON, mutation.field, mutation.kind)
        if schema == python:
            agreed.append(mutation.label)
        elif entry is not None:
            allowed.setdefault(entry, []).append(mutation.label)
        else:
            verdicts = f"schema {'accepts' if schema else 'refuses'}, validator {'accepts' if python else 'refuses'}"
            disagreements.append(f"{mutation.label} ({mutation.field}): {verdicts}")
    with capsys.disabled():
        counts = ", ".join(f"{rules[entry]} {entry[0]}: {entry[1]} {len(labels)}" for entry, labels in allowed.items())
        print(
            f"\nschema vs validator: {MUTATIONS} mutations, {len(agreed)} same verdict, "
            f"{sum(map(len, allowed.values()))} allow-listed ({counts}), {len(disagreements)} disagree"
        )
    assert not disagreements, "\n".join(disagreements)
    assert len(agreed) + sum(map(len, allowed.values())) == MUTATIONS
    assert len(agreed) > MUTATIONS * 3 // 4  # the schema decides most of the corpus by itself
    unused = [entry for entry in rules if entry not in allowed]
    assert not unused, f"allow-list entries no mutation needs: {unused}"
