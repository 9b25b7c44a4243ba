"""Which persisted checkpoints to delete: a pure function.

Contract: `doomed(steps, keep, keep_every)` keeps the newest `keep` steps, every step that is a
multiple of `keep_every` (when > 0), and always the newest; it returns the rest, oldest first.
"""

from __future__ import annotations


def doomed(steps: list[int], keep: int, keep_every: int = 0) -> list[int]:
    steps = sorted(steps)
    kept = set(steps[-max(1, keep) :])
    if keep_every > 0:
        kept |= {s for s in steps if s % keep_every == 0}
    return [s for s in steps if s not in kept]
