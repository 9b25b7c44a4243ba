"""The run's base model: published once in the run directory, fetched by workers that cannot see
the driver's disk into a cache that is per user, per content and written atomically.

Contract: `publish(rundir, local_dir)` uploads the model's files to `base_model/`, then
`base_model/manifest.json` (size and sha256 of each) last, so a manifest means a whole model.
`fetch(rundir)` returns a local directory holding that model: `<cache>/<content key>`, where the key
is the manifest's own hash and `<cache>` is the user's (`$XDG_CACHE_HOME` or `~/.cache`,
`/resilient/base`); a missing one is downloaded into a temporary folder beside it, every file
checked against the manifest, then renamed into place (ranks that race each get a whole model).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid

from resilient.rundir.fs import RunDir
from resilient.rundir.layout import BASE_MODEL

MANIFEST = "manifest.json"


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def publish(rundir: RunDir, local_dir: str) -> None:
    files = {}
    for name in sorted(os.listdir(local_dir)):
        path = os.path.join(local_dir, name)
        if os.path.isfile(path) and name != MANIFEST:
            with open(path, "rb") as f:
                data = f.read()
            rundir.write_bytes(f"{BASE_MODEL}/{name}", data)
            files[name] = {"size": len(data), "sha256": _sha256(data)}
    rundir.write_json(f"{BASE_MODEL}/{MANIFEST}", {"files": files})


def published(rundir: RunDir) -> bool:
    return rundir.exists(f"{BASE_MODEL}/{MANIFEST}")


def cache_root() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "resilient", "base")


def fetch(rundir: RunDir) -> str:
    raw = rundir.read_bytes(f"{BASE_MODEL}/{MANIFEST}")
    final = os.path.join(cache_root(), _sha256(raw)[:24])
    if os.path.isdir(final):
        return final
    manifest = json.loads(raw)
    tmp = f"{final}.tmp-{uuid.uuid4().hex[:8]}"
    os.makedirs(tmp)
    try:
        for name, info in manifest["files"].items():
            data = rundir.read_bytes(f"{BASE_MODEL}/{name}", info["size"])
            if _sha256(data) != info["sha256"]:
                raise OSError(f"{BASE_MODEL}/{name} does not match its manifest")
            with open(os.path.join(tmp, name), "wb") as f:
                f.write(data)
        os.rename(tmp, final)  # atomic; if another rank got there first, theirs stays
    except OSError:
        if not os.path.isdir(final):
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final
