"""The run's staged inputs (the base model, the tokenised data): published once in the run directory
at launch, read by workers that cannot see the driver's disk, so the user's input files may be gone
once the job runs.

Contract: `publish(rundir, local_dir, prefix)` uploads the folder's files to `<prefix>/`, then
`<prefix>/manifest.json` (size and sha256 of each) last, so a manifest means a whole folder.
`local_dir(rundir, prefix)` is a local directory holding it: the run directory's own folder where
that is local, otherwise `fetch`: `<cache>/<content key>`, where the key is the manifest's own hash
and `<cache>` is the user's (`$XDG_CACHE_HOME` or `~/.cache`, `/resilient/base`); a missing one is
downloaded into a temporary folder beside it, every file checked against the manifest, then renamed
into place (ranks that race each get a whole folder).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid

from resilient.rundir.fs import RunDir

MANIFEST = "manifest.json"


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def publish(rundir: RunDir, local_dir: str, prefix: str) -> None:
    files = {}
    for name in sorted(os.listdir(local_dir)):
        path = os.path.join(local_dir, name)
        if os.path.isfile(path) and name != MANIFEST:
            with open(path, "rb") as f:
                data = f.read()
            rundir.write_bytes(f"{prefix}/{name}", data)
            files[name] = {"size": len(data), "sha256": _sha256(data)}
    rundir.write_json(f"{prefix}/{MANIFEST}", {"files": files})


def published(rundir: RunDir, prefix: str) -> bool:
    return rundir.exists(f"{prefix}/{MANIFEST}")


def cache_root() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "resilient", "base")


def local_dir(rundir: RunDir, prefix: str) -> str:
    return rundir.local_path(prefix) if rundir.is_local else fetch(rundir, prefix)


def fetch(rundir: RunDir, prefix: str) -> str:
    raw = rundir.read_bytes(f"{prefix}/{MANIFEST}")
    final = os.path.join(cache_root(), _sha256(raw)[:24])
    if os.path.isdir(final):
        return final
    manifest = json.loads(raw)
    tmp = f"{final}.tmp-{uuid.uuid4().hex[:8]}"
    os.makedirs(tmp)
    try:
        for name, info in manifest["files"].items():
            data = rundir.read_bytes(f"{prefix}/{name}", info["size"])
            if _sha256(data) != info["sha256"]:
                raise OSError(f"{prefix}/{name} does not match its manifest")
            with open(os.path.join(tmp, name), "wb") as f:
                f.write(data)
        os.rename(tmp, final)  # atomic; if another rank got there first, theirs stays
    except OSError:
        if not os.path.isdir(final):
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final
