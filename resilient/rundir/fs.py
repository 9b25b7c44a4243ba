"""A run directory, local or remote, reached through fsspec.

Contract: `RunDir(uri, storage_options)` names `<checkpoint.storage>/<name>/<run_id>/`; paths below
it are relative strings ("journal.jsonl", "checkpoints/step_00000010/manifest.json"). Writes of a
whole file are atomic where the filesystem allows it (local: write to a temp name, then rename;
object stores: a single PUT is atomic by nature). Nothing read from here is ever unpickled.

Every call on an object store is bounded in time, so a caller's retry loop (journal writer,
persister, control poller) always gets its turn: writes, listings, existence checks and deletes
raise `fsspec.exceptions.FSTimeoutError` after OP_TIMEOUT_S (+1 s per 5 MB written), and s3 clients
get connect/read timeouts and few botocore retries (`S3_CLIENT_DEFAULTS`, the user's `config_kwargs`
win). Why: botocore sends every PUT with `Expect: 100-continue` and aiohttp waits for the "100
Continue" without any timeout, so a PUT on a connection that went half-open during a network fault
would otherwise block its thread forever. Their sockets also give up on a dead link in the kernel
(`storage_socket`), so a request cut off by a partition never lands after it.
"""

from __future__ import annotations

import json
import os
import posixpath
import socket
import uuid
from typing import Any

import fsspec
from fsspec.asyn import AsyncFileSystem

OP_TIMEOUT_S = 60.0
WRITE_BYTES_PER_S = 5e6  # the slowest upload rate a write is given time for, beyond OP_TIMEOUT_S
S3_CLIENT_DEFAULTS = {"connect_timeout": 10, "read_timeout": 30, "retries": {"max_attempts": 3}}
TCP_USER_TIMEOUT_MS = 10_000  # bytes unacknowledged this long: the kernel drops the connection


def storage_socket(addr_info) -> socket.socket:
    """A TCP socket for object-store connections that the kernel aborts once sent bytes go
    unacknowledged for TCP_USER_TIMEOUT_MS. Why: a request caught by a network partition would
    otherwise sit in the kernel's send queue, retransmitted for minutes (even after its process
    ended), and reach storage when the link comes back: a write nobody is waiting for any more."""
    family, type_, proto = addr_info[0], addr_info[1], addr_info[2]
    sock = socket.socket(family=family, type=type_, proto=proto)
    if hasattr(socket, "TCP_USER_TIMEOUT"):  # Linux
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, TCP_USER_TIMEOUT_MS)
    return sock


def with_s3_defaults(uri: str, storage_options: dict[str, Any]) -> dict[str, Any]:
    """`storage_options` with bounded s3 client timeouts and sockets that give up on a dead link
    (`storage_socket`), unless the user (options or fsspec's FSSPEC_S3_* config) chose their
    own."""
    if not uri.startswith(("s3://", "s3a://")):
        return storage_options
    from fsspec.config import conf

    user = {
        **conf.get("s3", {}).get("config_kwargs", {}),
        **storage_options.get("config_kwargs", {}),
    }
    connector = {"socket_factory": storage_socket, **user.get("connector_args", {})}
    kwargs = {**S3_CLIENT_DEFAULTS, **user, "connector_args": connector}
    return {**storage_options, "config_kwargs": kwargs}


