"""A run directory, local or remote, reached through fsspec.

Contract: `RunDir(uri, storage_options)` names `<checkpoint.storage>/<name>/<run_id>/`; paths below
it are relative strings ("journal.jsonl", "checkpoints/step_00000010/manifest.json"). Writes of a
whole file are atomic where the filesystem allows it (local: write to a temp name, then rename;
object stores: a single PUT is atomic by nature). Nothing read from here is ever unpickled.
"""
from __future__ import annotations

import json
import os
import posixpath
import uuid
from typing import Any

import fsspec


class RunDir:
    """Filesystem access rooted at one run directory."""

    def __init__(self, uri: str, storage_options: dict[str, Any] | None = None):
        self.uri = uri.rstrip("/")
        self.storage_options = dict(storage_options or {})
        self.fs, self.root = fsspec.core.url_to_fs(self.uri, **self.storage_options)
        self.root = self.root.rstrip("/")

    @property
    def is_local(self) -> bool:
        return "file" in (self.fs.protocol if isinstance(self.fs.protocol, tuple) else (self.fs.protocol,))

    def local_path(self, rel: str = "") -> str:
        """The OS path of `rel`; only for a local run directory."""
        assert self.is_local, "local_path() on a remote run directory"
        return self.path(rel)

    def path(self, rel: str = "") -> str:
        return posixpath.join(self.root, rel) if rel else self.root

    def url(self, rel: str = "") -> str:
        return f"{self.uri}/{rel}" if rel else self.uri

    def exists(self, rel: str) -> bool:
        return self.fs.exists(self.path(rel))

    def makedirs(self, rel: str = "") -> None:
        self.fs.makedirs(self.path(rel), exist_ok=True)

    def write_bytes(self, rel: str, data: bytes) -> None:
        """Write a whole file atomically (readers see the old file or the new one, never a part)."""
        target = self.path(rel)
        if self.is_local:
            os.makedirs(os.path.dirname(target), exist_ok=True)
            tmp = f"{target}.tmp-{uuid.uuid4().hex[:8]}"
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, target)
        else:
            self.fs.pipe_file(target, data)

    def read_bytes(self, rel: str) -> bytes:
        return self.fs.cat_file(self.path(rel))

    def write_json(self, rel: str, obj: Any) -> None:
        self.write_bytes(rel, json.dumps(obj, indent=1, sort_keys=True).encode())

    def read_json(self, rel: str) -> Any:
        return json.loads(self.read_bytes(rel))

    def listdir(self, rel: str = "") -> list[str]:
        """Names (not paths) directly below `rel`; [] where it does not exist."""
        try:
            entries = self.fs.ls(self.path(rel), detail=False, refresh=True)
        except FileNotFoundError:
            return []
        return sorted(posixpath.basename(e.rstrip("/")) for e in entries)

    def remove(self, rel: str) -> None:
        try:
            self.fs.rm(self.path(rel), recursive=True)
        except FileNotFoundError:
            pass

    def upload_dir(self, local_dir: str, rel: str) -> None:
        """Copy a local directory's files (flat) to `rel`."""
        for name in sorted(os.listdir(local_dir)):
            src = os.path.join(local_dir, name)
            if os.path.isfile(src):
                with open(src, "rb") as f:
                    self.write_bytes(f"{rel}/{name}", f.read())

    def download_dir(self, rel: str, local_dir: str) -> None:
        """Copy the files directly below `rel` to a local directory."""
        os.makedirs(local_dir, exist_ok=True)
        for name in self.listdir(rel):
            with open(os.path.join(local_dir, name), "wb") as f:
                f.write(self.read_bytes(f"{rel}/{name}"))


def run_dir_for(storage: str, name: str, run_id: str, storage_options: dict[str, Any] | None = None) -> RunDir:
    """The run directory `<storage>/<name>/<run_id>`."""
    return RunDir(f"{storage.rstrip('/')}/{name}/{run_id}", storage_options)
