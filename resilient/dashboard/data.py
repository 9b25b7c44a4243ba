"""What the dashboard shows, as JSON, read from a run directory's files (journal, Parquet,
manifests).

Contract: every function takes the dashboard's `RunReader` (each byte of the run directory read
once) and returns plain JSON-able dicts; they work on a running job (files still growing) and on a
finished one, local or remote. These are the documented API endpoints (README, "Dashboard API").
"""

from __future__ import annotations

import time

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


def timeline(rd: RunReader) -> dict:
    """Supervisor states as intervals, and the faults, decisions and restarts on them."""
    recs = rd.records()
    spans, marks = [], []
    for r in recs:
        if r["type"] == "transition":
            if spans:
                spans[-1]["end"] = r["t"]
            spans.append({"state": r["to"], "start": r["t"], "end": None, "cause": r.get("cause")})
        elif r["type"] in LABELS:
            label = LABELS[r["type"]](r)
            marks.append({"t": r["t"], "type": r["type"], "label": label})
    if spans and spans[-1]["end"] is None:
        spans[-1]["end"] = time.time() if spans[-1]["state"] not in TERMINAL else spans[-1]["start"]
    return {"spans": spans, "marks": marks}


def metrics(rd: RunReader, last: int = 2000) -> dict:
    """Per-rank training series, per-GPU series and the evaluations (the newest `last` points of
    each)."""
    train, gpu = rd.rows("metrics/train"), rd.rows("metrics/gpu")
    ranks: dict[str, dict[str, list]] = {}
    for r in sorted(train, key=lambda r: r["t"]):
        d = ranks.setdefault(
            str(r["rank"]),
            {k: [] for k in ("t", "step", "loss", "grad_norm", "step_time", "compute_s")},
        )
        for k in d:
            d[k].append(r[k])
    gpus: dict[str, dict[str, list]] = {}
    for r in sorted(gpu, key=lambda r: r["t"]):
        d = gpus.setdefault(
            f"{r['node'][:8]}/gpu{r['gpu']}",
            {k: [] for k in ("t", "util", "mem_used", "temp", "power_w")},
        )
        for k in d:
            d[k].append(r[k])
    ev = {k: [] for k in ("t", "step", "loss", "perplexity", "accuracy")}
    for r in rd.records():
        if r["type"] == "eval":
            for k in ev:
                ev[k].append(r.get(k))
    for series in [*ranks.values(), *gpus.values(), ev]:
        for k in series:
            series[k] = series[k][-last:]
    return {"ranks": ranks, "gpus": gpus, "eval": ev}


def events(rd: RunReader, kind: str | None = None) -> list[dict]:
    """Anomaly events and faults with the action taken, newest first (optionally of one kind)."""
    out = []
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
        elif r["type"] == "fault" and r.get("fault_class", r["kind"]) != "anomaly":
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
                }
            )
        elif r["type"] == "decision" and out and out[-1]["action"] is None:
            out[-1]["action"] = r["action"]
    if kind:
        out = [e for e in out if e["kind"] == kind]
    return sorted(out, key=lambda e: e["t"], reverse=True)


def checkpoints(rd: RunReader) -> list[dict]:
    """Snapshots (memory tier) with their blocking time, and when each reached storage."""
    out: dict[int, dict] = {}
    for r in rd.records():
        if r["type"] == "checkpoint":
            # the node agent's `persisted` may be journalled before rank 0's `checkpoint` record of
            # the same step (they come through different polls): never downgrade it to memory
            e = out.setdefault(r["step"], {"tier": "memory", "persisted_at": None})
            e.update(step=r["step"], bytes=r.get("bytes"), blocking_s=r.get("blocking_s"), t=r["t"])
        elif r["type"] == "persisted":
            e = out.setdefault(
                r["step"],
                {"step": r["step"], "bytes": r.get("bytes"), "blocking_s": None, "t": r["t"]},
            )
            e.update(tier="storage", persisted_at=r.get("persisted_at"))
    return sorted(out.values(), key=lambda e: e["step"], reverse=True)
