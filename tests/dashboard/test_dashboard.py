"""The dashboard: JSON API on a finished run, token enforcement, and the page in real headless
Chromium."""

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest

from tests.helpers import resilient_cli, write_job

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A finished run with a restart (kill), a straggler event (slow rank) and evaluations."""
    d = tmp_path_factory.mktemp("dash")
    extra = (
        '\n[anomaly]\ngpu = "simulated"\nstraggler_action = "warn"\nstraggler_window_s = 0\n'
        "\n[eval]\nsplit = 0.1\nevery = 20\n"
        # factor 8: the first life must outlast several 0.5 s heartbeats, or rank 1 dies (a
        # warm start trains 40 steps in 0.6 s at 2.5) before its step records reach the driver
        '\n[[chaos]]\nat_step = 5\nfault = "slow"\nfactor = 8\nrank = 1\n'
        # rank 1: rank 0 survives and reports every evaluation (a killed rank 0's last
        # heartbeat interval, with an evaluation in it, would be lost)
        '\n[[chaos]]\nat_step = 40\nfault = "kill"\nrank = 1\n'
    )
    r = resilient_cli("launch", str(write_job(d, steps=60, extra=extra)), "--run-id", "dash")
    assert r.returncode == 0, r.stdout
    return d / "runs" / "t" / "dash"


@pytest.fixture
def server(finished_run):
    procs = []

    def start(*extra, env=None, runs=()):
        port = free_port()
        p = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "resilient.cli",
                "dashboard",
                str(finished_run),
                *map(str, runs),
                "--port",
                str(port),
                *extra,
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env={**os.environ, **(env or {})},
        )
        procs.append(p)
        host = extra[extra.index("--host") + 1] if "--host" in extra else "127.0.0.1"
        deadline = time.time() + 60
        while time.time() < deadline:
            try:
                socket.create_connection((host, port), timeout=0.5).close()
                return f"http://{host}:{port}"
            except OSError:
                assert p.poll() is None, p.stdout.read()
                time.sleep(0.1)
        raise AssertionError("dashboard did not come up")

    yield start
    for p in procs:
        p.terminate()
        p.wait(timeout=10)


def fetch(url: str, token: str | None = None):
    import json

    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    with urllib.request.urlopen(req, timeout=10) as r:
        return json.loads(r.read())


def test_json_api(server, finished_run):
    base = server()
    s = fetch(base + "/api/state")
    assert (
        s["state"] == "SUCCEEDED"
        and s["step"] == 60
        and s["restarts"] == 1
        and 0 <= s["goodput"] < 1
    )
    assert set(s["lost_s"]) == {"detection", "teardown", "restart", "restore", "replay"}
    tl = fetch(base + "/api/timeline")
    assert [m for m in tl["marks"] if m["type"] == "restart"] and tl["spans"][-1][
        "state"
    ] == "SUCCEEDED"
    starting = next(sp["start"] for sp in tl["spans"] if sp["state"] == "STARTING")
    assert tl["view"]["start"] > tl["spans"][0]["start"] and tl["view"]["start"] < starting
    m = fetch(base + "/api/metrics")
    assert set(m["ranks"]) == {"0", "1"} and m["gpus"] and m["hosts"] and m["world"] == 2
    seen = {x for r in m["ranks"].values() for x in r["step"] if x is not None}
    assert seen == set(range(1, 61))
    assert m["median"]["step"].count(None) == 1 and len(m["breaks"]) == 1  # the restart
    ev, restart = m["eval"], m["breaks"][0]["t"]
    assert [s for s in ev["step"] if s is not None] == [20, 40, 60]
    assert all(0 < v for v in ev["loss"] if v is not None)
    if ev["t"][0] < restart < ev["t"][-1]:  # evaluations of two groups: no line across the gap
        assert None in ev["step"]
    newer = fetch(base + f"/api/metrics?cursor={m['cursor']}")
    assert not newer["full"] and newer["median"]["step"] == [] and newer["eval"] is None
    assert newer["hosts"] == {} and newer["gpus"] == {}  # nothing new: nothing sent
    ev = fetch(base + "/api/events")
    kinds = {e["kind"] for e in ev}
    assert {"straggler", "crash"} <= kinds
    assert [e for e in fetch(base + "/api/events?kind=straggler")] and all(
        e["kind"] == "straggler" for e in fetch(base + "/api/events?kind=straggler")
    )
    (crash,) = [e for e in ev if e["kind"] == "crash"]
    f = fetch(base + f"/api/fault/{crash['fault']}")
    assert f["fault"]["kind"] == "crash" and f["rank"] == 1
    assert any(r["type"] == "decision" for r in f["records"])
    log = (finished_run / "logs" / "rank-1.log").read_text().splitlines()
    assert f["log"]["lines"] and set(f["log"]["lines"]) <= set(log)
    (node,) = fetch(base + "/api/cluster")
    assert node["ranks"] == [0, 1] and node["faults"] >= 1 and node["state"] == "healthy"
    ck = fetch(base + "/api/checkpoints")
    assert ck[0]["step"] == 60 and ck[0]["tier"] == "storage"
    assert all(c["bytes"] for c in ck), [c for c in ck if not c["bytes"]]


def test_a_foreign_host_header_is_refused(server):
    base = server("--allow-host", "dash.example")
    for host, code in (("rebind.example:80", 400), ("dash.example", 200), ("localhost", 200)):
        req = urllib.request.Request(base + "/api/state", headers={"Host": host})
        try:
            got = urllib.request.urlopen(req, timeout=10).status
        except urllib.error.HTTPError as e:
            got = e.code
        assert got == code, host


def test_two_runs_side_by_side(server, finished_run):
    base = server(runs=[finished_run])  # the same run twice: the comparison is of runs given
    runs = fetch(base + "/api/runs")
    assert [r["run"] for r in runs] == [0, 1] and {r["run_id"] for r in runs} == {"dash"}
    a, b = fetch(base + "/api/compare")
    assert a["loss"] == b["loss"] and a["loss"]["step"].count(None) == 1
    assert fetch(base + "/api/state?run=1")["step"] == 60
    with pytest.raises(urllib.error.HTTPError) as e:
        fetch(base + "/api/state?run=2")
    assert e.value.code == 404


def test_non_loopback_needs_a_token_and_every_request_carries_it(server, finished_run):
    r = resilient_cli(
        "dashboard", str(finished_run), "--host", "0.0.0.0", "--port", str(free_port()), timeout=60
    )
    assert r.returncode == 2 and "--token" in r.stdout
    base = server("--host", "127.0.0.2", "--token", "s3cret")
    with pytest.raises(urllib.error.HTTPError) as e:
        fetch(base + "/api/state")
    assert e.value.code == 401
    with pytest.raises(urllib.error.HTTPError):
        fetch(base + "/api/state", token="wrong")
    assert fetch(base + "/api/state", token="s3cret")["state"] == "SUCCEEDED"
    assert fetch(base + "/api/state?token=s3cret")["state"] == "SUCCEEDED"


@pytest.mark.skipif(
    not os.path.exists(CHROMIUM), reason="no Chromium installed (apt-get install chromium)"
)
def test_page_in_headless_chromium(server, finished_run, tmp_path):
    from playwright.sync_api import sync_playwright

    base = server()
    with sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=CHROMIUM,
            args=[
                "--no-sandbox",
                "--disable-dev-shm-usage",  # a container's /dev/shm is 64 MB: a renderer crash
                "--disable-gpu",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--no-first-run",
            ],
        )
        page = browser.new_page(viewport={"width": 1280, "height": 800})
        page.goto(base + "/")
        page.wait_for_function(
            "document.querySelector('#faults tbody tr[data-fault]') && "
            "document.querySelector('#state').textContent === 'SUCCEEDED'",
            timeout=30_000,
        )
        page.wait_for_selector("#steptime .main-svg", timeout=30_000)
        header = page.inner_text("header")
        events = page.inner_text("#events")
        legend = page.inner_text("#legend")
        timeline = page.inner_text("#marks")
        cluster = page.inner_text("#cluster")
        traces = page.evaluate(
            "['steptime','loss_chart','grad','tps_chart','heatmap','gpu_util','host_cpu',"
            "'timeline','lost'].map(id => document.getElementById(id).data?.length || 0)"
        )
        page.click("#faults tbody tr[data-fault]")
        page.wait_for_selector("tr.evidence pre", timeout=10_000)
        shown = page.inner_text("tr.evidence")
        page.click("#xaxis button[data-v=time]")
        on_time = page.evaluate("document.getElementById('loss_chart').layout.xaxis.type")
        page.screenshot(path=str(tmp_path / "dashboard.png"), full_page=True)
        narrow = browser.new_page(viewport={"width": 800, "height": 900})
        narrow.goto(base + "/")
        narrow.wait_for_selector("#steptime .main-svg", timeout=30_000)
        widths = narrow.evaluate(
            "[...document.querySelectorAll('main > section:not([hidden])')]"
            ".map(s => s.getBoundingClientRect().right)"
        )
        browser.close()
    assert (
        "SUCCEEDED" in header and "60 / 60" in header and "restarts\n1" in header.replace("\r", "")
    )
    assert "straggler" in events and "crash" in events
    assert {"starting", "running", "succeeded", "fault", "restart"} <= set(legend.split())
    assert "restart 1" in timeline
    assert "rank 0, rank 1" in cluster and "healthy" in cluster
    assert all(n > 0 for n in traces), traces
    log = (finished_run / "logs" / "rank-1.log").read_text().splitlines()
    assert any(line.strip() and line.strip() in shown for line in log), shown[-500:]
    assert on_time == "date"
    assert max(widths) <= 800  # one column: nothing runs off an 800 px screen
    assert (tmp_path / "dashboard.png").stat().st_size > 20_000
