"""The driver's Prometheus endpoint, scraped over HTTP: job metrics folded from journal records,
per-rank step metrics, and GPU samples under the DCGM exporter's names and labels."""

import socket
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from resilient.anomaly.exporter import Exporter

pytestmark = pytest.mark.timeout(30)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _scrape(port: int) -> dict[tuple[str, tuple], float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for fam in text_string_to_metric_families(text)
        for s in fam.samples
    }


@pytest.fixture
def exporter():
    e = Exporter(_free_port())
    yield e
    e.close()


def test_job_metrics_from_journal_records(exporter):
    node = "ab" * 28
    for rec in [
        {"t": 1.0, "type": "transition", "from": "PENDING", "to": "RUNNING"},
        {"t": 2.0, "type": "progress", "step": 12},
        {"t": 3.0, "type": "fault", "kind": "crash"},
        {"t": 3.5, "type": "restart", "n": 1},
        {"t": 4.0, "type": "recovered", "fault_index": 0, "recovery_s": 1.5},
        {"t": 5.0, "type": "checkpoint", "step": 10},
        {"t": 5.0, "type": "ranks", "ranks": [{"rank": 1, "pid": 7, "node": node, "gpus": [0]}]},
    ]:
        exporter.record(rec)
    exporter.training({"rank": 1, "step": 13, "loss": 2.0, "step_time": 0.25, "tokens_per_s": 9})
    exporter.gpu({"node": node, "gpu": 0, "temp": 71.0, "mem_used": 3 * 2**20, "xid": 79})
    exporter.gpu({"node": node, "gpu": 0, "temp": 72.0, "mem_used": 3 * 2**20, "xid": 0})
    m = _scrape(exporter.server.server_port)
    assert m[("resilient_job_state", (("state", "RUNNING"),))] == 1
    assert m[("resilient_job_state", (("state", "PENDING"),))] == 0
    assert m[("resilient_step", ())] == 13
    assert m[("resilient_restarts_total", ())] == 1
    assert m[("resilient_faults_total", (("kind", "crash"),))] == 1
    assert m[("resilient_lost_seconds_total", (("cause", "crash"),))] == 1.5
    assert m[("resilient_checkpoint_last_step", ())] == 10
    assert m[("resilient_checkpoint_age_seconds", ())] > 0
    assert m[("resilient_rank_step_seconds", (("rank", "1"),))] == 0.25
    labels = (
        ("Hostname", node[:12]),
        ("UUID", ""),
        ("device", "nvidia0"),
        ("gpu", "0"),
        ("modelName", ""),
        ("rank", "1"),  # the GPU -> rank map from the `ranks` record
    )
    assert m[("DCGM_FI_DEV_GPU_TEMP", labels)] == 72
    assert m[("DCGM_FI_DEV_FB_USED", labels)] == 3  # MiB, as DCGM reports it
    assert m[("DCGM_FI_DEV_XID_ERRORS", labels)] == 79  # the last XID stays


def test_binds_loopback_by_default(exporter):
    assert exporter.server.server_address[0] == "127.0.0.1"
