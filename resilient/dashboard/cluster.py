"""The cluster as the journal tells it: each node with its ranks, spares and node agent, its state
and the faults it took.

Contract: `nodes(records)` is pure (journal records in order -> one dict per node, in launch order:
`node`, `index`, `ip`, `state` ("healthy", "cordoned" or "lost"), `reason` (why it was cordoned or
lost), `ranks` (the ranks of the newest group on it), `spares` (warm spares on it), `agent` (its
node agent is up), `preflight` ("ok", "fail" or None), `faults` (how many), `fault_kinds` (count by
kind)). It follows the run live: a group re-formed after a replacement or a resize moves the ranks,
a refilled pool the spares, a resumed run starts the placement over and shows only the nodes of
its new life (those it kept with their history).
"""

from __future__ import annotations


def _blank(node: str) -> dict:
    return {
        "node": node,
        "index": None,
        "ip": None,
        "state": "healthy",
        "reason": None,
        "ranks": [],
        "spares": 0,
        "agent": False,
        "preflight": None,
        "faults": 0,
        "fault_kinds": {},
    }


def nodes(records: list[dict]) -> list[dict]:
    out: dict[str, dict] = {}
    placement: dict[int, str] = {}  # rank -> node, of the newest group
    resumed = False

    def node(nid: str) -> dict:
        return out.setdefault(nid, _blank(nid))

    for r in records:
        t = r["type"]
        if t == "nodes":
            if resumed:  # a new life's nodes: those of the previous life are gone
                listed = {n["node_id"] for n in r.get("nodes", [])}
                out = {k: e for k, e in out.items() if k in listed}
                resumed = False
            for n in r.get("nodes", []):
                e = node(n["node_id"])
                e.update(index=n.get("index"), ip=n.get("ip"), agent=e["state"] != "lost")
        elif t == "preflight" and r.get("node"):
            e = node(r["node"])
            e.update(index=r.get("index", e["index"]), ip=r.get("ip") or e["ip"])
            e.update(preflight="ok" if r.get("ok") else "fail", agent=e["state"] != "lost")
        elif t == "ranks":
            placement = {x["rank"]: x["node"] for x in r.get("ranks", []) if x.get("node")}
            for e in out.values():
                e["ranks"] = []
            for rank, nid in sorted(placement.items()):
                node(nid)["ranks"].append(rank)
        elif t == "spares":
            for e in out.values():
                e["spares"] = 0
            for nid in r.get("nodes", []):
                node(nid)["spares"] += 1
        elif t == "cordon" and r.get("node"):
            e = node(r["node"])
            if e["state"] != "lost":
                e.update(state="cordoned", reason=r.get("reason"))
        elif t == "nodes_lost":
            for nid in r.get("nodes", []):
                e = node(nid)
                e.update(state="lost", agent=False, ranks=[], spares=0)
                e["reason"] = e["reason"] or "lost: it answered nothing"
        elif t == "fault":
            nid = r.get("node") or placement.get(r.get("rank"))
            if nid:
                e = node(nid)
                e["faults"] += 1
                e["fault_kinds"][r["kind"]] = e["fault_kinds"].get(r["kind"], 0) + 1
        elif t == "resume":  # a new life places anew; a node it keeps keeps its history
            placement, resumed = {}, True
            for e in out.values():
                e.update(ranks=[], spares=0)
    return sorted(out.values(), key=lambda e: (e["index"] is None, e["index"] or 0, e["node"]))
