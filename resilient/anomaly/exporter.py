"""Prometheus export (prometheus-client): per-rank and per-GPU gauges and event counters.

Contract: off unless `anomaly.prometheus_port` is set; then served on 127.0.0.1:PORT only (metrics
reveal nothing secret, but nothing here listens beyond loopback unless a person says so).
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server


class Exporter:
    def __init__(self, port: int, addr: str = "127.0.0.1"):
        self.registry = r = CollectorRegistry()
        self.step = Gauge("resilient_step", "Last finished step", registry=r)
        self.restarts = Gauge("resilient_restarts", "Worker group restarts so far", registry=r)
        rank = ["rank"]
        self.loss = Gauge("resilient_rank_loss", "Loss of the rank's last step", rank, registry=r)
        self.grad = Gauge(
            "resilient_rank_grad_norm", "Gradient norm of the rank's last step", rank, registry=r
        )
        self.compute = Gauge(
            "resilient_rank_compute_seconds",
            "Compute time of the rank's last step",
            rank,
            registry=r,
        )
        self.tps = Gauge(
            "resilient_rank_tokens_per_second",
            "Job-wide tokens/s seen by the rank",
            rank,
            registry=r,
        )
        gpu = ["node", "gpu"]
        self.util = Gauge("resilient_gpu_utilization_percent", "GPU utilization", gpu, registry=r)
        self.mem = Gauge("resilient_gpu_memory_used_bytes", "GPU memory used", gpu, registry=r)
        self.temp = Gauge("resilient_gpu_temperature_celsius", "GPU temperature", gpu, registry=r)
        self.power = Gauge("resilient_gpu_power_watts", "GPU power draw", gpu, registry=r)
        self.events = Counter(
            "resilient_anomaly_events", "Anomaly events by kind", ["kind", "severity"], registry=r
        )
        self.server, self.thread = start_http_server(port, addr=addr, registry=r)

    def training(self, row: dict) -> None:
        r = str(row["rank"])
        self.step.set(row["step"])
        for g, k in (
            (self.loss, "loss"),
            (self.grad, "grad_norm"),
            (self.compute, "compute_s"),
            (self.tps, "tokens_per_s"),
        ):
            if row.get(k) is not None:
                g.labels(r).set(row[k])

    def gpu(self, row: dict) -> None:
        labels = (row["node"][:12], str(row["gpu"]))
        for g, k in (
            (self.util, "util"),
            (self.mem, "mem_used"),
            (self.temp, "temp"),
            (self.power, "power_w"),
        ):
            if row.get(k) is not None:
                g.labels(*labels).set(row[k])

    def event(self, kind: str, severity: str) -> None:
        self.events.labels(kind, severity).inc()

    def close(self) -> None:
        self.server.shutdown()
