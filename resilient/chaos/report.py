"""The chaos report: what was injected, what noticed it, what was decided, how fast the job was
training again and what it cost, written to `<run dir>/chaos_report.json` and printed as a table.

Contract: `build(records, markers)` is pure over the journal records and the fired-fault markers.
Every injected fault appears once: matched to the fault the supervisor acted on (by its marker's
key, which the chaos controller attributed to that fault), or, for faults that need no restart
(slow, thermal, a storage outage), to the first event that noticed it; such a fault counts as
recovered once the job finished a step after it. A fault that stops a rank (kill, exit, hang,
node_loss) that nothing was attributed to was not detected: it is said so, and recovered when the
next fault acted on is (its restart replaced that rank too), if any.
Faults that were asked for and never struck (`chaos_refused`: no such target, nothing to damage,
a planned fault whose rank was not in the job at its step) are listed apart, in `not_injected`,
with the reason.
Totals: `faults`, `recovered`, `goodput` and its lost-time breakdown (see accounting.py); each
fault says which ranks kept their processes (`survivors_kept`); `resizes` and `world_size` say how
the job changed size (elastic).
"""

from __future__ import annotations

from rich import box
from rich.console import Console
from rich.table import Table

from resilient.rundir.markers import FiredFault
from resilient.runlog.accounting import account
from resilient.runlog.status import fold

NOTICED_BY = {
    "slow": ("straggler",),
    "bitflip": ("sdc",),
    "bad_compute": ("sdc", "cordon"),
    "thermal": ("thermal",),
    "storage_outage": ("persist_error",),
    "corrupt_checkpoint": ("restore",),
}


def _noticed(records: list[dict], m: FiredFault) -> dict | None:
    """The first record after `m` fired that shows it was noticed (see NOTICED_BY)."""
    kinds = NOTICED_BY.get(m.fault, ())
    for r in records:
        if r["t"] < m.injected_at:
            continue
        if r["type"] == "cordon" and m.node and r.get("node") != m.node:
            continue  # another node's
        if r["type"] == "anomaly" and r["kind"] in kinds:
            return r
        if r["type"] in kinds and (r["type"] != "restore" or r.get("skipped")):
            return r
    return None


STOPS_A_RANK = ("kill", "exit", "hang", "node_loss")  # no step is finished until it is acted on


def _unacted(records: list[dict], progress: list[tuple], m: FiredFault, acted: list[dict]) -> dict:
    """The entry of a fault the supervisor acted on no fault for: one that needed no restart (who
    noticed, recovered at its next step), or one that stops a rank and was not detected before
    another fault's restart replaced that rank too (recovered with that one, and said so)."""
    if m.fault in STOPS_A_RANK:
        return _ended_by(m, acted)
    seen = _noticed(records, m)
    after = next((t for t, _ in progress if t > m.injected_at), None)
    if seen is None:
        by = None
    else:
        by = f"anomaly detector: {seen['kind']}" if seen["type"] == "anomaly" else seen["type"]
    decision = (
        (seen or {}).get("decision")
        or (f"cordon: {seen['reason']}" if seen and seen["type"] == "cordon" else None)
        or "none: training went on"
    )
    return _entry(m, seen["t"] if seen else None, by, decision, after)


def _entry(m: FiredFault, detected_at, by, decision: str, after: float | None) -> dict:
    """A report entry for a fault the supervisor acted on nothing for (no steps replayed)."""
    return {
        "kind": m.fault,
        "rank": m.rank,
        "node": m.node,
        "step": m.step,
        "injected_at": m.injected_at,
        "detected_at": detected_at,
        "detected_by": by,
        "decision": decision,
        "recovered_at": after,
        "recovery_s": round(after - m.injected_at, 3) if after else None,
        "steps_replayed": 0,
        "lost_s": {},
    }


def _ended_by(m: FiredFault, acted: list[dict]) -> dict:
    """A rank stopped by `m` and not found before the next fault acted on ended its life: that
    fault's recovery is this one's (no step was lost to this one that is not counted there);
    with none after it, it is not recovered."""
    later = [f for f in acted if (f.get("detected_at") or 0) >= m.injected_at]
    by = min(later, key=lambda f: f["detected_at"]) if later else None
    if by is None:
        return _entry(m, None, None, "not detected", None)
    who = f"rank {by['rank']}" if by.get("rank") is not None else "the job"
    decision = (
        f"not detected: the {by['kind']} of {who} at step {by.get('step')} came first "
        f"({by.get('decision') or '-'})"
    )
    return _entry(m, None, None, decision, by.get("recovered_at"))


