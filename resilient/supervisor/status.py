"""A run's status, folded from its journal alone (running or finished, local or remote).

Contract: `fold(records)` is pure. Its keys are a public format (README, "status --json"):
`state`, `step`, `total_steps`, `restarts`, `faults` (each with `kind`, `rank`, `step`,
`detected_at`, `recovered_at`, `recovery_s`), `restores` (each with `step`, `tier`),
`cordoned_nodes` (each with `node`, `reason`), `rollbacks` (each with `from_step`, `to_step`,
`skipped_batches`, `reason`) and `events` (anomaly events counted by kind), plus extras.
"""
from __future__ import annotations

from typing import Any


def fold(records: list[dict]) -> dict[str, Any]:
    s: dict[str, Any] = {"state": "PENDING", "step": 0, "total_steps": None, "restarts": 0, "faults": [],
                         "restores": [], "checkpoints": 0, "last_checkpoint": None, "reason": None,
                         "name": None, "run_id": None, "started_at": None, "ended_at": None,
                         "loss": None, "tokens_per_s": None, "run_dir": None,
                         "cordoned_nodes": [], "rollbacks": [], "events": {}}
    for r in records:
        t = r["type"]
        if t == "job":
            s.update(name=r.get("name"), run_id=r.get("run_id"), total_steps=r.get("total_steps"),
                     started_at=s["started_at"] or r["t"], run_dir=r.get("run_dir"))
        elif t == "resume":  # a new life of the run: its supervisor starts over from PENDING
            s.update(state="PENDING", ended_at=None, reason=None)
            s["total_steps"] = r.get("total_steps", s["total_steps"])
            s["resumes"] = s.get("resumes", 0) + 1
        elif t == "transition":
            s["state"] = r["to"]
            if r["to"] in ("SUCCEEDED", "FAILED", "STOPPED"):
                s["ended_at"] = r["t"]
                s["reason"] = r.get("cause")
            else:
                s["ended_at"] = None
        elif t == "progress":
            s.update(step=r["step"], loss=r.get("loss"), tokens_per_s=r.get("tokens_per_s"))
        elif t == "fault":
            s["faults"].append({k: r.get(k) for k in ("kind", "rank", "step", "detected_at", "injected_at",
                                                       "evidence", "node")}
                               | {"recovered_at": None, "recovery_s": None, "steps_replayed": None})
        elif t == "restart":
            s["restarts"] += 1
        elif t == "cordon":
            s["cordoned_nodes"].append({"node": r["node"], "reason": r["reason"]})
        elif t == "rollback":
            s["rollbacks"].append({k: r.get(k) for k in ("from_step", "to_step", "skipped_batches", "reason")})
        elif t == "anomaly":
            s["events"][r["kind"]] = s["events"].get(r["kind"], 0) + 1
        elif t == "recovered" and s["faults"]:
            idx = r.get("fault_index", len(s["faults"]) - 1)
            s["faults"][idx].update(recovered_at=r["recovered_at"], recovery_s=r["recovery_s"],
                                    steps_replayed=r.get("steps_replayed"))
        elif t == "restore":
            s["restores"].append({"step": r["step"], "tier": r["tier"], "skipped": r.get("skipped", [])})
        elif t == "checkpoint":
            s["checkpoints"] += 1
            s["last_checkpoint"] = r["step"]
    return s
