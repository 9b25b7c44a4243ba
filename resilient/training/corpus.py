"""A small synthetic corpus the project generates itself (no download), for examples and tests."""

from __future__ import annotations

import random

WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu".split()


def write_corpus(path: str, lines: int = 4000, seed: int = 0) -> str:
    """Write `lines` lines of arithmetic sentences to `path` (same seed, same bytes) and return
    it."""
    r = random.Random(seed)
    with open(path, "w", encoding="utf-8") as f:
        for _ in range(lines):
            a, b = r.randrange(100), r.randrange(100)
            f.write(
                f"{r.choice(WORDS)} {a} plus {b} is {a + b}. {r.choice(WORDS)} {r.choice(WORDS)}\n"
            )
    return path
