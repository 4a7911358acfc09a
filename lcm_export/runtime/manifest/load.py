"""Loading a bundle's manifest: read the JSON, check its format and version, validate it whole, verify the files."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from lcm_export.errors import BundleError
from lcm_export.runtime.manifest.document import Manifest
from lcm_export.runtime.manifest.files import check_bundle_paths, check_verify_mode, verify_files
from lcm_export.runtime.manifest.vocabulary import FORMAT_NAME, MANIFEST_NAME, READABLE_VERSIONS
from lcm_export.runtime.specs import ManifestFieldError, describe


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """``json.loads`` hook: a key twice in one object is ambiguous (json keeps the last one silently)."""
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise ValueError(f"the key {describe(key)} appears twice in one object")
        result[key] = value
    return result


def load_manifest(bundle_dir: str | Path, verify: str = "cached") -> Manifest:
    """Read, validate and verify a bundle's manifest. Raises :class:`BundleError` with a one-line message."""
    check_verify_mode(verify)  # before anything is read
    bundle_dir = Path(bundle_dir)
    if not bundle_dir.is_dir():
        raise BundleError(f"BUNDLE '{bundle_dir}' is not a folder: pass the folder lcm-export wrote")
    manifest_path = bundle_dir / MANIFEST_NAME
    if not manifest_path.is_file():
        raise BundleError(
            f"BUNDLE '{bundle_dir}' has no manifest.json: it is not an lcm-export bundle, or its export did not "
            "finish; export it again"
        )
    try:
        data = json.loads(manifest_path.read_text(encoding="utf-8"), object_pairs_hook=_unique_keys)
    except (OSError, ValueError, RecursionError) as error:
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise BundleError(f"BUNDLE '{bundle_dir}': manifest.json is not valid JSON ({reason}): re-export it") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT_NAME:
        raise BundleError(f"BUNDLE '{bundle_dir}': manifest.json is not an lcm-export manifest: re-export the bundle")
    version = data.get("format_version")
    if type(version) is not int or version not in READABLE_VERSIONS:
        readable = " and ".join(map(str, READABLE_VERSIONS))
        raise BundleError(
            f"BUNDLE '{bundle_dir}' has manifest format version {describe(version)}; this runtime reads versions "
            f"{readable}: re-export the bundle with this lcm-export, or install the matching lcm-export"
        )
    try:
        manifest = Manifest.from_json(data)
        check_bundle_paths(bundle_dir, manifest)
    except ManifestFieldError as error:
        raise BundleError(f"BUNDLE '{bundle_dir}': {error}: re-export the bundle") from None
    verify_files(bundle_dir, manifest.files, verify)
    return manifest
