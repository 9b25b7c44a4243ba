"""What the dashboard shows, as JSON, read from a run directory's files (journal, Parquet,
manifests).

Contract: every function takes the dashboard's `RunReader` (each byte of the run directory read
once) and returns plain JSON-able dicts; they work on a running job (files still growing) and on a
finished one, local or remote. These are the documented API endpoints (README, "Dashboard API").
"""

from __future__ import annotations

import time

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from resilient.anomaly import store
from resilient.dashboard import cluster as cluster_view
from resilient.dashboard import evidence, series
from resilient.dashboard.reader import RunReader
from resilient.runlog.accounting import account
from resilient.runlog.states import TERMINAL
from resilient.runlog.status import fold


def state(rd: RunReader) -> dict:
    recs = rd.records()
    s = fold(recs)
    acc = account(recs)
    now = s["ended_at"] or time.time()
    progress = [r for r in recs if r["type"] == "progress"]
    eta = None
    if s["state"] == "RUNNING" and len(progress) >= 2 and s["total_steps"]:
        (a, b) = progress[max(0, len(progress) - 10)], progress[-1]
        rate = (b["step"] - a["step"]) / max(b["t"] - a["t"], 1e-9)
        eta = (s["total_steps"] - s["step"]) / rate if rate > 0 else None
    return {
        "name": s["name"],
        "run_id": s["run_id"],
        "run_dir": s["run_dir"],
        "state": s["state"],
        "step": s["step"],
        "total_steps": s["total_steps"],
        "loss": s["loss"],
        "tokens_per_s": s["tokens_per_s"],
        "restarts": s["restarts"],
        "world_size": s["world_size"],
        "resizes": s["resizes"],
        "eta_s": eta,
        "goodput": acc["goodput"],
        "lost_s": acc["lost_s"],
        "wall_s": acc["wall_s"],
        "started_at": s["started_at"],
        "ended_at": s["ended_at"],
        "now": now,
        "reason": s["reason"],
        "cordoned_nodes": s["cordoned_nodes"],
        "rollbacks": s["rollbacks"],
        "events": s["events"],
        "restores": s["restores"],
        "faults": acc["faults"],
        "preflight": s["preflight"],
        "hang_limits": s["hang_limits"],
    }


LABELS = {  # how each kind of journal record is marked on the timeline
    "fault": lambda r: f"fault: {r.get('kind')} rank {r.get('rank')} step {r.get('step')}",
    "decision": lambda r: f"decision: {r.get('action')}",
    "restart": lambda r: f"restart {r.get('n')}",
    "rollback": lambda r: f"rollback {r.get('from_step')} -> {r.get('to_step')}",
    "cordon": lambda r: f"cordon {str(r.get('node'))[:8]}",
    "restore": lambda r: f"restore step {r.get('step')} from {r.get('tier')}",
    "anomaly": lambda r: f"{r.get('kind')} ({r.get('severity')})",
    "chaos": lambda r: f"chaos: {r.get('fault')}",
    "resize": lambda r: f"resize {r.get('from')} -> {r.get('to')} ranks",
    "survivors": lambda r: f"kept ranks {r.get('kept')}, replaced {r.get('replaced')}",
    "preflight": lambda r: f"preflight node {r.get('index')}: {'ok' if r.get('ok') else 'FAIL'}",
}


def _detail(r: dict) -> str:
    """A mark's hover text: what the record says, one field a line."""
    skip = {"t", "type", "fault_index", "log", "chaos_key"}
    lines = []
    for k, v in r.items():
        if k in skip or v in (None, [], {}, ""):
            continue
        text = v if isinstance(v, str) else str(v)
        lines.append(f"{k}: {text.splitlines()[0][:120]}")
    return "<br>".join(lines[:12])


MARKS_KEPT = 2000


