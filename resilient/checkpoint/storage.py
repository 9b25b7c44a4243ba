"""Checkpoints in a run directory: atomic commit by manifest, verification, listing, retention.

Contract: a checkpoint `checkpoints/step_<step>/` is visible only once its `manifest.json` (sizes
and sha256 of every file, written last) exists; a writer that dies earlier leaves nothing visible.
`load(step)` returns the files only if every checksum, the step and (when given) the spec
fingerprint match; otherwise it raises `CheckpointInvalid` with the reason. A manifest may carry
the step's evaluation (`"eval": {"loss": ...}`): `eval_loss(manifest)` reads it (None without a
finite one), `store.scores()` maps the committed steps to theirs, and `retain` keeps the best.
"""

from __future__ import annotations

import hashlib
import math
import time
from typing import Any

from resilient.checkpoint import retention
from resilient.rundir import RunDir
from resilient.rundir.layout import FENCE

MANIFEST = "manifest.json"
PREFIX = "checkpoints"


class CheckpointInvalid(Exception):
    """A checkpoint that must not be restored; the message says why."""


class Fenced(Exception):
    """The writer lost its lease (its node was cut off): it must not touch storage again."""


def _check(may_write) -> None:
    if not may_write():
        raise Fenced("this writer's lease ran out: no more writes")


def generation_fence(rundir: RunDir, mine: int) -> None:
    """Raise Fenced when the run directory's fence (`layout.FENCE`, written by the supervisor when
    it writes a node off) names a newer generation than `mine`: this writer is a zombie of an
    earlier one. A missing fence is generation 0."""
    try:
        fence = rundir.read_json(FENCE).get("generation", 0)
    except FileNotFoundError:
        return
    if fence > mine:
        raise Fenced(f"stale writer: generation {mine} < the run's fence {fence}")


def make_manifest(step: int, files: dict[str, bytes], fingerprint: str, **extra: Any) -> dict:
    """The manifest of a checkpoint: sizes and sha256 of every file, the step and the spec
    fingerprint."""
    return {
        "format": 1,
        "step": step,
        "fingerprint": fingerprint,
        "created_at": time.time(),
        "files": {n: {"size": len(b), "sha256": sha256(b)} for n, b in files.items()},
        **extra,
    }


def eval_loss(manifest: dict) -> float | None:
    """The eval loss a manifest carries, or None (not evaluated, or not a finite number: a step
    whose evaluation diverged is never the best)."""
    loss = (manifest.get("eval") or {}).get("loss")
    ok = isinstance(loss, (int, float)) and not isinstance(loss, bool) and math.isfinite(loss)
    return float(loss) if ok else None


def verify_files(
    files: dict[str, bytes], manifest: dict, step: int, fingerprint: str | None = None
) -> None:
    """Raise CheckpointInvalid unless `files` match `manifest` (sizes, checksums), its step and
    fingerprint.

    Only the files present are checked, so a rank may fetch and verify just the parts it needs."""
    if manifest.get("step") != step:
        raise CheckpointInvalid(f"step {step}: manifest says step {manifest.get('step')}")
    if fingerprint and manifest.get("fingerprint") != fingerprint:
        raise CheckpointInvalid(
            f"step {step}: written by a different spec "
            f"(fingerprint {manifest.get('fingerprint')} != {fingerprint})"
        )
    for name, data in files.items():
        info = manifest["files"].get(name)
        if info is None:
            raise CheckpointInvalid(f"step {step}: {name} is not in the manifest")
        if len(data) != info["size"] or sha256(data) != info["sha256"]:
            raise CheckpointInvalid(
                f"step {step}: {name} checksum mismatch (size {len(data)}, want {info['size']})"
            )


