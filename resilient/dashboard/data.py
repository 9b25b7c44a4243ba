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

from resilient.anomaly import store
from resilient.dashboard import cluster as cluster_view
from resilient.dashboard import evidence, series
from resilient.dashboard.curves import column, group_starts
from resilient.dashboard.reader import RunReader
from resilient.runlog.accounting import account
from resilient.runlog.states import TERMINAL
from resilient.runlog.status import fold

KEPT = 500  # the newest entries of each list /api/state sends (faults, restores, ...)


def state(rd: RunReader) -> dict:
    """The header's figures, the lost time by cause, the preflight and the faults (the newest
    KEPT of each list; each fault with its `index` for `/api/fault/{i}`)."""
    out = dict(rd.derived("state", _state))
    now = out["ended_at"] or time.time()
    out["now"] = now
    return out


def _state(recs: list[dict]) -> dict:
    s = fold(recs)
    acc = account(recs, s)
    progress = [r for r in recs[-2000:] if r["type"] == "progress"]
    eta = None
    if s["state"] == "RUNNING" and len(progress) >= 2 and s["total_steps"]:
        (a, b) = progress[max(0, len(progress) - 10)], progress[-1]
        rate = (b["step"] - a["step"]) / max(b["t"] - a["t"], 1e-9)
        eta = (s["total_steps"] - s["step"]) / rate if rate > 0 else None
    faults = [{**f, "index": i} for i, f in enumerate(acc["faults"])]
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
        "resizes": s["resizes"][-KEPT:],
        "eta_s": eta,
        "goodput": acc["goodput"],
        "lost_s": acc["lost_s"],
        "wall_s": acc["wall_s"],
        "started_at": s["started_at"],
        "ended_at": s["ended_at"],
        "reason": s["reason"],
        "cordoned_nodes": s["cordoned_nodes"],
        "rollbacks": s["rollbacks"][-KEPT:],
        "events": s["events"],
        "restores": s["restores"][-KEPT:],
        "faults": faults[-KEPT:],
        "faults_total": len(faults),
        "preflight": s["preflight"][-KEPT:],
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


MARKS_KEPT = 2000  # the newest marks and the newest state spans the timeline gets
DRAWN = ("fault", "decision", "restart", "rollback", "cordon", "resize", "survivors", "chaos")


def timeline(rd: RunReader) -> dict:
    """Supervisor states as intervals and the faults, decisions and restarts on them (the newest
    MARKS_KEPT of each), and `view`: the span the page opens on (from training's first start, not
    the start-up)."""
    out = dict(rd.derived("timeline", _timeline))
    spans = out["spans"]
    if spans and spans[-1]["end"] is None:  # the state now: it lasts until this answer
        last = dict(spans[-1], end=time.time())
        out["spans"] = [*spans[:-1], last]
        out["view"] = _view(out["spans"], out["begun"])
    return out


def _timeline(recs: list[dict]) -> dict:
    spans, marks = [], []
    begun = None
    for r in recs:
        if r["type"] == "transition":
            if spans:
                spans[-1]["end"] = r["t"]
            spans.append({"state": r["to"], "start": r["t"], "end": None, "cause": r.get("cause")})
            if begun is None and r["to"] not in ("PENDING", "PREFLIGHT"):
                begun = r["t"]
        elif r["type"] in DRAWN:
            label = LABELS[r["type"]](r)
            marks.append({"t": r["t"], "type": r["type"], "label": label, "detail": _detail(r)})
    if spans and spans[-1]["state"] in TERMINAL:
        spans[-1]["end"] = spans[-1]["start"]
    spans = spans[-MARKS_KEPT:]
    view = _view(spans, begun)
    return {"spans": spans, "marks": marks[-MARKS_KEPT:], "view": view, "begun": begun}


def _view(spans: list[dict], begun: float | None) -> dict | None:
    """The start-up (PENDING, PREFLIGHT: agents, checks, spares warming) can outlast a short run's
    training many times: the view opens where the first group starts."""
    if not spans:
        return None
    start, end = max(begun or spans[0]["start"], spans[0]["start"]), spans[-1]["end"]
    end = end if end is not None else time.time()
    pad = max(0.5, 0.02 * (end - start))
    return {"start": start - pad, "end": end + pad}


def events(rd: RunReader, kind: str | None = None, limit: int = 1000) -> list[dict]:
    """Anomaly events and faults with the action taken, newest first (optionally of one kind);
    the newest `limit`. A fault carries `fault`, its index (for `/api/fault/{i}`)."""
    out = rd.derived("events", _events)
    if kind:
        out = [e for e in out if e["kind"] == kind]
    return out[:limit]


def _events(recs: list[dict]) -> list[dict]:
    out, index = [], -1
    for r in recs:
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
    return sorted(out, key=lambda e: e["t"], reverse=True)


def checkpoints(rd: RunReader, limit: int = 200) -> list[dict]:
    """Snapshots (memory tier) with their size and blocking time, and when each reached storage;
    the newest `limit`."""
    return rd.derived("checkpoints", _checkpoints)[:limit]


def _checkpoints(recs: list[dict]) -> list[dict]:
    out: dict[int, dict] = {}
    for r in recs:
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
    return sorted(out.values(), key=lambda e: e["step"], reverse=True)


def cluster(rd: RunReader) -> list[dict]:
    """Each node: its ranks, spares and agent, healthy/cordoned/lost and why, its faults."""
    return rd.derived("cluster", cluster_view.nodes)


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
    s = rd.derived("fold", fold)
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
    and its lost time by cause. Computed again only when the run wrote something."""
    train = rd.table("metrics/train", store.TRAIN)
    return rd.derived("compare", lambda recs: _compare(recs, train), train.num_rows)


def _compare(recs: list[dict], train: pa.Table) -> dict:
    s = fold(recs)
    acc = account(recs, s)
    t, step = column(train, "t"), column(train, "step").astype(np.int64)
    loss = series.summary(
        step, t, series.groups(t, group_starts(recs)), {"loss": column(train, "loss")},
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