def timeline(rd: RunReader) -> dict:
    """Supervisor states as intervals, the faults, decisions and restarts on them (the newest
    MARKS_KEPT), and `view`: the span the page opens on (from training's first start, not the
    start-up)."""
    recs = rd.records()
    spans, marks = [], []
    for r in recs:
        if r["type"] == "transition":
            if spans:
                spans[-1]["end"] = r["t"]
            spans.append({"state": r["to"], "start": r["t"], "end": None, "cause": r.get("cause")})
        elif r["type"] in LABELS:
            label = LABELS[r["type"]](r)
            marks.append({"t": r["t"], "type": r["type"], "label": label, "detail": _detail(r)})
    if spans and spans[-1]["end"] is None:
        spans[-1]["end"] = time.time() if spans[-1]["state"] not in TERMINAL else spans[-1]["start"]
    # the start-up (PENDING, PREFLIGHT: agents, checks, spares warming) can outlast a short
    # run's training many times: the view opens where the first group starts
    begun = [sp["start"] for sp in spans if sp["state"] not in ("PENDING", "PREFLIGHT")]
    view = None
    if spans:
        start, end = (begun[0] if begun else spans[0]["start"]), spans[-1]["end"]
        pad = max(0.5, 0.02 * (end - start))
        view = {"start": start - pad, "end": end + pad}
    return {"spans": spans, "marks": marks[-MARKS_KEPT:], "view": view}


MAX_POINTS = 1200  # per curve: with its breaks, every list the page gets stays under 2,000
TRAIN_KEYS = ("loss", "grad_norm", "step_time", "compute_s", "tokens_per_s")
GPU_KEYS = ("util", "mem_used", "temp", "power_w")
HOST_KEYS = ("cpu_percent", "mem_percent")
RANKS_SHOWN = 8  # more ranks than this: the median and its band, each rank on demand


def _col(table: pa.Table, name: str) -> np.ndarray:
    """A numeric column as floats (null: NaN); all NaN where the table lacks it."""
    if name not in table.column_names:
        return np.full(table.num_rows, np.nan)
    return table[name].to_numpy(zero_copy_only=False).astype(float)


def _newer(table: pa.Table, since: float | None) -> pa.Table:
    return table if since is None else table.filter(pc.greater(table["t"], since))


def group_starts(recs: list[dict]) -> list[float]:
    """When each worker group started (a restart or a resize): the curves break there."""
    return [r["t"] for r in recs if r["type"] == "ranks"]


def metrics(
    rd: RunReader,
    last: int = MAX_POINTS,
    since: float | None = None,
    ranks: str = "auto",
) -> dict:
    """The training curves (the median over ranks with its band, each rank's where there are
    few or `ranks="all"`), the host and GPU series per node and the evaluations; each list at
    most `last` points (capped at MAX_POINTS), broken at every group start. `since`: only rows
    newer than it (the page's last `cursor`)."""
    cap = max(10, min(last, MAX_POINTS))
    recs = rd.records()
    starts = group_starts(recs)
    train = _newer(rd.table("metrics/train", store.TRAIN), since)
    t, step = _col(train, "t"), _col(train, "step").astype(np.int64)
    group = series.groups(t, starts)
    values = {k: _col(train, k) for k in TRAIN_KEYS}
    rank = _col(train, "rank").astype(np.int64)
    shown = sorted(set(rank.tolist()))
    if ranks == "none" or (ranks == "auto" and len(shown) > RANKS_SHOWN):
        shown = []
    elif ranks not in ("auto", "all"):
        wanted = {int(r) for r in ranks.split(",") if r.strip().isdigit()}
        shown = [r for r in shown if r in wanted]
    per_rank = {}
    for r in shown:
        idx = np.flatnonzero(rank == r)
        idx = idx[np.argsort(t[idx], kind="stable")]
        per_rank[str(r)] = series.means(
            {"t": t[idx], "step": step[idx]},
            {k: v[idx] for k, v in values.items()},
            group[idx],
            cap,
        )
    return {
        "ranks": per_rank,
        "world": len(set(rank.tolist())),
        "median": series.summary(step, t, group, values, cap),
        "gpus": _by_source(_newer(rd.table("metrics/gpu", store.GPU), since), "gpu", cap),
        "hosts": _hosts(_newer(rd.table("metrics/host", store.HOST), since), cap),
        "eval": _evals(recs, since, cap),
        "breaks": _breaks(recs, since),
        "cursor": float(np.nanmax(t)) if len(t) else since,
    }


