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
        '\n[[chaos]]\nat_step = 5\nfault = "slow"\nfactor = 2.5\nrank = 1\n'
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

    def start(*extra, env=None):
        port = free_port()
        p = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "resilient.cli",
                "dashboard",
                str(finished_run),
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


def test_json_api(server):
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
    m = fetch(base + "/api/metrics")
    assert set(m["ranks"]) == {"0", "1"} and m["gpus"]
    assert set(m["ranks"]["0"]["step"]) | set(m["ranks"]["1"]["step"]) == set(range(1, 61))
    assert m["eval"]["step"] == [20, 40, 60] and all(0 < v for v in m["eval"]["loss"])
    ev = fetch(base + "/api/events")
    kinds = {e["kind"] for e in ev}
    assert {"straggler", "crash"} <= kinds
    assert [e for e in fetch(base + "/api/events?kind=straggler")] and all(
        e["kind"] == "straggler" for e in fetch(base + "/api/events?kind=straggler")
    )
    ck = fetch(base + "/api/checkpoints")
    assert ck[0]["step"] == 60 and ck[0]["tier"] == "storage"


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
def test_page_in_headless_chromium(server, tmp_path):
    from playwright.sync_api import sync_playwright

    base = server()
    with sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=CHROMIUM,
            args=[
                "--no-sandbox",
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
            "document.querySelector('#events tbody tr td') && "
            "document.querySelector('#state').textContent === 'SUCCEEDED'",
            timeout=30_000,
        )
        page.wait_for_selector("#steptime .main-svg", timeout=30_000)
        header = page.inner_text("header")
        events = page.inner_text("#events")
        timeline = page.inner_text("#marks")
        traces = page.evaluate(
            "['steptime','loss_chart','grad','heatmap','gpu_util','timeline','lost']"
            ".map(id => document.getElementById(id).data?.length || 0)"
        )
        page.screenshot(path=str(tmp_path / "dashboard.png"), full_page=True)
        browser.close()
    assert (
        "SUCCEEDED" in header and "60 / 60" in header and "restarts\n1" in header.replace("\r", "")
    )
    assert "straggler" in events and "crash" in events
    assert "restart 1" in timeline
    assert all(n > 0 for n in traces), traces
    assert (tmp_path / "dashboard.png").stat().st_size > 20_000
