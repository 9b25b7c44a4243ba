"""Intake: what the ranks and node agents report, turned into journal records and anomaly events.

Contract: `Intake(journal, monitor, nodes, logs)` records, and decides nothing. `heartbeats(hbs)`
journals the snapshots the ranks handed over (and gives their output lines to `logs`) and returns
which data steps each step trained on;
evaluations (`eval` records, each step once: a replayed step's evaluation is not journalled
again; `early_stop` holds the reason when the ranks stopped early);
`events(metrics)` feeds the per-step metrics and the node agents' samples to the anomaly monitor
(journalling the agents' checkpoint events) and returns the events raised; `anomaly(e, decision)`
journals an event with what the policy made of it; `keep(metrics)` stores a torn-down group's
last metrics; `close()` collects the agents' last events. Snapshots dropped because storage falls
behind (`persist_dropped`) are each journalled and said as a warning: the first, then at most one
a DROP_WARN_S with the count since, and the rest at `close()` (the newest persisted step lags
while it lasts).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable

from resilient.agents.heartbeat import Heartbeat
from resilient.anomaly.events import AnomalyEvent
from resilient.anomaly.monitor import AnomalyMonitor
from resilient.runlog.journal import Journal

DROP_WARN_S = 600.0
log = logging.getLogger(__name__)


class Intake:
    def __init__(self, journal: Journal, monitor: AnomalyMonitor, nodes, logs=None):
        """`logs`: where the ranks' output goes (a `RankLogs`), or None."""
        self.journal, self.monitor, self.nodes, self.logs = journal, monitor, nodes, logs
        self.persisted: set[int] = set()  # steps in storage, as the journal tells (retention too)
        # persisted steps of a timeline a rollback abandoned and not yet deleted: never restored
        self.abandoned: set[int] = set()
        self._rolled_back_at = 0.0  # when the newest rollback was journalled
        self.evaluated = 0  # the newest step whose evaluation is journalled
        self.early_stop: str | None = None
        self._drops, self._drop_warned = 0, -DROP_WARN_S  # dropped since the last warning
        self._last_drop: dict = {}

    def learn(self, records: Iterable[dict]) -> None:
        """What earlier lives of the run persisted (and retention deleted)."""
        for r in records:
            self._persistence(r["type"], r)
            if r["type"] == "eval":
                self.evaluated = max(self.evaluated, r["step"])

    def newest_persisted(self, at_most: int | None = None) -> int | None:
        return max((s for s in self.persisted if at_most is None or s <= at_most), default=None)

    def _persistence(self, kind: str, e: dict) -> None:
        if kind == "persisted":
            if e["step"] in self.abandoned and e.get("persisted_at", 1e300) < self._rolled_back_at:
                return  # the old timeline's commit, reported after the rollback: still abandoned
            self.persisted.add(e["step"])
            self.abandoned.discard(e["step"])  # the new timeline wrote that step again
        elif kind == "retention":
            self.persisted -= set(e.get("deleted", ()))
        elif kind == "rollback":  # the steps after its restore point belong to the old timeline
            gone = {s for s in self.persisted if s > e["to_step"]} | set(e.get("abandoned", ()))
            self.persisted -= gone
            self.abandoned |= gone
            self._rolled_back_at = e.get("t", 0.0)
        elif kind == "discarded":  # abandoned steps deleted from storage
            self.abandoned -= set(e.get("steps", ()))

    def heartbeats(self, hbs: Iterable[Heartbeat]) -> list[tuple[int, int]]:
        """Journal the handed-over snapshots; (step, data step) of every step reported."""
        trained, records = [], []
        for hb in hbs:
            if self.logs is not None:
                self.logs.append(hb.rank, hb.logs)
            for rec in hb.checkpoints:
                records.append(("checkpoint", {"rank": hb.rank, "tier": "memory", **rec}))
            for ev in hb.evals:
                self.early_stop = ev.get("early_stop") or self.early_stop
                if ev["step"] > self.evaluated:
                    self.evaluated = ev["step"]
                    records.append(("eval", ev))
            trained += [(m["step"], m["data_step"]) for m in hb.metrics]
        self.journal.extend(records)  # one write (and fsync) for the whole poll
        return trained

    def events(self, metrics: list[dict]) -> list[AnomalyEvent]:
        out = self.monitor.training(metrics)
        events, samples = self.nodes.poll_events()
        self._journal_agent_events(events)
        for node, sample in samples:
            out += self.monitor.node(node, sample)
        return out

    def keep(self, metrics: list[dict]) -> None:
        """Metrics of a group being torn down: stored, no longer acted on."""
        self.monitor.training(metrics)

    def anomaly(self, e: AnomalyEvent, decision: str) -> None:
        self.journal.append(
            "anomaly",
            kind=e.kind,
            severity=e.severity,
            action=e.action,
            node=e.node,
            rank=e.rank,
            step=e.step,
            evidence=e.evidence,
            decision=decision,
            event_t=e.t,
        )
        self.monitor.record_event(e, decision)

    def close(self) -> None:
        try:  # the metrics and logs are written even when the journal is lost (JournalLost)
            self._journal_agent_events(self.nodes.flush_events())
            self._dropped(None)  # drops since the last warning are said too
        finally:
            self.monitor.close()
            if self.logs is not None:
                self.logs.close()

    def _journal_agent_events(self, events: list[dict]) -> None:
        records = []
        for e in events:
            kind = e.pop("event")
            self._persistence(kind, e)
            if kind != "replicated":  # one per snapshot: counted by the agent, not journalled
                records.append((kind, e))
        self.journal.extend(records)  # one write (and fsync) for the whole poll
        for kind, e in records:
            if kind == "persist_dropped":
                self._dropped(e)

    def _dropped(self, e: dict | None) -> None:
        """Count a drop (`e`; None: the end of the job, say what is left unsaid) and warn when
        due."""
        if e is not None:
            self._drops, self._last_drop = self._drops + 1, e
        now = time.monotonic()
        if not self._drops or (e is not None and now - self._drop_warned < DROP_WARN_S):
            return
        last = self._last_drop
        node = f" on node {str(last['node'])[:8]}" if last.get("node") else ""
        log.warning(
            "storage is behind: %d snapshot(s) dropped before reaching it (the last: step %s%s, "
            "%s), so the newest persisted step lags. If one upload takes longer than "
            "checkpoint.persist_every steps, raise it; to ride out an outage, raise "
            "checkpoint.max_pending",
            self._drops,
            last.get("step"),
            node,
            last.get("reason", "storage is slow"),
        )
        self._drops, self._drop_warned = 0, now