def _by_source(table: pa.Table, kind: str, cap: int) -> dict[str, dict[str, list]]:
    """GPU series: one per node and device ("node8/gpuN")."""
    out = {}
    if not table.num_rows:
        return out
    t, node, dev = _col(table, "t"), table["node"].to_pylist(), _col(table, "gpu")
    keys = np.array([f"{n[:8]}/gpu{int(d)}" for n, d in zip(node, dev, strict=True)])
    for name in sorted(set(keys.tolist())):
        idx = np.flatnonzero(keys == name)
        idx = idx[np.argsort(t[idx], kind="stable")]
        cols = {k: _col(table, k)[idx] for k in GPU_KEYS}
        out[name] = series.means({"t": t[idx]}, cols, np.zeros(len(idx), np.int64), cap)
    return out


def _hosts(table: pa.Table, cap: int) -> dict[str, dict[str, list]]:
    """Each node's CPU and memory use (percent) and network rates (bytes/s, from its counters)."""
    out = {}
    if not table.num_rows:
        return out
    t, node = _col(table, "t"), np.array(table["node"].to_pylist())
    for name in sorted(set(node.tolist())):
        idx = np.flatnonzero(node == name)
        idx = idx[np.argsort(t[idx], kind="stable")]
        cols = {k: _col(table, k)[idx] for k in HOST_KEYS}
        tt = t[idx]
        for k in ("net_sent", "net_recv"):
            c = _col(table, k)[idx]
            with np.errstate(invalid="ignore", divide="ignore"):
                rate = np.diff(c, prepend=np.nan) / np.diff(tt, prepend=np.nan)
            cols[f"{k}_per_s"] = np.where(rate >= 0, rate, np.nan)  # a counter reset: no rate
        out[name[:8]] = series.means({"t": tt}, cols, np.zeros(len(idx), np.int64), cap)
    return out


def _evals(recs: list[dict], since: float | None, cap: int) -> dict[str, list]:
    ev = [r for r in recs if r["type"] == "eval" and (since is None or r["t"] > since)]
    ev = ev[-cap:]
    return {k: [r.get(k) for r in ev] for k in ("t", "step", "loss", "perplexity", "accuracy")}


def _breaks(recs: list[dict], since: float | None) -> list[dict]:
    """Where the curves break: each group start after the first (a restart, or a resize), with
    the step it went on from."""
    out, kind, first = [], "restart", True
    for r in recs:
        if r["type"] == "resize":
            kind = "resize"
        elif r["type"] == "ranks":
            if not first and (since is None or r["t"] > since):
                out.append({"t": r["t"], "kind": kind, "step": None})
            first, kind = False, "restart"
        elif r["type"] == "group_ready" and out and out[-1]["step"] is None:
            out[-1]["step"] = r.get("restored_step")
    return out


def events(rd: RunReader, kind: str | None = None, limit: int = 1000) -> list[dict]:
    """Anomaly events and faults with the action taken, newest first (optionally of one kind);
    the newest `limit`. A fault carries `fault`, its index (for `/api/fault/{i}`)."""
    out, index = [], -1
    for r in rd.records():
        if r["type"] == "anomaly":
            out.append(
                {
                    "t": r.get("event_t", r["t"]),
                    "kind": r["kind"],
                    "severity": r["severity"],
                    "node": r.get("node"),
                    "rank": r.get("rank"),
                    "step": r.get("step"),
                    "evidence": r.get("evidence"),
                    "action": r.get("decision"),
                }
            )
        elif r["type"] == "fault":
            index += 1
            if r.get("fault_class", r["kind"]) == "anomaly":  # its anomaly event is listed
                continue
            out.append(
                {
                    "t": r["detected_at"],
                    "kind": r["kind"],
                    "severity": "critical",
                    "node": r.get("node"),
                    "rank": r.get("rank"),
                    "step": r.get("step"),
                    "evidence": r.get("evidence"),
                    "action": None,
                    "fault": index,
                }
            )
        elif r["type"] == "decision" and out and out[-1]["action"] is None:
            out[-1]["action"] = r["action"]
    if kind:
        out = [e for e in out if e["kind"] == kind]
    return sorted(out, key=lambda e: e["t"], reverse=True)[:limit]


