"""Prometheus export (prometheus-client), served by the driver.

Contract: off unless `anomaly.prometheus_port` is set; then served on
`anomaly.prometheus_host:prometheus_port` (127.0.0.1 by default: nothing listens beyond loopback
unless a person says so), answering only requests whose Host header names that address (or one
of `anomaly.prometheus_allow_hosts`; `resilient.hostcheck`). What it serves:
- the job, from every journal record (`record`, fed by the journal's listeners, O(1) each):
  `resilient_job_state{state}` (1 for the current state, 0 for the others), `resilient_step`,
  `resilient_restarts_total`, `resilient_faults_total{kind}`, `resilient_checkpoint_last_step`,
  `resilient_checkpoint_age_seconds` (computed at scrape), `resilient_checkpoint_persisted_step`,
  `resilient_lost_seconds_total{cause}` (fault to training again, by the fault's kind);
  the newest evaluation: `resilient_eval_loss`, `resilient_eval_perplexity`,
  `resilient_eval_accuracy`, `resilient_eval_step`;
- each rank, from its step records (`training`): loss, grad norm, compute and step seconds,
  tokens/s;
- each GPU, from the node agents' samples (`gpu`), under the DCGM exporter's names and labels
  (`DCGM_FI_DEV_GPU_TEMP{gpu,UUID,device,modelName,Hostname}` ...), so dashboards built for
  dcgm-exporter read them, plus a `rank` label naming the rank that uses the GPU where known;
- anomaly events by kind and severity (`event`).
"""

from __future__ import annotations

import socket
import threading
import time
from wsgiref.simple_server import WSGIRequestHandler, make_server

from prometheus_client import CollectorRegistry, Counter, Gauge, make_wsgi_app
from prometheus_client.exposition import ThreadingWSGIServer

from resilient import hostcheck
from resilient.runlog.states import JobState

# DCGM exporter field -> (the GPU sample's key, scale to DCGM's unit, help)
DCGM = {
    "DCGM_FI_DEV_GPU_TEMP": ("temp", 1, "GPU temperature (in C)."),
    "DCGM_FI_DEV_GPU_UTIL": ("util", 1, "GPU utilization (in %)."),
    "DCGM_FI_DEV_FB_USED": ("mem_used", 1 / 2**20, "Framebuffer memory used (in MiB)."),
    "DCGM_FI_DEV_POWER_USAGE": ("power_w", 1, "Power draw (in W)."),
    "DCGM_FI_DEV_SM_CLOCK": ("sm_clock", 1, "SM clock frequency (in MHz)."),
    "DCGM_FI_DEV_XID_ERRORS": ("xid", 1, "Value of the last XID error encountered."),
    "DCGM_FI_DEV_ECC_DBE_VOL_TOTAL": (
        "ecc_volatile_uncorrected",
        1,
        "Total number of double-bit volatile ECC errors.",
    ),
    "DCGM_FI_DEV_ECC_DBE_AGG_TOTAL": (
        "ecc_aggregate_uncorrected",
        1,
        "Total number of double-bit persistent ECC errors.",
    ),
    "DCGM_FI_DEV_PCIE_REPLAY_COUNTER": ("pcie_replay", 1, "Total number of PCIe retries."),
    "DCGM_FI_DEV_RETIRED_SBE": ("retired_pages_sbe", 1, "Pages retired for single-bit errors."),
    "DCGM_FI_DEV_RETIRED_DBE": ("retired_pages_dbe", 1, "Pages retired for double-bit errors."),
    "DCGM_FI_DEV_RETIRED_PENDING": ("retired_pending", 1, "Pages pending retirement."),
    "DCGM_FI_DEV_ROW_REMAP_PENDING": ("remap_pending", 1, "Rows pending remapping."),
}
DCGM_LABELS = ["gpu", "UUID", "device", "modelName", "Hostname", "rank"]
ALLOW_WITH = "anomaly.prometheus_allow_hosts in the job spec"


class _Quiet(WSGIRequestHandler):
    def log_message(self, format, *args):  # a scrape every few seconds is not news
        pass


class _Server6(ThreadingWSGIServer):
    address_family = socket.AF_INET6


def serve(registry: CollectorRegistry, port: int, addr: str, allow_hosts=()):
    """prometheus-client's WSGI app behind the Host header check (`resilient.hostcheck`), on a
    daemon thread; the server."""
    app, names = make_wsgi_app(registry), hostcheck.allowed(addr, allow_hosts)

    def checked(environ, start_response):
        refused = hostcheck.check(environ.get("HTTP_HOST"), names, ALLOW_WITH)
        if refused:
            start_response("400 Bad Request", [("Content-Type", "text/plain; charset=utf-8")])
            return [refused.encode()]
        return app(environ, start_response)

    cls = _Server6 if ":" in addr else ThreadingWSGIServer
    server = make_server(addr, port, checked, cls, handler_class=_Quiet)
    threading.Thread(target=server.serve_forever, daemon=True, name="prometheus").start()
    return server


