"""Where the time went: per-fault lost-time breakdown and goodput, from the journal alone.

Contract: `account(records)` is pure. For each fault it gives `detection` (injection -> detection;
0 when the fault was not planned), `teardown` (killing the old group), `restart` (new workers up),
`restore` (finding and loading the state), `replay` (re-doing steps lost since the restored
checkpoint) in seconds, `detected_by` and the `decision`. `goodput` is effective training time over
wall time, counted from the first RUNNING (or from the first fault, if one struck before the
supervisor saw the group running) to the end; the one-time start-up is not a fault's cost:
1 - sum(lost) / wall.
"""
from __future__ import annotations

import statistics

from resilient.supervisor.status import fold

DETECTED_BY = {"crash": "actor death", "hang": "heartbeat / progress watchdog", "error": "worker error report",
               "start_timeout": "start watchdog", "anomaly": "anomaly detector"}


def account(records: list[dict]) -> dict:
    s = fold(records)
    first_running = next((r["t"] for r in records if r["type"] == "transition" and r["to"] == "RUNNING"), None)
    end = s["ended_at"] or (records[-1]["t"] if records else None)
    step_times = [r["step_time"] for r in records if r["type"] == "step_time"]
    by_fault: dict[int, dict] = {}
    starting_at: dict[int, float] = {}
    current = None
    for r in records:
        t = r["type"]
        if t == "fault":
            current = len(by_fault)
            by_fault[current] = {"fault_class": r.get("fault_class", r["kind"])}
        elif t == "decision" and current is not None:
            by_fault[current]["decision"] = r["action"]
        elif t == "teardown":
            by_fault.setdefault(r["fault_index"], {})["teardown"] = r["seconds"]
        elif t == "transition" and r["to"] == "STARTING" and current is not None:
            starting_at[current] = r["t"]
        elif t == "restore" and current is not None and "restore" not in by_fault[current]:
            by_fault[current]["restore_lookup"] = r.get("lookup_s", 0.0)
        elif t == "group_ready" and current is not None and current in starting_at and "ready" not in by_fault[current]:
            by_fault[current]["ready"] = r.get("ready_at", r["t"]) - starting_at[current]
            by_fault[current]["restore_worker"] = r.get("restore_s", 0.0)
        elif t == "progress_stats":
            step_times.append(r["median_step_s"])
    step_s = statistics.median(step_times) if step_times else 0.0
    faults, lost_total = [], {"detection": 0.0, "teardown": 0.0, "restart": 0.0, "restore": 0.0, "replay": 0.0}
    for i, f in enumerate(s["faults"]):
        a = by_fault.get(i, {})
        injected = f.get("injected_at")
        restore = a.get("restore_lookup", 0.0) + a.get("restore_worker", 0.0)
        lost = {"detection": max(0.0, f["detected_at"] - injected) if injected else 0.0,
                "teardown": a.get("teardown", 0.0),
                "restart": max(0.0, a.get("ready", 0.0) - restore),
                "restore": restore,
                "replay": (f.get("steps_replayed") or 0) * step_s}
        for k, v in lost.items():
            lost_total[k] += v
        faults.append({"kind": f["kind"], "rank": f["rank"], "node": f.get("node"), "step": f["step"],
                       "injected_at": injected, "detected_at": f["detected_at"],
                       "detected_by": DETECTED_BY.get(a.get("fault_class", f["kind"]), "anomaly detector"),
                       "decision": a.get("decision"), "recovered_at": f.get("recovered_at"),
                       "recovery_s": f.get("recovery_s"), "steps_replayed": f.get("steps_replayed"),
                       "lost_s": {k: round(v, 3) for k, v in lost.items()}})
    # A fault can strike before the first heartbeat showed every rank training (short jobs, early
    # faults): its lost time then lies before the first RUNNING, so the wall starts with it.
    fault_starts = [f.get("injected_at") or f["detected_at"] for f in s["faults"]]
    start = min([first_running] + fault_starts) if first_running and fault_starts else first_running
    wall = (end - start) if start and end else 0.0
    lost_sum = sum(lost_total.values())
    return {"faults": faults, "recovered": sum(1 for f in faults if f["recovered_at"]), "total": len(faults),
            "wall_s": round(wall, 3), "lost_s": {k: round(v, 3) for k, v in lost_total.items()},
            "goodput": round(max(0.0, 1 - lost_sum / wall), 4) if wall > 0 else None,
            "median_step_s": step_s}
