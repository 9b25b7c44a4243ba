"""Samples packed into sequences: best-fit decreasing, a pure function.

Contract: `pack(lengths, capacity)` returns bins of sample indices (each bin's lengths sum to at
most `capacity`; every index in exactly one bin): samples taken longest first (ties: lower index
first), each into the fullest bin it still fits, else a new one. Same lengths, same bins. Bins come
in the order they were opened, each listing its samples in the order they went in.
"""

from __future__ import annotations

import bisect


def pack(lengths: list[int], capacity: int) -> list[list[int]]:
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    bins: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (room left, bin), sorted: the fullest fitting bin first
    for i in order:
        n = lengths[i]
        if n > capacity:
            raise ValueError(f"sample {i} has {n} tokens, more than {capacity}")
        k = bisect.bisect_left(free, (n, -1))
        if k < len(free):
            room, b = free.pop(k)
        else:
            room, b = capacity, len(bins)
            bins.append([])
        bins[b].append(i)
        if room - n > 0:
            bisect.insort(free, (room - n, b))
    return bins