def ckpt_dir(step: int) -> str:
    return f"{PREFIX}/step_{step:08d}"


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class CheckpointStore:
    """The persisted checkpoints of one run."""

    def __init__(self, rundir: RunDir):
        self.rundir = rundir

    def commit(
        self, files: dict[str, bytes], manifest: dict, may_write=lambda: True, generation=None
    ) -> dict:
        """Write `files`, then the manifest that makes them visible. Returns the manifest as
        written. `may_write()` is asked before every request, and the run's fence before the
        manifest when the writer has a `generation()` (both raise Fenced)."""
        d = ckpt_dir(manifest["step"])
        for name, data in files.items():
            _check(may_write)
            self.rundir.write_bytes(f"{d}/{name}", data)
        manifest = {**manifest, "persisted_at": time.time()}
        _check(may_write)
        if generation is not None:
            generation_fence(self.rundir, generation())
        self.rundir.write_json(f"{d}/{MANIFEST}", manifest)
        return manifest

    def steps(self) -> list[int]:
        """Steps of committed checkpoints (manifest present), oldest first: one listing."""
        out = []
        for path in self.rundir.find(PREFIX):
            parts = path.split("/")
            if len(parts) == 3 and parts[2] == MANIFEST and parts[1].startswith("step_"):
                out.append(int(parts[1][5:]))
        return sorted(out)

    def manifest(self, step: int) -> dict:
        try:
            return self.rundir.read_json(f"{ckpt_dir(step)}/{MANIFEST}")
        except (FileNotFoundError, ValueError) as e:
            raise CheckpointInvalid(f"step {step}: manifest unreadable ({e})") from None

    def eval_loss(self, step: int) -> float | None:
        """Step `step`'s eval loss from its manifest; None without one or with an unreadable
        manifest (storage errors other than a missing or damaged manifest propagate)."""
        try:
            return eval_loss(self.manifest(step))
        except CheckpointInvalid:
            return None

    def load(self, step: int, fingerprint: str | None = None) -> dict[str, bytes]:
        """The verified files of checkpoint `step`."""
        m = self.manifest(step)
        files = {}
        for name, info in m["files"].items():
            try:
                files[name] = self.rundir.read_bytes(f"{ckpt_dir(step)}/{name}", info["size"])
            except FileNotFoundError:
                raise CheckpointInvalid(f"step {step}: {name} missing") from None
        verify_files(files, m, step, fingerprint)
        return files

    def verify(self, step: int, fingerprint: str | None = None) -> None:
        self.load(step, fingerprint)

    def scores(self, steps: list[int] | None = None) -> dict[int, float]:
        """step -> eval loss of the committed checkpoints (of `steps`) that have one: a manifest
        read each."""
        out = {}
        for s in self.steps() if steps is None else steps:
            loss = self.eval_loss(s)
            if loss is not None:
                out[s] = loss
        return out

    def discard(self, step: int) -> None:
        """Make checkpoint `step` invisible (its manifest first), then delete its files: a state
        from a timeline a rollback abandoned. Storage errors propagate."""
        self.rundir.remove(f"{ckpt_dir(step)}/{MANIFEST}")
        self.rundir.remove(ckpt_dir(step))

    def retain(
        self,
        keep: int,
        keep_every: int = 0,
        steps: list[int] | None = None,
        protected: set[int] | frozenset[int] = frozenset(),
        may_write=lambda: True,
        generation=None,
        keep_best: int = 0,
        scores: dict[int, float] | None = None,
    ) -> list[int]:
        """Delete what `retention.doomed` dooms among `steps` (default: a listing of the committed
        ones; `keep_best` of them by `scores` kept), never a `protected` step, asking
        `may_write()` before each. Returns the deleted steps."""
        committed = self.steps() if steps is None else steps
        doomed = retention.doomed(committed, keep, keep_every, keep_best, scores)
        doomed = [s for s in doomed if s not in protected]
        if doomed and generation is not None:
            generation_fence(self.rundir, generation())
        done = []
        for step in doomed:
            _check(may_write)
            self.rundir.remove(ckpt_dir(step))
            done.append(step)
        return done
