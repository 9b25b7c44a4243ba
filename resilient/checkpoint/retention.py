"""Which persisted checkpoints to delete: a pure function.

Contract: `doomed(steps, keep, keep_every, keep_best, scores)` keeps the newest `keep` steps, every
step that is a multiple of `keep_every` (when > 0), the `keep_best` steps with the lowest score
among `scores` (step -> eval loss; a step without a finite score is never among the best; ties:
the earlier step), and always the newest; it returns the rest, oldest first. `best(scores)` is the
step with the lowest finite score, by the same rule, or None.
"""

from __future__ import annotations

import math


def doomed(
    steps: list[int],
    keep: int,
    keep_every: int = 0,
    keep_best: int = 0,
    scores: dict[int, float] | None = None,
) -> list[int]:
    steps = sorted(steps)
    kept = set(steps[-max(1, keep) :])
    if keep_every > 0:
        kept |= {s for s in steps if s % keep_every == 0}
    if keep_best > 0 and scores:
        present = set(steps)
        kept |= set(_ranked({s: v for s, v in scores.items() if s in present})[:keep_best])
    return [s for s in steps if s not in kept]


def best(scores: dict[int, float]) -> int | None:
    """The step with the lowest score (ties: the earlier), or None without any."""
    ranked = _ranked(scores)
    return ranked[0] if ranked else None


def _ranked(scores: dict[int, float]) -> list[int]:
    # NaN compares false with everything and would scramble the order: it is no score at all.
    return [s for _, s in sorted((v, s) for s, v in scores.items() if math.isfinite(v))]
