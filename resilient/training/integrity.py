"""Integrity: what the ranks compare to catch silent data corruption, and what a comparison means.

Contract (pure but for `digest`, which reads tensors):
- `digest(tensors)`: a 63-bit integer of the tensors' bytes (sha256), the same on any rank that
  holds the same values bit for bit.
- `audit_target(rank, world)`: whose work a rank recomputes at an audit (the next rank: ranks are
  spread over nodes in order, so it is on another node where there is one).
- `judge(rows, world, audited)`: from every rank's `(state digest, own gradient digest, audit
  digest)` row, as the all-gather gives them (the same on every rank): whether the replicas agree,
  which ranks' replicas differ from the majority (3+ ranks; with 2 nobody is outvoted), and which
  audits failed (the auditor's recomputation of its target's first microbatch does not match the
  target's own gradient). Audits are judged only where the replicas agree: an auditor whose
  weights differ recomputes a different gradient, which says nothing of the target's compute.
  `Check` is the answer, the same on every rank.
- `culprit_of(failed, world)`: the rank whose work is wrong, when the failed audits name one: a bad
  rank fails both the audit of its work and its own audit of the next rank's (with 3+ ranks, the
  one rank common to both); with 2 ranks both audits fail and the known-answer test decides.
- `known_answer(device, corrupt)`: a fixed computation whose exact result is known (integers small
  enough that float32 holds every product and sum exactly): True when the device gets it right.
"""

from __future__ import annotations

import hashlib
import struct
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch

MASK = (1 << 63) - 1


def digest(tensors: Iterable[torch.Tensor | None]) -> int:
    h = hashlib.sha256()
    for t in tensors:
        if t is None:
            h.update(b"none")
            continue
        t = t.detach()
        if t.device.type != "cpu":
            t = t.cpu()
        h.update(str(t.dtype).encode())
        h.update(
            t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""
        )
    return struct.unpack("<q", h.digest()[:8])[0] & MASK


def audit_target(rank: int, world: int) -> int:
    return (rank + 1) % world


@dataclass(frozen=True)
class Check:
    step: int
    agreed: bool  # every replica's state digest is the same
    odd: tuple[int, ...] = ()  # ranks outvoted by the majority (3+ ranks)
    failed_audits: tuple[tuple[int, int], ...] = ()  # (auditor, target) whose digests differ
    digests: tuple[int, ...] = ()  # each rank's state digest

    @property
    def ok(self) -> bool:
        return self.agreed and not self.failed_audits


def judge(rows: Sequence[Sequence[int]], step: int, audited: bool) -> Check:
    world = len(rows)
    states = [int(r[0]) for r in rows]
    counts = Counter(states)
    top, n = counts.most_common(1)[0]
    agreed = len(counts) == 1
    odd = tuple(r for r, d in enumerate(states) if d != top) if n * 2 > world else ()
    failed = ()
    if audited and agreed and world > 1:
        failed = tuple(
            (a, audit_target(a, world))
            for a in range(world)
            if int(rows[a][2]) != int(rows[audit_target(a, world)][1])
        )
    return Check(step, agreed, () if agreed else odd, failed, tuple(states))


def culprit_of(failed: Sequence[tuple[int, int]], world: int) -> int | None:
    if world < 3 or not failed:
        return None
    seen = Counter(r for pair in failed for r in pair)
    worst = [r for r, c in seen.items() if c >= 2]
    return worst[0] if len(worst) == 1 else None


KNOWN = 64  # the known-answer matrices' size


def known_answer(device: torch.device, corrupt: bool = False) -> bool:
    """A @ B of small integers in float32 (every value exact) compared with the same product in
    int64 on the CPU; `corrupt` (chaos `bad_compute`) perturbs the device's result as a faulty
    unit would."""
    idx = torch.arange(KNOWN * KNOWN, dtype=torch.int64).reshape(KNOWN, KNOWN)
    a, b = (idx * 7 + 3) % 13 - 6, (idx * 5 + 1) % 11 - 5
    want = a @ b
    got = a.to(device, torch.float32) @ b.to(device, torch.float32)
    if corrupt:
        got = got * (1 + 2**-10)
    return bool(torch.equal(got.cpu().to(torch.int64), want)) and bool(
        torch.equal(got.cpu(), want.to(torch.float32))
    )