def build(records: list[dict], markers: list[FiredFault]) -> dict:
    acc = account(records)
    faults = list(acc["faults"])
    keys = {f["chaos_key"] for f in faults if f.get("chaos_key")}
    times = {round(f["injected_at"], 3) for f in faults if f.get("injected_at")}
    progress = [(r["t"], r["step"]) for r in records if r["type"] == "progress"]
    acted = list(faults)
    for m in sorted(markers, key=lambda m: m.injected_at):
        if m.key not in keys and round(m.injected_at, 3) not in times:
            faults.append(_unacted(records, progress, m, acted))
    faults.sort(key=lambda f: f.get("injected_at") or f["detected_at"] or 0)
    recovered = sum(1 for f in faults if f["recovered_at"])
    s = fold(records)
    totals = {
        "faults": len(faults),
        "recovered": recovered,
        "goodput": acc["goodput"],
        "lost_s": acc["lost_s"],
        "wall_s": acc["wall_s"],
    }
    return {
        "faults": faults,
        "totals": totals,
        "recovered": recovered,
        "goodput": acc["goodput"],
        "lost_s": acc["lost_s"],
        "wall_s": acc["wall_s"],
        "resizes": s["resizes"],
        "world_size": s["world_size"],
        "not_injected": _not_injected(records),
    }


def _not_injected(records: list[dict]) -> list[dict]:
    """The chaos that never struck, once a key (a resumed run may refuse a planned fault again)."""
    out, keys = [], set()
    for r in records:
        key = r.get("key")
        if r["type"] != "chaos_refused" or (key is not None and key in keys):
            continue
        keys.add(key)
        out.append({k: r.get(k) for k in ("fault", "rank", "node", "step", "request", "error")})
    return out


COLUMNS = ("fault", "target", "step", "detected by", "after", "decision", "recovery", "replayed")


def _row(f: dict) -> tuple[str, ...]:
    """A fault's cells, in COLUMNS' order."""
    lag = (
        f"{f['detected_at'] - f['injected_at']:.2f}s"
        if f.get("detected_at") and f.get("injected_at")
        else "-"
    )
    target = (
        f"rank {f['rank']}"
        if f.get("rank") is not None
        else (str(f.get("node"))[:8] if f.get("node") else "job")
    )
    return (
        f["kind"],
        target,
        str(f.get("step")),
        str(f.get("detected_by") or "-").replace("_", " "),  # words wrap in a narrow column
        lag,
        _decision(f).replace("_", " "),
        f"{f['recovery_s']:.2f}s" if f.get("recovery_s") is not None else "not recovered",
        str(f.get("steps_replayed") or 0),
    )


def print_report(report: dict, console: Console) -> None:
    tot = report["totals"]
    goodput = "n/a" if tot["goodput"] is None else f"{tot['goodput']:.1%}"
    t = Table(
        title=f"chaos report: {tot['recovered']}/{tot['faults']} faults recovered, goodput "
        f"{goodput}",
        title_justify="left",
        box=box.SIMPLE_HEAD,  # columns parted by one space, no edges: 80 columns hold it whole
        show_edge=False,
        padding=0,
    )
    for col in COLUMNS:
        t.add_column(col, overflow="fold")
    for f in report["faults"]:
        t.add_row(*_row(f))
    console.print(t if report["faults"] else t.title, highlight=False)
    lost = ", ".join(f"{k} {v:.2f}s" for k, v in report["lost_s"].items())
    console.print(
        f"lost time: {lost} (of {report['wall_s']:.1f}s of wall time after start-up)",
        highlight=False,
    )
    for r in report.get("not_injected", []):
        target = (
            f" rank {r['rank']}"
            if r.get("rank") is not None
            else (f" node {r['node']}" if r.get("node") is not None else "")
        )
        at = f" at step {r['step']}" if r.get("step") is not None else ""
        console.print(f"not injected: {r['fault']}{target}{at}: {r['error']}", highlight=False)
    for r in report.get("resizes", []):
        console.print(
            f"resized {r['from']} -> {r['to']} ranks at step {r['step']}: {r['reason']}",
            highlight=False,
        )


def _decision(f: dict) -> str:
    kept = f.get("survivors_kept")
    decision = str(f.get("decision") or "-")
    return f"{decision} (kept rank {', '.join(map(str, kept))})" if kept else decision