class Exporter:
    def __init__(self, port: int, addr: str = "127.0.0.1", allow_hosts=()):
        self.registry = r = CollectorRegistry()
        self._job(r)
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
        self.step_s = Gauge(
            "resilient_rank_step_seconds", "Wall time of the rank's last step", rank, registry=r
        )
        self.tps = Gauge(
            "resilient_rank_tokens_per_second",
            "Job-wide tokens/s seen by the rank",
            rank,
            registry=r,
        )
        self.dcgm = {
            name: Gauge(name, help_, DCGM_LABELS, registry=r)
            for name, (_, _, help_) in DCGM.items()
        }
        self.gpu_ranks: dict[tuple[str, int], str] = {}  # (node id, GPU index) -> rank
        self._xid: dict[tuple[str, int], float] = {}  # the last XID each GPU reported
        self.evals = {
            k: Gauge(f"resilient_eval_{k}", f"Eval {k} of the newest evaluation", registry=r)
            for k in ("loss", "perplexity", "accuracy", "step")
        }
        self.events = Counter(
            "resilient_anomaly_events", "Anomaly events by kind", ["kind", "severity"], registry=r
        )
        self.server = serve(r, port, addr, allow_hosts)

    def _job(self, r: CollectorRegistry) -> None:
        self.state = Gauge(
            "resilient_job_state",
            "1 for the job's current state, 0 for the others",
            ["state"],
            registry=r,
        )
        for s in JobState:
            self.state.labels(s.value).set(1 if s == JobState.PENDING else 0)
        self.step = Gauge("resilient_step", "Last finished step", registry=r)
        self._step = 0
        self.restarts = Counter(
            "resilient_restarts", "Worker group restarts in this run", registry=r
        )
        self.faults = Counter("resilient_faults", "Faults by kind", ["kind"], registry=r)
        self.lost = Counter(
            "resilient_lost_seconds",
            "Seconds from a fault to training again, by the fault's kind",
            ["cause"],
            registry=r,
        )
        self.ckpt_step = Gauge(
            "resilient_checkpoint_last_step",
            "Step of the newest checkpoint (host memory or storage)",
            registry=r,
        )
        self.persisted_step = Gauge(
            "resilient_checkpoint_persisted_step",
            "Step of the newest checkpoint committed to storage",
            registry=r,
        )
        self._ckpt_at: float | None = None
        self.ckpt_age = Gauge(
            "resilient_checkpoint_age_seconds",
            "Seconds since the newest checkpoint (since the start: none yet)",
            registry=r,
        )
        started = time.time()
        self.ckpt_age.set_function(lambda: time.time() - (self._ckpt_at or started))
        self._fault_kinds: list[str] = []

    def record(self, rec: dict) -> None:
        """Fold one journal record into the job's metrics."""
        t = rec.get("type")
        if t == "transition":
            for s in JobState:
                self.state.labels(s.value).set(1 if s.value == rec["to"] else 0)
        elif t == "progress":
            self._step = rec["step"]
            self.step.set(self._step)
        elif t == "restart":
            self.restarts.inc()
        elif t == "fault":
            self._fault_kinds.append(rec.get("kind", "unknown"))
            self.faults.labels(self._fault_kinds[-1]).inc()
        elif t == "recovered" and rec.get("recovery_s") is not None:
            i = rec.get("fault_index", len(self._fault_kinds) - 1)
            kind = self._fault_kinds[i] if 0 <= i < len(self._fault_kinds) else "unknown"
            self.lost.labels(kind).inc(max(0.0, rec["recovery_s"]))
        elif t == "checkpoint":
            self.ckpt_step.set(rec["step"])
            self._ckpt_at = rec["t"]
        elif t == "persisted":
            self.persisted_step.set(rec["step"])
        elif t == "eval":
            for k, gauge in self.evals.items():
                gauge.set(rec.get(k) or 0.0)
        elif t == "ranks":  # which rank uses which GPU (each worker group, once started)
            self.gpu_ranks = {}
            for m in rec.get("ranks", []):
                for g in m.get("gpus") or ():
                    self.gpu_ranks[(m["node"], int(g))] = str(m["rank"])

    def training(self, row: dict) -> None:
        r = str(row["rank"])
        self._step = max(self._step, row["step"])
        self.step.set(self._step)
        for g, k in (
            (self.loss, "loss"),
            (self.grad, "grad_norm"),
            (self.compute, "compute_s"),
            (self.step_s, "step_time"),
            (self.tps, "tokens_per_s"),
        ):
            if row.get(k) is not None:
                g.labels(r).set(row[k])

    def gpu(self, row: dict) -> None:
        i = int(row["gpu"])
        labels = (
            str(i),
            row.get("uuid") or "",
            f"nvidia{i}",
            row.get("name") or "",
            row["node"][:12],
            self.gpu_ranks.get((row["node"], i), ""),
        )
        if row.get("xid"):  # a sample carries the XIDs of its interval; DCGM keeps the last one
            self._xid[(row["node"], i)] = row["xid"]
        for name, (key, scale, _) in DCGM.items():
            v = self._xid.get((row["node"], i), 0) if key == "xid" else row.get(key)
            if v is not None:
                self.dcgm[name].labels(*labels).set(float(v) * scale)

    def event(self, kind: str, severity: str) -> None:
        self.events.labels(kind, severity).inc()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
