"""A disk cache for built artifacts (ONNX exports, TensorRT engines) that never reuses a stale file.

Each artifact lives in ``<root>/<kind>/<key hash>/`` with a ``manifest.json`` that records the full
key (what it was built from and for: model and calibration hashes, shapes, precision, GPU, library
versions). :meth:`ArtifactCache.lookup` returns the folder only when the manifest exists, its key
equals the one asked for, and the caller's ``validate(folder)`` accepts the files; anything else
(no manifest, another key, a corrupt or truncated file) is logged with the reason and answered
None, so the caller rebuilds. :meth:`ArtifactCache.commit` writes the manifest last, after the
files are complete, so an interrupted build is never mistaken for a finished one.

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


def key_hash(key: dict[str, Any]) -> str:
    """sha256 (16 hex chars) of the key's canonical JSON."""
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]


def default_root() -> Path:
    return Path(os.environ.get("DIFFRT_CACHE") or Path.home() / ".cache" / "diffrt")


class ArtifactCache:
    """Folders of built files keyed by what they were built from (module docstring)."""

    def __init__(self, root: str | Path | None = None):
        self.root = Path(root) if root is not None else default_root()

    def folder(self, kind: str, key: dict[str, Any]) -> Path:
        return self.root / kind / key_hash(key)

    def lookup(self, kind: str, key: dict[str, Any], validate: Callable[[Path], None]) -> Path | None:
        """The folder of a finished artifact built for exactly ``key``, or None (the reason is logged).

        ``validate(folder)`` raises (any exception) when the files are unusable.
        """
        folder = self.folder(kind, key)
        manifest = folder / MANIFEST
        if not manifest.is_file():
            log.info("%s cache: nothing built for this key yet (%s)", kind, folder)
            return None
        try:
            recorded = json.loads(manifest.read_text())
        except (OSError, ValueError) as error:
            log.warning("%s cache: unreadable manifest %s (%s): rebuilding", kind, manifest, error)
            return None
        if recorded.get("key") != json.loads(json.dumps(key, default=str)):
            changed = sorted(k for k in set(recorded.get("key", {})) | set(key)
                             if recorded.get("key", {}).get(k) != json.loads(json.dumps(key, default=str)).get(k))
            log.warning("%s cache: %s was built for another %s: rebuilding", kind, folder, ", ".join(changed))
            return None
        try:
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
        """Write the manifest: the build in ``folder`` is complete."""
        document = {"key": json.loads(json.dumps(key, default=str)), **(details or {})}
        (folder / MANIFEST).write_text(json.dumps(document, indent=1, sort_keys=True) + "\n")
