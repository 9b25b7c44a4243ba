"""The dashboard's views of a run, without a server: curves bounded and broken at restarts, the
cluster as the journal tells it, a fault's log excerpt, and the Host header check."""

import time
import urllib.error
import urllib.request
from datetime import datetime

import numpy as np
import pyarrow as pa
import pytest

from resilient import hostcheck
from resilient.dashboard import cluster, evidence, series

pytestmark = pytest.mark.timeout(60)


def test_curves_stay_bounded_break_at_each_group_and_keep_a_spike():
    steps = np.arange(1, 100_001)
    step = np.concatenate([steps, steps])  # 2 ranks
    t = step * 0.05
    loss = np.full(len(step), 2.0)
    loss[70_000] = 50.0  # one rank's spike, mid-run
    starts = [0.0, 2_500.0]  # a restart at step 50,000
    group = series.groups(t, starts)
    out = series.summary(step, t, group, {"loss": loss}, 1200)
    assert all(len(v) <= 2000 for v in out.values())
    assert out["step"].count(None) == 1  # one break, at the restart: no line across it
    cut = out["step"].index(None)
    assert out["step"][cut - 1] < 50_000 <= out["step"][cut + 1]
    assert max(v for v in out["loss_hi"] if v is not None) == 50.0  # the band keeps the spike
    assert max(v for v in out["loss_med"] if v is not None) < 50.0
    one = series.means({"step": steps, "t": steps * 0.05}, {"loss": loss[:100_000]},
                       series.groups(steps * 0.05, starts), 1200)  # fmt: skip
    assert len(one["step"]) <= 2000 and one["step"].count(None) == 1
    assert all(isinstance(s, int) for s in one["step"] if s is not None)


def test_hundreds_of_restarts_never_outnumber_the_points():
    step = np.arange(1, 20_001)
    t = step.astype(float)
    out = series.summary(step, t, series.groups(t, list(range(0, 20_000, 20))), {"x": t}, 1200)
    assert all(len(v) <= 2000 for v in out.values()), {k: len(v) for k, v in out.items()}


def test_a_short_run_is_drawn_point_for_point_with_nan_as_none():
    step = np.array([1, 2, 3, 1, 2, 3])
    loss = np.array([1.0, np.nan, 3.0, 1.0, 2.0, 3.0])
    out = series.summary(step, step * 1.0, np.zeros(6, np.int64), {"loss": loss}, 1200)
    assert out["step"] == [1, 2, 3] and out["loss_med"] == [1.0, 2.0, 3.0]
    assert out["loss_lo"][1] == out["loss_hi"][1] == 2.0  # the NaN is left out, not drawn
    m = series.means({"t": step * 1.0}, {"loss": loss[:3]}, np.zeros(3, np.int64), 1200)
    assert m["loss"] == [1.0, None, 3.0]


def _ranks(*placement):
    return {"type": "ranks", "t": 0, "ranks": [{"rank": r, "node": n} for r, n in placement]}


def test_the_cluster_follows_replacements_cordons_and_losses():
    recs = [
        {"type": "nodes", "t": 0, "nodes": [{"node_id": "a" * 20, "index": 0, "ip": "10.0.0.1"},
                                            {"node_id": "b" * 20, "index": 1, "ip": "10.0.0.2"}]},
        {"type": "preflight", "t": 0, "node": "c" * 20, "index": 2, "ip": "10.0.0.3", "ok": True},
        _ranks((0, "a" * 20), (1, "b" * 20)),
        {"type": "spares", "t": 0, "nodes": ["c" * 20, "c" * 20]},
        {"type": "fault", "t": 1, "kind": "crash", "rank": 1, "node": None},
        {"type": "fault", "t": 2, "kind": "node_loss", "rank": 1, "node": "b" * 20},
        {"type": "cordon", "t": 2, "node": "b" * 20, "reason": "node_loss: lost"},
        {"type": "nodes_lost", "t": 2, "nodes": ["b" * 20]},
        _ranks((0, "a" * 20), (1, "c" * 20)),
        {"type": "spares", "t": 3, "nodes": ["c" * 20]},
        {"type": "cordon", "t": 4, "node": "a" * 20, "reason": "straggled twice"},
    ]  # fmt: skip
    a, b, c = cluster.nodes(recs)
    assert (a["index"], a["state"], a["reason"], a["ranks"]) == (
        0,
        "cordoned",
        "straggled twice",
        [0],
    )
    assert (b["state"], b["ranks"], b["agent"], b["faults"]) == ("lost", [], False, 2)
    assert b["fault_kinds"] == {"crash": 1, "node_loss": 1} and b["reason"] == "node_loss: lost"
    assert (c["ranks"], c["spares"], c["agent"], c["preflight"]) == ([1], 1, True, "ok")


def _stamp(t: float) -> str:
    return datetime.fromtimestamp(t).strftime("%Y-%m-%d %H:%M:%S") + f",{int(t % 1 * 1000):03d}"


def test_a_fault_shows_the_lines_before_it_and_its_replacements_first():
    t0 = 1_800_000_000.0
    lines = [f"{_stamp(t0 + i)} INFO worker: line {i}" for i in range(50)]
    lines.insert(41, "Traceback (most recent call last):")  # belongs with line 40
    out = evidence.log_excerpt(lines, t0 + 40.5, before=5, after=3)
    assert out["lines"][: out["cut"]][-2:] == [lines[40], lines[41]]
    assert out["lines"][out["cut"]].endswith("line 41") and len(out["lines"]) == 8
    bare = evidence.log_excerpt(["a", "b", "c"], t0, before=2)
    assert bare == {"lines": ["b", "c"], "cut": 2}
    recs = [{"type": "progress", "t": i} for i in range(100)]
    recs[50] = {"type": "fault", "t": 50, "kind": "crash"}
    recs[52] = {"type": "decision", "t": 52}
    near = evidence.around(recs, 0)
    assert [r["type"] for r in near] == ["fault", "decision"]
    assert evidence.around(recs, 1) == []