def checkpoints(rd: RunReader, limit: int = 200) -> list[dict]:
    """Snapshots (memory tier) with their size and blocking time, and when each reached storage;
    the newest `limit`."""
    out: dict[int, dict] = {}
    for r in rd.records():
        if r["type"] == "checkpoint":
            # the node agent's `persisted` may be journalled before rank 0's `checkpoint` record of
            # the same step (they come through different polls): never downgrade it to memory
            e = out.setdefault(r["step"], {"tier": "memory", "persisted_at": None, "bytes": None})
            e.update(step=r["step"], t=r["t"])
            # a survivor's flush (a restart's hand-over) blocked nothing; never blank a known size
            for k in ("bytes", "blocking_s"):
                if r.get(k) is not None or k not in e:
                    e[k] = r.get(k)
        elif r["type"] == "persisted":
            e = out.setdefault(
                r["step"],
                {"step": r["step"], "bytes": r.get("bytes"), "blocking_s": None, "t": r["t"]},
            )
            e.update(tier="storage", persisted_at=r.get("persisted_at"))
            if e.get("bytes") is None:
                e["bytes"] = r.get("bytes")
    return sorted(out.values(), key=lambda e: e["step"], reverse=True)[:limit]


def cluster(rd: RunReader) -> list[dict]:
    """Each node: its ranks, spares and agent, healthy/cordoned/lost and why, its faults."""
    return cluster_view.nodes(rd.records())


def fault(rd: RunReader, index: int) -> dict | None:
    """Fault `index` (as in `status --json`), the journal records around it and its rank's log
    lines before it (and the first of its replacement's): what the page shows when its row is
    opened. None: no such fault."""
    recs = rd.records()
    found = evidence.faults(recs)
    if not 0 <= index < len(found):
        return None
    rec = found[index][1]
    at = rec.get("injected_at") or rec.get("detected_at") or rec["t"]
    log = {"lines": [], "cut": 0}
    if isinstance(rec.get("rank"), int):
        log = evidence.log_excerpt(rd.log_lines(rec["rank"]), at)
    return {
        "fault": rec,
        "records": evidence.around(recs, index),
        "log": log,
        "rank": rec.get("rank"),
    }


def run_info(index: int, rd: RunReader) -> dict:
    s = fold(rd.records())
    return {
        "run": index,
        "name": s["name"],
        "run_id": s["run_id"],
        "run_dir": s["run_dir"],
        "state": s["state"],
    }


COMPARE_POINTS = 600


def compare(rd: RunReader) -> dict:
    """One run's side of a comparison: its loss by step (median over ranks, broken at restarts)
    and its lost time by cause."""
    recs = rd.records()
    s, acc = fold(recs), account(recs)
    train = rd.table("metrics/train", store.TRAIN)
    t, step = _col(train, "t"), _col(train, "step").astype(np.int64)
    loss = series.summary(
        step, t, series.groups(t, group_starts(recs)), {"loss": _col(train, "loss")},
        COMPARE_POINTS,
    )  # fmt: skip
    return {
        "name": s["name"],
        "run_id": s["run_id"],
        "state": s["state"],
        "step": s["step"],
        "restarts": s["restarts"],
        "goodput": acc["goodput"],
        "lost_s": acc["lost_s"],
        "wall_s": acc["wall_s"],
        "loss": {"step": loss["step"], "loss": loss["loss_med"]},
    }
