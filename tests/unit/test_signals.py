"""SIGTERM/SIGINT as events: the first asks for a stop (named), the second ends at once; with
nothing to save, the first ends the launch at once, from a thread of its own."""

import importlib
import io
import json
import os
import signal
import threading
import time

import pytest
from rich.console import Console

from resilient.config import validate_tree
from resilient.errors import Abort
from resilient.launcher import signals
from resilient.launcher.signals import Preemption, StopRequests
from resilient.rundir import RunDir, markers
from resilient.rundir.markers import FiredFault

# the module: the package's `launch` is the function of that name
launch = importlib.import_module("resilient.launcher.launch")

pytestmark = pytest.mark.timeout(10)


class Poller:
    stop_requested = False

    def close(self):
        pass


def test_first_signal_asks_for_a_stop_and_the_second_aborts():
    p = Preemption(grace_s=30).install()
    p.exit_now = lambda code: None  # the second signal's backstop (5 s) ends no test run
    try:
        requests = StopRequests(Poller(), p)
        assert requests.stop_reason is None and requests.stop_deadline is None
        os.kill(os.getpid(), signal.SIGTERM)
        assert requests.stop_reason == "SIGTERM (preemption)" and p.signum == signal.SIGTERM
        assert 29 < requests.stop_deadline - p.at <= 30
        with pytest.raises(Abort) as e:
            os.kill(os.getpid(), signal.SIGINT)
        assert e.value.signum == signal.SIGTERM and "SIGINT after SIGTERM" in e.value.reason
    finally:
        p.uninstall()
    assert signal.getsignal(signal.SIGTERM) is not p._on_signal


def test_resilient_stop_without_a_signal():
    poller = Poller()
    poller.stop_requested = True
    assert StopRequests(poller, Preemption(30)).stop_reason == "resilient stop"


@pytest.fixture
def installed():
    """`install(grace_s, nothing_to_save, record_end)`: an installed Preemption whose exit is
    recorded, not made; (the preemption, what was recorded, set once it would have exited)."""
    made = []

    def install(grace_s, nothing_to_save, record_end):
        p = Preemption(grace_s=grace_s).install()
        made.append(p)
        ended, exited = [], threading.Event()
        p.exit_now = lambda code: (ended.append(code), exited.set())
        StopRequests(Poller(), p).end_at_once_while(
            nothing_to_save, lambda *a: record_end(ended, *a)
        )
        return p, ended, exited

    yield install
    for p in made:
        p.uninstall()


def test_with_nothing_to_save_the_first_signal_ends_the_launch_from_its_own_thread(installed):
    p, ended, exited = installed(30, lambda: True, lambda out, *a: out.append(a) or True)

    def broken():
        raise RuntimeError("tracker server down")

    # the launcher's (the trackers' runs ended): after the journal, before the exit; one that
    # fails stops neither the others nor the exit
    p.before_exit += [broken, lambda: ended.append("trackers closed")]
    os.kill(os.getpid(), signal.SIGINT)  # the main thread is not needed: it may be in Ray
    assert exited.wait(5)
    why = "SIGINT before this launch trained a step: ended at once"
    assert ended == [(why, True), "trackers closed", 130]


def test_a_declined_end_leaves_the_stop_to_the_main_thread(installed, monkeypatch):
    monkeypatch.setattr(signals, "BACKSTOP_S", 0.2)
    # nothing to save when asked, but a step is seen before the book takes its lock: declined
    decline = lambda out, reason, only_if_nothing: out.append(reason) or not only_if_nothing  # noqa: E731
    _, ended, exited = installed(0.1, lambda: True, decline)
    os.kill(os.getpid(), signal.SIGTERM)
    # the grace (0.1 s) and the backstop (0.2 s) pass with the main thread not done: the
    # signals' thread ends the launch
    assert exited.wait(5)
    assert ended == [
        "SIGTERM before this launch trained a step: ended at once",
        "SIGTERM: the grace of supervisor.grace_s=0.1s ran out",
        143,
    ]


def test_a_second_signal_the_main_thread_cannot_act_on_ends_the_launch(installed, monkeypatch):
    monkeypatch.setattr(signals, "BACKSTOP_S", 0.2)
    record = lambda out, reason, only_if_nothing: out.append(reason) or True  # noqa: E731
    _, ended, exited = installed(30, lambda: False, record)
    os.kill(os.getpid(), signal.SIGTERM)
    with pytest.raises(Abort):  # raised in the main thread, which (in Ray) may not get to it
        os.kill(os.getpid(), signal.SIGINT)
    assert exited.wait(5)
    assert ended == ["SIGINT after SIGTERM: ended at once", 143]


class _Ended(Exception):
    """The process's exit, in a test: `os._exit` would end pytest."""


def test_a_chaos_drill_ended_from_the_signals_thread_still_reports_its_faults(
    tmp_path, monkeypatch
):
    """The main thread held past a second signal (in a Ray call, which runs Python's handler and
    goes on) is ended from the signals' thread; the faults injected so far are reported as a main
    thread's end reports them: chaos_report.json and the table."""
    monkeypatch.setattr(signals, "BACKSTOP_S", 0.2)
    (tmp_path / "corpus.txt").write_text("a line\n")
    spec = validate_tree(
        {
            "name": "drill",
            "data": {"path": str(tmp_path / "corpus.txt")},
            "checkpoint": {"storage": str(tmp_path / "runs")},
        }
    )
    rundir = RunDir(str(tmp_path / "runs" / "drill" / "r"))
    ended, exited = [], threading.Event()

    class Conn:
        def end_now(self):
            ended.append("cluster ended")

        def close(self):
            pass

    def stuck(spec, rundir, journal, records, console, preemption, captured):
        fired = FiredFault(key=markers.planned_key(0), fault="kill", injected_at=time.time())
        markers.write(rundir, fired)
        preemption.exit_now = lambda code: (ended.append(code), exited.set())
        to_send = [signal.SIGTERM, signal.SIGINT]
        while not exited.is_set():
            try:
                if to_send:
                    os.kill(os.getpid(), to_send.pop(0))
                exited.wait(0.05)
            except Abort:  # Ray's call runs the handler and goes on
                pass
        raise _Ended

    monkeypatch.setattr(launch, "_start", lambda *a: Conn())
    monkeypatch.setattr(launch, "_supervise", stuck)
    out = io.StringIO()
    with pytest.raises(_Ended):
        launch._run(spec, rundir, "r", Console(file=out, width=200), True, stage=lambda: None)
    assert ended == ["cluster ended", 128 + signal.SIGTERM]
    report = json.loads((tmp_path / "runs" / "drill" / "r" / "chaos_report.json").read_text())
    assert [f["kind"] for f in report["faults"]] == ["kill"]
    assert "chaos report: 0/1 faults recovered" in out.getvalue()


def test_a_chaos_report_that_storage_holds_up_does_not_hold_the_exit(monkeypatch):
    monkeypatch.setattr(launch, "write_chaos_report", lambda rundir, console: time.sleep(30))
    out, t0 = io.StringIO(), time.monotonic()
    launch.report_chaos_within(None, Console(file=out), 0.3)
    assert time.monotonic() - t0 < 2
    assert "chaos report not written within 0.3s" in out.getvalue()
