"""The training curves the dashboard draws (`/api/metrics`), bounded and incremental.

Contract: `metrics(reader, last, cursor, ranks)` reads the run's Parquet metrics (one pyarrow table
per dataset: no Python object per step) and the journal, and returns every list at most `last`
points (capped at MAX_POINTS), broken at every worker group start (`series`). With the `cursor`
of a previous answer it sends only what came since (`Cursor`: positions, never times: the ranks'
rows arrive out of time order). The straggler heatmap covers the newest HEAT_STEPS steps.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from resilient.anomaly import store
from resilient.dashboard import series
from resilient.dashboard.reader import RunReader

MAX_POINTS = 1200  # per curve: with its breaks, every list the page gets stays under 2,000
BREAKS_KEPT = MAX_POINTS // 4  # the newest group starts drawn (the curves coalesce the rest)
HEAT_STEPS = 200  # the straggler heatmap: the newest steps
HEAT_RANKS = 64
TRAIN_KEYS = ("loss", "grad_norm", "step_time", "compute_s", "tokens_per_s")
GPU_KEYS = ("util", "mem_used", "temp", "power_w")
HOST_KEYS = ("cpu_percent", "mem_percent")
RANKS_SHOWN = 8  # more ranks than this: the median and its band, each rank on demand


def column(table: pa.Table, name: str) -> np.ndarray:
    """A numeric column as floats (null: NaN); all NaN where the table lacks it."""
    if name not in table.column_names:
        return np.full(table.num_rows, np.nan)
    return table[name].to_numpy(zero_copy_only=False).astype(float)


def _strings(table: pa.Table, name: str) -> np.ndarray:
    return np.asarray(table[name].to_numpy(zero_copy_only=False), dtype=object)


def group_starts(recs: list[dict]) -> list[float]:
    """When each worker group started (a restart or a resize): the curves break there."""
    return [r["t"] for r in recs if r["type"] == "ranks"]


@dataclass(frozen=True)
class Cursor:
    """Where the page's copy of the curves ends: the worker groups it knows, the last training
    step it holds (of the newest group), the host and GPU rows it holds (by position: rows are
    stored in arrival order, not time order) and the evaluations. Sent as `g.s.h.p.e`."""

    groups: int = 0
    step: int = -1
    host: int = 0
    gpu: int = 0
    evals: int = 0

    def __str__(self) -> str:
        return f"{self.groups}.{self.step}.{self.host}.{self.gpu}.{self.evals}"

    @classmethod
    def parse(cls, text: str | None) -> Cursor | None:
        try:
            return cls(*(int(x) for x in str(text).split("."))) if text else None
        except (TypeError, ValueError):
            return None


def metrics(
    rd: RunReader,
    last: int = MAX_POINTS,
    cursor: str | None = None,
    ranks: str = "auto",
) -> dict:
    """The training curves (the median over ranks with its band, each rank's where there are
    few or `ranks="all"`), the host and GPU series per node, the evaluations, the breaks (group
    starts) and the straggler heatmap; each list at most `last` points (capped at MAX_POINTS),
    broken at every group start. With the `cursor` of a previous answer: only what came since
    (`full` false: the page appends it; `eval` None when no evaluation came), unless a group
    started since, which sends everything again (`full` true)."""
    cap = max(10, min(last, MAX_POINTS))
    recs = rd.records()
    starts = group_starts(recs)
    evals = [r for r in recs if r["type"] == "eval"]
    train = rd.table("metrics/train", store.TRAIN)
    host, gpu = rd.table("metrics/host", store.HOST), rd.table("metrics/gpu", store.GPU)
    seen = Cursor.parse(cursor)
    full = seen is None or seen.groups != len(starts) or seen.host > host.num_rows
    full = full or seen.gpu > gpu.num_rows or seen.evals > len(evals)
    if full:
        seen = Cursor(groups=len(starts))
    t, step = column(train, "t"), column(train, "step").astype(np.int64)
    group = series.groups(t, starts)
    rank = column(train, "rank").astype(np.int64)
    cur = group == max(len(starts) - 1, 0)
    expected = _group_ranks(recs, rank[cur])
    rows, new_step = _training_rows(step, cur, rank, expected, None if full else seen.step)
    t, step, group, rank = t[rows], step[rows], group[rows], rank[rows]
    values = {k: column(train, k)[rows] for k in TRAIN_KEYS}
    world = len(expected)
    return {
        "full": full,
        "ranks": _per_rank(t, step, group, rank, values, ranks, cap),
        "world": world,
        "median": series.summary(step, t, group, values, cap),
        "gpus": _gpus(gpu, seen.gpu, cap),
        "hosts": _hosts(host, seen.host, cap),
        "eval": _evals(evals, starts, cap) if full or len(evals) > seen.evals else None,
        "breaks": _breaks(recs)[-BREAKS_KEPT:],
        "heat": _heat(train, starts, world),
        "cursor": str(Cursor(len(starts), new_step, host.num_rows, gpu.num_rows, len(evals))),
    }


def _group_ranks(recs: list[dict], seen: np.ndarray) -> np.ndarray:
    """The ranks of the newest worker group: as its `ranks` record names them, else those that
    reported."""
    for r in reversed(recs):
        if r["type"] == "ranks":
            named = [x["rank"] for x in r.get("ranks", []) if isinstance(x.get("rank"), int)]
            if named:
                return np.unique(named)
            break
    return np.unique(seen)


def _training_rows(
    step: np.ndarray, cur: np.ndarray, rank: np.ndarray, expected: np.ndarray, after: int | None
) -> tuple[np.ndarray, int]:
    """The rows to send and the step the page then holds of the newest group (`cur`): every
    earlier group's rows (`after` None: a full answer) and the newest group's steps after `after`
    up to the last one every one of its ranks (`expected`) has reported: a step some rank has
    not reported yet waits for the next poll (its median would move; ranks report out of step)."""
    ranks, inverse = np.unique(rank[cur], return_inverse=True)
    newest = np.full(len(ranks), -1, dtype=np.int64)  # each rank's newest step in the group
    np.maximum.at(newest, inverse, step[cur])
    found = np.isin(expected, ranks)
    # the newest step every rank of the group reported (-1 while one has reported none)
    done = int(newest[np.searchsorted(ranks, expected)].min()) if found.all() and len(ranks) else -1
    low = -1 if after is None else after
    now = cur & (step > low) & (step <= done)
    rows = np.flatnonzero(now if after is not None else (~cur | now))
    return rows, max(done, low)


def _per_rank(t, step, group, rank, values, ranks: str, cap: int) -> dict[str, dict]:
    shown = np.unique(rank).tolist()
    if ranks == "none" or (ranks == "auto" and len(shown) > RANKS_SHOWN):
        shown = []
    elif ranks not in ("auto", "all"):
        wanted = {int(r) for r in ranks.split(",") if r.strip().isdigit()}
        shown = [r for r in shown if r in wanted]
    out = {}
    for r in shown:
        idx = np.flatnonzero(rank == r)
        idx = idx[np.lexsort((t[idx], step[idx], group[idx]))]
        cols = {k: v[idx] for k, v in values.items()}
        out[str(r)] = series.means({"t": t[idx], "step": step[idx]}, cols, group[idx], cap)
    return out


def _gpus(table: pa.Table, start: int, cap: int) -> dict[str, dict[str, list]]:
    """GPU series, the rows from position `start` on: one per node and device ("node8/gpuN")."""
    table = table.slice(start)
    out = {}
    if not table.num_rows:
        return out
    t, node, dev = column(table, "t"), _strings(table, "node"), column(table, "gpu")
    for n in np.unique(node).tolist():
        on = node == n
        for d in np.unique(dev[on]):
            idx = np.flatnonzero(on & (dev == d))
            idx = idx[np.argsort(t[idx], kind="stable")]
            cols = {k: column(table, k)[idx] for k in GPU_KEYS}
            name = f"{str(n)[:8]}/gpu{int(d)}"
            out[name] = series.means({"t": t[idx]}, cols, np.zeros(len(idx), np.int64), cap)
    return out


def _hosts(table: pa.Table, start: int, cap: int) -> dict[str, dict[str, list]]:
    """Each node's CPU and memory use (percent) and network rates (bytes/s, from its counters),
    the rows from position `start` on (a rate from the row before, even an earlier poll's)."""
    out = {}
    if table.num_rows <= start:
        return out
    t, node = column(table, "t"), _strings(table, "node")
    for name in np.unique(node[start:]).tolist():
        idx = np.flatnonzero(node == name)
        idx = idx[np.argsort(t[idx], kind="stable")]
        tt = t[idx]
        cols = {k: column(table, k)[idx] for k in HOST_KEYS}
        for k in ("net_sent", "net_recv"):
            c = column(table, k)[idx]
            with np.errstate(invalid="ignore", divide="ignore"):
                rate = np.diff(c, prepend=np.nan) / np.diff(tt, prepend=np.nan)
            cols[f"{k}_per_s"] = np.where(rate >= 0, rate, np.nan)  # a counter reset: no rate
        keep = idx >= start
        cols = {k: v[keep] for k, v in cols.items()}
        n = int(keep.sum())
        out[str(name)[:8]] = series.means({"t": tt[keep]}, cols, np.zeros(n, np.int64), cap)
    return out


def _evals(evals: list[dict], starts: list[float], cap: int) -> dict[str, list]:
    """The evaluations by step (a step evaluated again after a rollback: the newest), the newest
    3/4 of `cap` (with a None between worker groups, each list stays under 2,000)."""
    by_step = {r["step"]: r for r in evals}
    ev = sorted(by_step.values(), key=lambda r: r["t"])[-(cap * 3 // 4) :]
    keys = ("t", "step", "loss", "perplexity", "accuracy")
    out: dict[str, list] = {k: [] for k in keys}
    group = series.groups(np.array([r["t"] for r in ev], dtype=float), starts)
    for i, r in enumerate(ev):
        if i and group[i] != group[i - 1]:
            for k in keys:
                out[k].append(None)
        for k in keys:
            out[k].append(r.get(k))
    return out


def _breaks(recs: list[dict]) -> list[dict]:
    """Where the curves break: each group start after the first (a restart, or a resize), with
    the step it went on from."""
    out, kind, first = [], "restart", True
    for r in recs:
        if r["type"] == "resize":
            kind = "resize"
        elif r["type"] == "ranks":
            if not first:
                out.append({"t": r["t"], "kind": kind, "step": None})
            first, kind = False, "restart"
        elif r["type"] == "group_ready" and out and out[-1]["step"] is None:
            out[-1]["step"] = r.get("restored_step")
    return out


def _heat(train: pa.Table, starts: list[float], world: int) -> dict | None:
    """Each rank's compute time over the median of its step, for the newest HEAT_STEPS steps of
    the newest group (its first HEAT_RANKS ranks); None with one rank."""
    if not train.num_rows or world < 2:
        return None
    tail = train.slice(max(0, train.num_rows - HEAT_STEPS * (world + 1)))
    t, step, rank = column(tail, "t"), column(tail, "step").astype(np.int64), column(tail, "rank")
    keep = series.groups(t, starts) == max(len(starts) - 1, 0)
    step, rank, comp = step[keep], rank[keep].astype(np.int64), column(tail, "compute_s")[keep]
    ranks = np.unique(rank)[:HEAT_RANKS]
    if len(ranks) < 2:
        return None
    steps = np.unique(step)[-HEAT_STEPS:]
    grid = np.full((len(ranks), len(steps)), np.nan)
    ok = np.isin(step, steps) & np.isin(rank, ranks)
    grid[np.searchsorted(ranks, rank[ok]), np.searchsorted(steps, step[ok])] = comp[ok]
    with np.errstate(invalid="ignore", divide="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a step no rank reported: all NaN
        ratio = grid / np.nanmedian(grid, axis=0)
    return {
        "steps": steps.tolist(),
        "ranks": ranks.tolist(),
        "z": [series.plain(row) for row in ratio],
    }
