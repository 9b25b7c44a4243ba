"""A run's status, folded from its journal alone (running or finished, local or remote).

Contract: `fold(records)` is pure; `fold(records, start)` goes on from `start` (a status folded
over the records before them, updated in place: `runlog.snapshot`). Its keys are a public format
(README, "status --json"): `state`, `step`, `total_steps`, `restarts`, `faults` (each with
`kind`, `rank`, `step`, `detected_at`, `recovered_at`, `recovery_s`), `restores` (each with
`step`, `tier`),
`cordoned_nodes` (each with `node`, `reason`), `rollbacks` (each with `from_step`, `to_step`,
`skipped_batches`, `reason`, `abandoned`), `events` (anomaly events counted by kind),
`world_size` (ranks of the newest worker group), `resizes` (each with `step`, `from`, `to`,
`reason`) and `ranks` (each with `rank`, `pid`, `node`, `started_at`, `restarts`: how often that
rank's process was replaced),
`data` (the staged sets: `rows`, `used`, `bad_rows`, `bad` by reason, `truncated`, `sequences`,
`tokens`, `trained_tokens`, ...) and `eval` (each evaluation, by step: `step`, `loss`,
`perplexity`, `accuracy`, `tokens`), `preflight` (each node's newest check: `node`, `index`, `ip`,
`ok`, `reasons`, `compute_s`, `allreduce_s`, `storage_s`, `mem_free_gb`, `disk_free_gb`) and
`hang_limits` (the newest learnt: `silence_s`, `stall_s`), plus extras.
"""

from __future__ import annotations

from typing import Any

from resilient.runlog.states import TERMINAL

FAULT_KEYS = (
    "kind",
    "rank",
    "step",
    "detected_at",
    "injected_at",
    "evidence",
    "node",
    "chaos_key",
    "log",
)
ROLLBACK_KEYS = ("from_step", "to_step", "skipped_batches", "reason", "abandoned")


def _empty() -> dict[str, Any]:
    return {
        "state": "PENDING",
        "step": 0,
        "total_steps": None,
        "restarts": 0,
        "faults": [],
        "restores": [],
        "checkpoints": 0,
        "last_checkpoint": None,
        "reason": None,
        "name": None,
        "run_id": None,
        "started_at": None,
        "ended_at": None,
        "loss": None,
        "tokens_per_s": None,
        "run_dir": None,
        "cordoned_nodes": [],
        "rollbacks": [],
        "events": {},
        "world_size": None,
        "resizes": [],
        "ranks": [],
        "data": {},
        "eval": [],
        "preflight": [],
        "hang_limits": None,
    }


def _job(s: dict, r: dict) -> None:
    s.update(
        name=r.get("name"),
        run_id=r.get("run_id"),
        total_steps=r.get("total_steps"),
        started_at=s["started_at"] or r["t"],
        run_dir=r.get("run_dir"),
    )


def _resume(s: dict, r: dict) -> None:
    """A new life of the run: its supervisor starts over from PENDING."""
    s.update(state="PENDING", ended_at=None, reason=None)
    s["total_steps"] = r.get("total_steps", s["total_steps"])
    s["resumes"] = s.get("resumes", 0) + 1


def _transition(s: dict, r: dict) -> None:
    s["state"] = r["to"]
    ended = r["to"] in TERMINAL
    s["ended_at"] = r["t"] if ended else None
    if ended:
        s["reason"] = r.get("cause")


def _fault(s: dict, r: dict) -> None:
    s["faults"].append(
        {k: r.get(k) for k in FAULT_KEYS}
        | {"recovered_at": None, "recovery_s": None, "steps_replayed": None}
    )


def _recovered(s: dict, r: dict) -> None:
    if s["faults"]:
        s["faults"][r.get("fault_index", len(s["faults"]) - 1)].update(
            recovered_at=r["recovered_at"],
            recovery_s=r["recovery_s"],
            steps_replayed=r.get("steps_replayed"),
        )


def _restart(s: dict, r: dict) -> None:
    s["restarts"] += 1


def _checkpoint(s: dict, r: dict) -> None:
    s["checkpoints"] += 1
    s["last_checkpoint"] = r["step"]


def _ranks(s: dict, r: dict) -> None:
    """A worker group started (or re-formed): a rank whose pid changed was replaced."""
    before = {x["rank"]: x for x in s["ranks"]}
    out = []
    for x in r.get("ranks", []):
        old = before.get(x["rank"])
        kept = old is not None and old["pid"] == x.get("pid")
        out.append(
            {
                "rank": x["rank"],
                "pid": x.get("pid"),
                "node": x.get("node"),
                "started_at": old["started_at"] if kept else r["t"],
                "restarts": (old["restarts"] + (0 if kept else 1)) if old else 0,
            }
        )
    s["ranks"], s["world_size"] = out, len(out)


def _resize(s: dict, r: dict) -> None:
    s["resizes"].append({k: r.get(k) for k in ("step", "from", "to", "reason")})


def _anomaly(s: dict, r: dict) -> None:
    s["events"][r["kind"]] = s["events"].get(r["kind"], 0) + 1


PREFLIGHT_KEYS = ("node", "index", "ip", "ok", "reasons", "compute_s", "allreduce_s", "storage_s",
                  "mem_free_gb", "disk_free_gb", "t")  # fmt: skip


def _preflight(s: dict, r: dict) -> None:
    """A node's newest check replaces its older one (a resumed run checks again)."""
    s["preflight"] = [p for p in s["preflight"] if p["node"] != r["node"]]
    s["preflight"].append({k: r.get(k) for k in PREFLIGHT_KEYS})


EVAL_KEYS = ("step", "loss", "perplexity", "accuracy", "tokens")


def _eval(s: dict, r: dict) -> None:
    ev = {k: r.get(k) for k in EVAL_KEYS}
    if s["eval"] and s["eval"][-1]["step"] >= ev["step"]:  # a step evaluated again: the newest
        s["eval"] = [e for e in s["eval"] if e["step"] < ev["step"]]
    s["eval"].append(ev)


FOLDS = {
    "job": _job,
    "resume": _resume,
    "transition": _transition,
    "progress": lambda s, r: s.update(
        step=r["step"], loss=r.get("loss"), tokens_per_s=r.get("tokens_per_s")
    ),
    "fault": _fault,
    "restart": _restart,
    "cordon": lambda s, r: s["cordoned_nodes"].append({"node": r["node"], "reason": r["reason"]}),
    "rollback": lambda s, r: s["rollbacks"].append({k: r.get(k) for k in ROLLBACK_KEYS}),
    "anomaly": _anomaly,
    "recovered": _recovered,
    "restore": lambda s, r: s["restores"].append(
        {"step": r["step"], "tier": r["tier"], "skipped": r.get("skipped", [])}
    ),
    "checkpoint": _checkpoint,
    "ranks": _ranks,
    "resize": _resize,
    "data": lambda s, r: s.update(data={k: v for k, v in r.items() if k not in ("t", "type")}),
    "eval": _eval,
    "preflight": _preflight,
    "hang_limits": lambda s, r: s.update(
        hang_limits={"silence_s": r["silence_s"], "stall_s": r["stall_s"]}
    ),
}


def fold(records: list[dict], start: dict[str, Any] | None = None) -> dict[str, Any]:
    """The status after `records`; from `start` (a status folded over the records before them,
    updated in place) or from nothing."""
    s = _empty() if start is None else start
    for r in records:
        step = FOLDS.get(r["type"])
        if step:
            step(s, r)
    return s
