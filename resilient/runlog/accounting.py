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

from resilient.runlog.status import fold

DETECTED_BY = {
    "crash": "actor death",
    "hang": "heartbeat / progress watchdog",
    "error": "worker error report",
    "start_timeout": "start watchdog",
    "anomaly": "anomaly detector",
    "node_loss": "node health: its raylet refuses",
    "partition": "node health: unreachable",
}


LOST = ("detection", "teardown", "restart", "restore", "replay")


def _phases(records: list[dict]) -> tuple[dict[int, dict], float]:
    """Per fault (by index): its class, decision, teardown, restore lookup, time to a ready group
    and the workers' restore; and the median step time."""
    by_fault: dict[int, dict] = {}
    starting_at: dict[int, float] = {}
    step_times, cur = [], None
    for r in records:
        t, a = r["type"], by_fault.get(cur, {})
        if t == "fault":
            cur = len(by_fault)
            by_fault[cur] = {"fault_class": r.get("fault_class", r["kind"])}
        elif t == "decision" and cur is not None:
            a["decision"] = r["action"]
        elif t == "survivors" and cur is not None:
            a["kept"] = r.get("kept", [])
        elif t == "teardown":
            by_fault.setdefault(r["fault_index"], {})["teardown"] = r["seconds"]
        elif t == "transition" and r["to"] == "STARTING" and cur is not None:
            starting_at[cur] = r["t"]
        elif t == "restore" and cur is not None and "restore_lookup" not in a:
            a["restore_lookup"] = r.get("lookup_s", 0.0)
        elif t == "group_ready" and cur in starting_at and "ready" not in a:
            a["ready"] = r.get("ready_at", r["t"]) - starting_at[cur]
            a["restore_worker"] = r.get("restore_s", 0.0)
        elif t == "progress_stats":
            step_times.append(r["median_step_s"])
    return by_fault, statistics.median(step_times) if step_times else 0.0


def _fault_cost(f: dict, a: dict, step_s: float) -> tuple[dict, dict]:
    """A fault's report entry, and its lost seconds by phase (unrounded)."""
    injected = f.get("injected_at")
    restore = a.get("restore_lookup", 0.0) + a.get("restore_worker", 0.0)
    lost = {
        "detection": max(0.0, f["detected_at"] - injected) if injected else 0.0,
        "teardown": a.get("teardown", 0.0),
        "restart": max(0.0, a.get("ready", 0.0) - restore),
        "restore": restore,
        "replay": (f.get("steps_replayed") or 0) * step_s,
    }
    entry = {
        "kind": f["kind"],
        "rank": f["rank"],
        "node": f.get("node"),
        "step": f["step"],
        "injected_at": injected,
        "chaos_key": f.get("chaos_key"),
        "detected_at": f["detected_at"],
        "detected_by": DETECTED_BY.get(a.get("fault_class", f["kind"]), "anomaly detector"),
        "decision": a.get("decision"),
        "survivors_kept": a.get("kept", []),  # ranks that kept their processes
        "recovered_at": f.get("recovered_at"),
        "recovery_s": f.get("recovery_s"),
        "steps_replayed": f.get("steps_replayed"),
        "lost_s": {k: round(v, 3) for k, v in lost.items()},
    }
    return entry, lost


def account(records: list[dict], folded: dict | None = None) -> dict:
    """`folded`: `fold(records)` where the caller has it already (one pass, not two)."""
    s = folded if folded is not None else fold(records)
    by_fault, step_s = _phases(records)
    costs = [_fault_cost(f, by_fault.get(i, {}), step_s) for i, f in enumerate(s["faults"])]
    faults = [entry for entry, _ in costs]
    lost_total = {k: sum(lost[k] for _, lost in costs) for k in LOST}
    first_running = next(
        (r["t"] for r in records if r["type"] == "transition" and r["to"] == "RUNNING"), None
    )
    end = s["ended_at"] or (records[-1]["t"] if records else None)
    # A fault can strike before the first heartbeat showed every rank training (short jobs, early
    # faults): its lost time then lies before the first RUNNING, so the wall starts with it.
    fault_starts = [f.get("injected_at") or f["detected_at"] for f in s["faults"]]
    start = min([first_running, *fault_starts]) if first_running and fault_starts else first_running
    wall = (end - start) if start and end else 0.0
    lost_sum = sum(lost_total.values())
    return {
        "faults": faults,
        "recovered": sum(1 for f in faults if f["recovered_at"]),
        "total": len(faults),
        "wall_s": round(wall, 3),
        "lost_s": {k: round(v, 3) for k, v in lost_total.items()},
        "goodput": round(max(0.0, 1 - lost_sum / wall), 4) if wall > 0 else None,
        "median_step_s": step_s,
    }
