"""Curves for the dashboard: rows bucketed to a bounded number of points, broken at every restart or
resize.

Contract: pure functions of numpy arrays (no I/O, no clock).
- `groups(t, starts)`: each row's worker group (how many group starts, `ranks` records, came
  before it): a curve never joins two groups with a line.
- `summary(step, t, group, values, max_points)`: the training curves of all ranks together, by
  step: per bucket of consecutive steps of one group, the median over every rank's rows and the
  band from their minimum to their maximum (a spike or a straggler stays visible after
  downsampling), with None between groups; `{"step", "t", "<k>_med", "<k>_lo", "<k>_hi"}`.
- `means(x, columns, group, max_points)`: one rank's (or one node's) series, bucket means, None
  between groups.
Every list has at most `max_points` entries plus one per segment (each segment gets a point even
where its share rounds to none) and one None per group break, with at most a quarter of
`max_points` segments (neighbours coalesce beyond): under 2,000 for 1,200, whatever the run's
length: a two-week run's page costs what a short one's does.
"""

from __future__ import annotations

import numpy as np


def groups(t: np.ndarray, starts: list[float]) -> np.ndarray:
    """The group of each row: the number of group starts at or before its time, minus one."""
    if not starts:
        return np.zeros(len(t), dtype=np.int64)
    return np.maximum(np.searchsorted(np.sort(np.asarray(starts)), t, side="right") - 1, 0)


def plain(a: np.ndarray) -> list:
    """JSON-able floats (6 decimals): NaN and infinities become None (JSON has neither)."""
    a = np.asarray(a, dtype=float)
    out = np.round(a, 6).tolist()
    for i in np.flatnonzero(~np.isfinite(a)).tolist():
        out[i] = None
    return out


def _budget(sizes: list[int], max_points: int) -> list[int]:
    """Buckets per segment, in proportion to its size, at least one each, `max_points` in all
    (or each segment's size, where smaller)."""
    total = sum(sizes)
    if total <= max_points:
        return list(sizes)
    return [max(1, min(n, int(max_points * n / total))) for n in sizes]


def _segments(group: np.ndarray, max_points: int) -> list[np.ndarray]:
    """Row indices of each group, in group order (rows of one group need not be adjacent). More
    groups than a quarter of `max_points` (hundreds of restarts): neighbours share a segment, so
    the breaks never outnumber the points."""
    limit = max(1, max_points // 4)
    if len(group) and int(group.max()) + 1 > limit:
        group = group // -(-(int(group.max()) + 1) // limit)
    order = np.argsort(group, kind="stable")
    cuts = np.flatnonzero(np.diff(group[order])) + 1
    return [s for s in np.split(order, cuts) if len(s)]


def _spread(v: np.ndarray, bucket: np.ndarray, n: int) -> tuple[np.ndarray, ...]:
    """Per bucket (0..n-1, rows in bucket order) the median, minimum and maximum of the finite
    values (NaN for a bucket without one), without a Python loop over the buckets."""
    ok = np.isfinite(v)
    v, bucket = v[ok], bucket[ok]
    order = np.lexsort((v, bucket))
    v, bucket = v[order], bucket[order]
    count = np.bincount(bucket, minlength=n)
    first = np.concatenate([[0], np.cumsum(count)[:-1]])
    med, lo, hi = np.full(n, np.nan), np.full(n, np.nan), np.full(n, np.nan)
    has = count > 0
    f, c = first[has], count[has]
    lo[has], hi[has] = v[f], v[f + c - 1]
    med[has] = (v[f + (c - 1) // 2] + v[f + c // 2]) / 2
    return med, lo, hi


def summary(
    step: np.ndarray,
    t: np.ndarray,
    group: np.ndarray,
    values: dict[str, np.ndarray],
    max_points: int,
) -> dict[str, list]:
    out: dict[str, list] = {"step": [], "t": []}
    for k in values:
        out[f"{k}_med"], out[f"{k}_lo"], out[f"{k}_hi"] = [], [], []
    segs = _segments(group, max_points)
    steps_of = [np.unique(step[s]) for s in segs]
    budget = _budget([len(u) for u in steps_of], max_points)
    for i, (seg, uniq, n) in enumerate(zip(segs, steps_of, budget, strict=True)):
        order = seg[np.argsort(step[seg], kind="stable")]
        s = step[order]
        edges = uniq[np.linspace(0, len(uniq), n + 1).astype(int)[:-1]]
        cut = np.searchsorted(s, edges, side="left")
        if i:
            for lst in out.values():
                lst.append(None)
        ends = np.array([*cut[1:], len(s)])
        out["step"] += [int(v) for v in s[ends - 1]]
        bucket = np.repeat(np.arange(len(cut)), ends - cut)  # each row's bucket
        sums = np.bincount(bucket, weights=t[order], minlength=len(cut))
        out["t"] += plain(sums / np.maximum(np.bincount(bucket, minlength=len(cut)), 1))
        for k, v in values.items():
            med, lo, hi = _spread(v[order], bucket, len(cut))
            out[f"{k}_med"] += plain(med)
            out[f"{k}_lo"] += plain(lo)
            out[f"{k}_hi"] += plain(hi)
    return out


def means(
    x: dict[str, np.ndarray], columns: dict[str, np.ndarray], group: np.ndarray, max_points: int
) -> dict[str, list]:
    """Bucket means of each column (and of each x in `x`, e.g. step and t), rows in the given
    order within a group, None between groups."""
    out: dict[str, list] = {k: [] for k in [*x, *columns]}
    segs = _segments(group, max_points)
    budget = _budget([len(s) for s in segs], max_points)
    for i, (seg, n) in enumerate(zip(segs, budget, strict=True)):
        cut = np.linspace(0, len(seg), n + 1).astype(int)[:-1]
        if i:
            for lst in out.values():
                lst.append(None)
        for k, v in [*x.items(), *columns.items()]:
            vals = v[seg].astype(float)
            ok = np.isfinite(vals)
            sums = np.add.reduceat(np.where(ok, vals, 0.0), cut)
            counts = np.add.reduceat(ok.astype(float), cut)
            with np.errstate(invalid="ignore", divide="ignore"):
                mean = np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)
            if k == "step":  # a bucket's step is its last: an axis of whole steps
                mean = np.array([v[seg][b - 1] for b in [*cut[1:], len(seg)]], dtype=float)
            out[k] += [int(v) for v in mean] if k == "step" else plain(mean)
    return out
