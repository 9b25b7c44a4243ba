"""AnomalyMonitor: the supervisor's view of every metric; turns samples into events.

Contract: `training(rows)` takes the per-step records the ranks report (through heartbeats),
`node(node_id, sample)` the GPU/host samples of a NodeAgent; both return the AnomalyEvents their
detectors raise. Every row goes to Parquet (`metrics/train`, `metrics/gpu`, `metrics/host`), every
event to `events/` with the decision taken (`record_event`), and to Prometheus when enabled.
Rows are written by a thread of the monitor's own every FLUSH_S (sooner once FLUSH_ROWS training
rows wait: a thousand ranks report that many in seconds), never by the caller: the
supervisor's loop must see faults while storage is slow (a write may take OP_TIMEOUT_S). `close()`
ends that thread and seals every log.
"""

from __future__ import annotations

import json
import math
import threading

from resilient import heap
from resilient.anomaly import store
from resilient.anomaly.detectors import (
    HardwareDetector,
    HostDetector,
    NumericsDetector,
    StragglerDetector,
)
from resilient.anomaly.events import AnomalyEvent
from resilient.config import JobSpec
from resilient.rundir import RunDir

FLUSH_S = 5.0  # seconds between writes of the buffered rows
FLUSH_ROWS = 20_000  # training rows that make the writer write early (memory bounded by rows too)


class AnomalyMonitor:
    def __init__(self, spec: JobSpec, rundir: RunDir, exporter=None, trackers=None):
        """`exporter`: the driver's Prometheus exporter (its owner closes it), or None;
        `trackers`: what feeds TensorBoard/MLflow/W&B (`trackers.Feed`), or None."""
        cfg = spec.anomaly
        self.hardware = HardwareDetector(cfg)
        self.straggler = StragglerDetector(cfg, spec.cluster.num_workers)
        self.numerics = NumericsDetector(cfg)
        self.host = HostDetector(cfg)
        heap.arrow_on_malloc()  # the hourly merges' memory goes back, not kept by mimalloc
        self.logs = {
            "train": store.ParquetLog(rundir, "metrics/train", store.TRAIN),
            "gpu": store.ParquetLog(rundir, "metrics/gpu", store.GPU),
            "host": store.ParquetLog(rundir, "metrics/host", store.HOST),
            "events": store.ParquetLog(rundir, "events", store.EVENTS),
        }
        self.exporter, self.trackers = exporter, trackers
        self.counts: dict[str, int] = {}
        self._closed = threading.Event()
        self._full = threading.Event()  # FLUSH_ROWS training rows wait
        self._io = threading.Lock()  # one writer at a time: the flush thread or close()
        self._writer = threading.Thread(target=self._flush_loop, daemon=True, name="metrics-writer")
        self._writer.start()

    def training(self, rows: list[dict]) -> list[AnomalyEvent]:
        ev: list[AnomalyEvent] = []
        if self.logs["train"].append(rows) >= FLUSH_ROWS:
            self._full.set()
        for r in sorted(rows, key=lambda r: (r["step"], r["rank"])):
            if self.exporter:
                self.exporter.training(r)
            if self.trackers:
                self.trackers.training(r)
            if r.get("overflow"):  # float16's scaler skipped it: expected, lowers the scale
                continue
            if not (math.isfinite(r["loss"]) and math.isfinite(r["grad_norm"])):
                ev += self.numerics.observe(
                    r["t"], r["step"], r["loss"], r["grad_norm"], rank=r["rank"]
                )
                continue
            if r["rank"] == 0 and r.get("mean_loss") is not None:
                ev += self.numerics.observe(r["t"], r["step"], r["mean_loss"], r["grad_norm"])
            ev += self.straggler.observe(
                r["t"], r["rank"], r["step"], r["compute_s"], r.get("attempt", 0)
            )
        return ev

    def node(self, node_id: str, sample: dict) -> list[AnomalyEvent]:
        ev: list[AnomalyEvent] = []
        for g in sample.get("gpus", []):
            row = {**g, "node": node_id}
            self.logs["gpu"].append([row])
            if self.exporter:
                self.exporter.gpu(row)
            ev += self.hardware.observe(node_id, g)
        host = sample.get("host")
        if host:
            self.logs["host"].append(
                [{**host, "node": node_id, "rss_json": json.dumps(host.get("rss", {}))}]
            )
            ev += self.host.observe(
                host["t"], node_id, {int(k): v for k, v in host.get("rss", {}).items()}
            )
        return ev

    def record_event(self, e: AnomalyEvent, decision: str) -> None:
        self.counts[e.kind] = self.counts.get(e.kind, 0) + 1
        self.logs["events"].append([{**e.to_record(), "decision": decision}])
        if self.exporter:
            self.exporter.event(e.kind, e.severity)

    def _flush_loop(self) -> None:
        while not self._closed.is_set():
            self._full.wait(FLUSH_S)
            self._full.clear()
            if self._closed.is_set():
                return
            self.flush()
            if len(self.logs["train"].rows) >= FLUSH_ROWS:  # a failed write: not again at once
                self._closed.wait(FLUSH_S)

    def flush(self) -> None:
        """Write the buffered rows now (rows a failed write kept are retried the next time)."""
        with self._io:
            for log in self.logs.values():
                log.flush()

    def close(self) -> None:
        self._closed.set()
        self._full.set()
        with self._io:
            for log in self.logs.values():
                log.seal()
