"""Random chaos: a seeded schedule of faults with exponential inter-arrival times (mean = MTBF).

Contract: `draws(mtbf_s, faults, seed, num_workers)` is pure: the same arguments give the same
endless sequence of (training seconds, fault, rank), drawn as the job goes, so a spec records the
seed and parameters (`[chaos.random]`), never thousands of entries. `parse_duration("60s")` reads
60, "60s", "5m", "1h".
"""

from __future__ import annotations

import random
from collections.abc import Iterator

from resilient.errors import UserError


def parse_duration(text: str) -> float:
    units = {"s": 1, "m": 60, "h": 3600}
    t = text.strip().lower()
    try:
        return float(t[:-1]) * units[t[-1]] if t and t[-1] in units else float(t)
    except ValueError:
        raise UserError(f"--chaos-mtbf {text!r}: give a duration such as 60s, 5m or 1h") from None


def draws(
    mtbf_s: float, faults: tuple[str, ...], seed: int, num_workers: int
) -> Iterator[tuple[float, str, int]]:
    """(seconds of training, fault, rank), forever, at exponential inter-arrival times."""
    if mtbf_s <= 0:
        raise UserError("--chaos-mtbf must be positive")
    r = random.Random(seed)
    t = 0.0
    while True:
        t += r.expovariate(1.0 / mtbf_s)
        yield round(t, 3), r.choice(faults), r.randrange(num_workers)