class RunDir:
    """Filesystem access rooted at one run directory."""

    def __init__(self, uri: str, storage_options: dict[str, Any] | None = None):
        self.uri = uri.rstrip("/")
        self.storage_options = dict(storage_options or {})
        self.fs, self.root = fsspec.core.url_to_fs(
            self.uri, **with_s3_defaults(self.uri, self.storage_options)
        )
        self.root = self.root.rstrip("/")

    def _bound(self, nbytes: int = 0) -> dict[str, float]:
        """The per-call time limit for an async (object store) filesystem; none for local files."""
        if isinstance(self.fs, AsyncFileSystem):
            return {"timeout": OP_TIMEOUT_S + nbytes / WRITE_BYTES_PER_S}
        return {}

    @property
    def is_local(self) -> bool:
        return "file" in (
            self.fs.protocol if isinstance(self.fs.protocol, tuple) else (self.fs.protocol,)
        )

    def local_path(self, rel: str = "") -> str:
        """The OS path of `rel`; only for a local run directory."""
        assert self.is_local, "local_path() on a remote run directory"
        return self.path(rel)

    def path(self, rel: str = "") -> str:
        return posixpath.join(self.root, rel) if rel else self.root

    def url(self, rel: str = "") -> str:
        return f"{self.uri}/{rel}" if rel else self.uri

    def exists(self, rel: str) -> bool:
        """Whether `rel` is there now: an object store is asked, not its client's cache of an
        earlier listing."""
        if not self.is_local:
            self.fs.invalidate_cache(self.path(rel))
        return self.fs.exists(self.path(rel), **self._bound())

    def gone(self, rel: str) -> bool:
        """Whether storage says now (past its client's cache) that `rel` is not there. Any other
        failure raises: an outage is never taken for a deletion (fsspec's generic `exists` says
        False on any error)."""
        path = self.path(rel)
        if not self.is_local:
            self.fs.invalidate_cache(path)
        try:
            self.fs.info(path, **self._bound())
        except FileNotFoundError:
            return True
        return False

    def makedirs(self, rel: str = "") -> None:
        self.fs.makedirs(self.path(rel), exist_ok=True, **self._bound())

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
            self.fs.pipe_file(target, data, **self._bound(len(data)))

    def read_bytes(self, rel: str, size_hint: int = 0) -> bytes:
        """A whole file; on an object store bounded like a write of `size_hint` bytes (give the
        size where it is known and large: a checkpoint's files)."""
        return self.fs.cat_file(self.path(rel), **self._bound(size_hint))

    def write_json(self, rel: str, obj: Any) -> None:
        self.write_bytes(rel, json.dumps(obj, indent=1, sort_keys=True).encode())

    def read_json(self, rel: str) -> Any:
        return json.loads(self.read_bytes(rel))

    def listdir(self, rel: str = "") -> list[str]:
        """Names (not paths) directly below `rel`; [] where it does not exist."""
        try:
            entries = self.fs.ls(self.path(rel), detail=False, refresh=True, **self._bound())
        except FileNotFoundError:
            return []
        return sorted(posixpath.basename(e.rstrip("/")) for e in entries)

    def find(self, rel: str = "") -> list[str]:
        """Every file below `rel`, as paths relative to the run directory, in one listing (an
        object store lists a prefix in pages of a thousand, not a folder at a time)."""
        try:
            found = self.fs.find(self.path(rel), **self._bound())
        except FileNotFoundError:
            return []
        finally:  # s3fs keeps every folder the listing saw, unbounded; it is never read back
            self.fs.invalidate_cache(self.path(rel))
        root = self.root + "/"
        return sorted(p[len(root) :] for p in found if p.startswith(root))

    def remove(self, rel: str) -> None:
        try:
            self.fs.rm(self.path(rel), recursive=True, **self._bound())
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


OUTAGE_NAMES = frozenset(
    {  # what clients (botocore, aiohttp) call a storage that does not answer
        "ConnectionError",
        "EndpointConnectionError",
        "ConnectTimeoutError",
        "ReadTimeoutError",
        "ClientConnectionError",
        "ServerDisconnectedError",
        "HTTPClientError",
    }
)


def is_outage(e: BaseException) -> bool:
    """Whether `e` says storage did not answer (refused, reset, timed out, 5xx), as opposed to a
    missing file or a refused permission, which waiting does not mend."""
    if isinstance(e, FileNotFoundError | PermissionError):
        return False
    return isinstance(e, OSError) or bool(OUTAGE_NAMES & {c.__name__ for c in type(e).__mro__})


def run_dir_for(
    storage: str, name: str, run_id: str, storage_options: dict[str, Any] | None = None
) -> RunDir:
    """The run directory `<storage>/<name>/<run_id>`."""
    return RunDir(f"{storage.rstrip('/')}/{name}/{run_id}", storage_options)
