"""A disk cache for built artifacts (ONNX exports, TensorRT engines) that never reuses a stale file.

Each artifact lives in ``<root>/<kind>/<key hash>/`` with a ``manifest.json`` that records the full
key (what it was built from and for: model and calibration hashes, shapes, precision, GPU, library
versions). :meth:`ArtifactCache.lookup` returns the folder only when the manifest exists, its key
equals the one asked for, and the caller's ``validate(folder)`` accepts the files; anything else
(no manifest, another key, a corrupt or truncated file) is logged with the reason and answered
None, so the caller rebuilds. :meth:`ArtifactCache.commit` writes the manifest last, after the
files are complete, so an interrupted build is never mistaken for a finished one.

The manifest also records the sha256 of every file of the folder (``"files"``), and
:meth:`ArtifactCache.lookup` checks them all before reuse: a graph, external weights or engine
with flipped bytes or cut short is rebuilt (the file named in the log), never used. An entry
written before checksums were recorded (no ``"files"``) is rebuilt too.

Helpers shared with the user-file formats (calibrations, acceleration configs):
:func:`file_sha256`, :func:`document_sha256` (a JSON document's own checksum) and
:func:`read_json` (any parse problem becomes a ValueError naming the file).

The root is ``$DIFFRT_CACHE`` or ``~/.cache/diffrt``.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any, Callable

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
CHUNK = 1 << 20  # bytes hashed per read


def key_hash(key: dict[str, Any]) -> str:
    """sha256 (16 hex chars) of the key's canonical JSON."""
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]


def default_root() -> Path:
    return Path(os.environ.get("DIFFRT_CACHE") or Path.home() / ".cache" / "diffrt")


def file_sha256(path: str | Path) -> str:
    """sha256 (64 hex chars) of a file's bytes, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for chunk in iter(lambda: file.read(CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def document_sha256(document: dict[str, Any], exclude: str = "sha256") -> str:
    """sha256 of a JSON document's canonical form, without its own checksum entry ``exclude``."""
    content = {k: v for k, v in document.items() if k != exclude}
    return hashlib.sha256(json.dumps(content, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def read_json(path: str | Path) -> dict[str, Any]:
    """The JSON object in ``path``; ValueError ``"<path>: ..."`` for bytes that are not UTF-8, invalid or too
    deeply nested JSON, or a document that is not an object."""
    path = Path(path)
    try:
        document = json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as error:
        raise ValueError(f"{path}: not UTF-8 text ({error})") from error
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: is not JSON ({error})") from error
    except RecursionError as error:
        raise ValueError(f"{path}: JSON nested too deeply to be a diffrt file") from error
    if not isinstance(document, dict):
        raise ValueError(f"{path}: expected a JSON object, found {type(document).__name__}")
    return document


def folder_digests(folder: Path) -> dict[str, str]:
    """{path relative to ``folder``: sha256} of every file in it but the manifest."""
    return {file.relative_to(folder).as_posix(): file_sha256(file)
            for file in sorted(folder.rglob("*")) if file.is_file() and file.name != MANIFEST}


def check_digests(folder: Path, recorded: Any) -> None:
    """Raise ValueError naming the first file of ``recorded`` ({name: sha256}) that is missing or differs."""
    if not isinstance(recorded, dict):
        raise ValueError("the manifest records no file checksums (written by an older diffrt, or damaged)")
    for name, expected in sorted(recorded.items()):
        file = folder / name
        if not file.is_file():
            raise ValueError(f"{file} is missing")
        if not isinstance(expected, str) or file_sha256(file) != expected:
            raise ValueError(f"{file} does not match its sha256 (corrupt, truncated or modified)")


class ArtifactCache:
    """Folders of built files keyed by what they were built from (module docstring)."""

    def __init__(self, root: str | Path | None = None):
        self.root = Path(root) if root is not None else default_root()

    def folder(self, kind: str, key: dict[str, Any]) -> Path:
        return self.root / kind / key_hash(key)

    def lookup(self, kind: str, key: dict[str, Any], validate: Callable[[Path], None]) -> Path | None:
        """The folder of a finished artifact built for exactly ``key``, or None (the reason is logged).

        Every file's sha256 is checked against the manifest first; then ``validate(folder)`` raises
        (any exception) when the files are unusable.
        """
        folder = self.folder(kind, key)
        manifest = folder / MANIFEST
        if not manifest.is_file():
            log.info("%s cache: nothing built for this key yet (%s)", kind, folder)
            return None
        try:
            recorded = read_json(manifest)
        except (OSError, ValueError) as error:
            log.warning("%s cache: unreadable manifest (%s): rebuilding", kind, error)
            return None
        wanted = json.loads(json.dumps(key, default=str))
        found = recorded.get("key") if isinstance(recorded.get("key"), dict) else {}
        if found != wanted:
            changed = sorted(k for k in set(found) | set(wanted) if found.get(k) != wanted.get(k))
            log.warning("%s cache: %s was built for another %s: rebuilding", kind, folder, ", ".join(changed))
            return None
        try:
            check_digests(folder, recorded.get("files"))
            validate(folder)
        except Exception as error:  # noqa: BLE001 - whatever makes the files unusable means: rebuild
            log.warning("%s cache: %s is unusable (%s: %s): rebuilding", kind, folder, type(error).__name__, error)
            return None
        return folder

    def prepare(self, kind: str, key: dict[str, Any]) -> Path:
        """An empty folder for a new build of ``key`` (an old one, stale or broken, is removed first)."""
        folder = self.folder(kind, key)
        if folder.exists():
            shutil.rmtree(folder)
        folder.mkdir(parents=True)
        return folder

    def commit(self, folder: Path, key: dict[str, Any], details: dict[str, Any] | None = None) -> None:
        """Write the manifest, with the sha256 of every file: the build in ``folder`` is complete."""
        document = {**(details or {}), "key": json.loads(json.dumps(key, default=str)),
                    "files": folder_digests(folder)}
        (folder / MANIFEST).write_text(json.dumps(document, indent=1, sort_keys=True) + "\n")