def test_the_host_header_must_name_this_server():
    names = hostcheck.allowed("127.0.0.1", ["dash.example"])
    for ok in ("127.0.0.1:8266", "localhost:8266", "[::1]:8266", "LOCALHOST", "dash.example"):
        assert hostcheck.check(ok, names) is None, ok
    for bad in ("rebind.example:80", "attacker.localhost.example", "", None):
        msg = hostcheck.check(bad, names)
        assert msg and "--allow-host" in msg and "dash.example" not in msg, bad  # names unsaid
    anywhere = hostcheck.allowed("0.0.0.0")
    assert "127.0.0.1" in anywhere and hostcheck.check("evil.example", anywhere)
    assert hostcheck.allowed("10.1.2.3") == {"10.1.2.3"}


def test_the_metrics_server_refuses_a_foreign_host():
    import socket

    from prometheus_client import CollectorRegistry

    from resilient.anomaly.exporter import serve

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = serve(CollectorRegistry(), port, "127.0.0.1", ["prom.example"])
    try:
        url = f"http://127.0.0.1:{port}/metrics"
        deadline = time.time() + 10
        while True:
            try:
                assert urllib.request.urlopen(url, timeout=5).status == 200
                break
            except urllib.error.URLError:
                assert time.time() < deadline
                time.sleep(0.05)
        for host, code in (("rebind.example", 400), ("prom.example:9100", 200)):
            req = urllib.request.Request(url, headers={"Host": host})
            try:
                got = urllib.request.urlopen(req, timeout=5).status
            except urllib.error.HTTPError as e:
                got = e.code
            assert got == code, host
    finally:
        server.shutdown()
        server.server_close()


class _Run:
    """A run directory as the dashboard's reader gives it: journal records and metric tables."""

    def __init__(self):
        self.recs = [{"type": "ranks", "t": 0.0, "ranks": []}]
        self.rows = {"metrics/train": [], "metrics/host": [], "metrics/gpu": []}

    def records(self):
        return self.recs

    def table(self, name, schema):
        return pa.Table.from_pylist(self.rows[name], schema=schema)

    def derived(self, name, fn, *key):
        return fn(self.recs)

    def step(self, step, ranks=(0, 1)):
        for r in ranks:
            self.rows["metrics/train"].append(
                {"t": step + 0.1 * r, "rank": r, "step": step, "loss": 1.0 + r, "compute_s": 0.1}
            )


def test_a_poll_gets_what_came_since_its_cursor_and_all_again_after_a_restart():
    from resilient.dashboard.curves import metrics

    run = _Run()
    for s in range(1, 11):
        run.step(s)
    run.rows["metrics/host"] = [
        {"t": float(t), "node": "n" * 12, "cpu_percent": 5.0, "net_sent": 100 * t} for t in (1, 2)
    ]
    first = metrics(run)
    assert first["full"] and first["median"]["step"] == list(range(1, 11))
    assert first["heat"]["ranks"] == [0, 1] and len(first["heat"]["z"][0]) == 10
    assert metrics(run, cursor=first["cursor"])["median"]["step"] == []  # nothing new
    run.step(11)
    run.step(12, ranks=(1,))  # rank 0 has not reported step 12 yet: it waits
    run.rows["metrics/host"].append({"t": 4.0, "node": "n" * 12, "net_sent": 400})
    run.rows["metrics/host"].append({"t": 3.0, "node": "n" * 12, "net_sent": 300})  # late row
    d = metrics(run, cursor=first["cursor"])
    assert not d["full"] and d["median"]["step"] == [11] and d["eval"] is None
    assert d["ranks"]["0"]["step"] == [11] and d["ranks"]["1"]["step"] == [11]
    host = d["hosts"]["n" * 8]
    assert host["t"] == [3.0, 4.0] and host["net_sent_per_s"] == [100.0, 100.0]  # no gap
    run.step(12, ranks=(0,))
    d = metrics(run, cursor=d["cursor"])
    assert d["median"]["step"] == [12] and d["median"]["loss_hi"] == [2.0]
    assert metrics(run, cursor=d["cursor"])["hosts"] == {}  # each row sent once
    run.step(13, ranks=(0,))
    run.step(14, ranks=(0,))  # rank 1 lags two steps: neither is sent yet
    lag = metrics(run, cursor=d["cursor"])
    assert lag["median"]["step"] == [] and lag["world"] == 2
    run.step(13, ranks=(1,))
    d = metrics(run, cursor=lag["cursor"])
    assert d["median"]["step"] == [13] and d["ranks"]["1"]["step"] == [13]
    run.recs.append({"type": "ranks", "t": 20.0, "ranks": []})  # a restart: redrawn whole
    run.recs.append({"type": "group_ready", "t": 21.0, "restored_step": 10})
    for s in (11, 12):
        run.rows["metrics/train"].append({"t": 21.0 + s, "rank": 0, "step": s, "loss": 0.5})
    d = metrics(run, cursor=d["cursor"])
    assert d["full"] and d["breaks"] == [{"t": 20.0, "kind": "restart", "step": 10}]
    assert d["median"]["step"][-4:] == [14, None, 11, 12]  # the old group whole
