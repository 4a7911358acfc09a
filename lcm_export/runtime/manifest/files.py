"""Files and hashes: every file a manifest lists is checked for its size and sha256 before anything runs.

:func:`check_bundle_paths` is what needs the folder (symlinks that lead outside it, files inside a folder artifact
that ``files`` does not list); :func:`verify_files` hashes, remembering files already verified and unchanged
since so that a second load of a multi-GB bundle does not hash it again.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING

from lcm_export.errors import BundleError, UserError
from lcm_export.runtime.cache import cache_root
from lcm_export.runtime.manifest.model import FileEntry
from lcm_export.runtime.manifest.vocabulary import FOLDER_FORMATS, HASH_CHUNK
from lcm_export.runtime.specs import ManifestFieldError, describe

if TYPE_CHECKING:
    from lcm_export.runtime.manifest.document import Manifest


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def file_entry(bundle_dir: Path, path: Path) -> FileEntry:
    return FileEntry(path.relative_to(bundle_dir).as_posix(), path.stat().st_size, sha256_file(path))


def check_bundle_paths(bundle_dir: Path, manifest: Manifest) -> None:
    """What needs the folder: every path the manifest names stays inside it after following symlinks, and every
    file inside a folder artifact (an mlpackage) is listed in ``files``. Raises :class:`ManifestFieldError`."""
    root = bundle_dir.resolve()
    named = [(f"files[{index}].path", entry.path) for index, entry in enumerate(manifest.files)]
    named += [(f"tokenizers[{index}].path", tokenizer.path) for index, tokenizer in enumerate(manifest.tokenizers)]
    for name, component in manifest.components.items():
        for index, variant in enumerate(component.variants):
            named.append((f"components.{name}.variants[{index}].path", variant.path))
    for where, path in named:
        try:
            resolved = (bundle_dir / path).resolve()
        except (OSError, RuntimeError):  # a symlink loop
            raise ManifestFieldError(where, f"cannot be resolved (a symlink loop?) (got {describe(path)})") from None
        if root not in resolved.parents:
            raise ManifestFieldError(where, f"leads outside the bundle folder through a symlink (got {describe(path)})")
    listed = {entry.path for entry in manifest.files}
    for name, component in manifest.components.items():
        for index, artifact in enumerate(component.variants):
            if artifact.format not in FOLDER_FORMATS:
                continue
            where = f"components.{name}.variants[{index}].path"
            folder = bundle_dir / artifact.path
            if not folder.is_dir():
                raise ManifestFieldError(
                    where, f"names a folder that is not in the bundle (got {describe(artifact.path)})"
                )
            for directory, subdirectories, filenames in os.walk(folder, followlinks=False):
                links = [entry for entry in subdirectories if os.path.islink(os.path.join(directory, entry))]
                for entry in (*filenames, *links):
                    relative = Path(directory, entry).relative_to(bundle_dir).as_posix()
                    if relative not in listed:
                        raise ManifestFieldError(
                            where,
                            f"names a folder holding {describe(relative)}, which manifest.json files does not list "
                            "(it would be used without its sha256 check)",
                        )


class _VerifiedCache:
    """Remembers files already hashed, keyed by (real path, size, mtime, inode), so a second load skips hashing.

    Any write to a file changes its mtime, so a modified file is always hashed again.
    """

    def __init__(self) -> None:
        self.path = cache_root() / "verified-files.json"
        try:
            self.entries: dict[str, list] = json.loads(self.path.read_text())
        except (OSError, ValueError):
            self.entries = {}
        self.dirty = False

    @staticmethod
    def _key(path: Path) -> tuple[str, list]:
        stat = path.stat()
        return str(path.resolve()), [stat.st_size, stat.st_mtime_ns, stat.st_ino]

    def known(self, path: Path, sha256: str) -> bool:
        key, identity = self._key(path)
        return self.entries.get(key) == [*identity, sha256]

    def remember(self, path: Path, sha256: str) -> None:
        key, identity = self._key(path)
        self.entries[key] = [*identity, sha256]
        self.dirty = True

    def save(self) -> None:
        if not self.dirty:
            return
        temporary = self.path.with_suffix(f".{os.getpid()}.tmp")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            temporary.write_text(json.dumps(self.entries))
            temporary.replace(self.path)
        except OSError:  # a read-only or full home only costs a re-hash next time; no partial file stays
            try:
                temporary.unlink(missing_ok=True)
            except OSError:
                pass


# How a load checks the bundle's files: hash everything, hash what was not hashed before, or sizes only.
VERIFY_MODES = ("full", "cached", "size")


def check_verify_mode(mode: object) -> str:
    if mode not in VERIFY_MODES:
        raise UserError(f"verify={mode!r}: pick one of {', '.join(VERIFY_MODES)}")
    return mode  # type: ignore[return-value]


def verify_files(bundle_dir: Path, files: tuple[FileEntry, ...], mode: str = "cached") -> None:
    """Check every listed file exists with its size and sha256.

    ``mode``: "full" hashes everything, "cached" skips files hashed before and unchanged since, "size" checks
    sizes only (for read-only media where hashing multi-GB files at every start is too slow).
    """
    check_verify_mode(mode)
    cache = _VerifiedCache() if mode == "cached" else None
    for entry in files:
        path = bundle_dir / entry.path
        if not path.is_file():
            raise BundleError(
                f"BUNDLE '{bundle_dir}': file '{entry.path}' listed in manifest.json is missing: "
                "copy the whole bundle folder or re-export it"
            )
        if path.stat().st_size != entry.size or (
            mode != "size" and not (cache and cache.known(path, entry.sha256)) and sha256_file(path) != entry.sha256
        ):
            raise BundleError(
                f"BUNDLE '{bundle_dir}': file '{entry.path}' does not match its sha256 in manifest.json "
                "(modified or corrupted): re-export the bundle or copy it again"
            )
        if cache is not None:
            cache.remember(path, entry.sha256)
    if cache is not None:
        cache.save()
