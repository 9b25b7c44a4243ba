"""Random chaos: a seeded schedule of faults with exponential inter-arrival times (mean = MTBF).

Contract: `random_schedule(mtbf_s, faults, seed, num_workers, horizon_s)` is pure: the same
arguments give the same list of `[[chaos]]` entries (dicts with `at_time`, `fault`, `rank`).
`parse_duration("60s")` reads 60, "60s", "5m", "1h".
"""

from __future__ import annotations

import random

from resilient.errors import UserError


def parse_duration(text: str) -> float:
    units = {"s": 1, "m": 60, "h": 3600}
    t = text.strip().lower()
    try:
        return float(t[:-1]) * units[t[-1]] if t and t[-1] in units else float(t)
    except ValueError:
        raise UserError(f"--chaos-mtbf {text!r}: give a duration such as 60s, 5m or 1h") from None


def random_schedule(
    mtbf_s: float,
    faults: tuple[str, ...],
    seed: int,
    num_workers: int,
    horizon_s: float = 7 * 24 * 3600,
    limit: int = 10_000,
) -> list[dict]:
    if mtbf_s <= 0:
        raise UserError("--chaos-mtbf must be positive")
    r = random.Random(seed)
    out, t = [], 0.0
    while len(out) < limit:
        t += r.expovariate(1.0 / mtbf_s)
        if t > horizon_s:
            break
        out.append(
            {"at_time": round(t, 3), "fault": r.choice(faults), "rank": r.randrange(num_workers)}
        )
    return out
