"""SIGTERM/SIGINT as events: the first asks for a stop (named), the second ends at once; with
nothing to save, the first ends the launch at once, from a thread of its own."""

import os
import signal
import threading

import pytest

from resilient.errors import Abort
from resilient.launcher.signals import Preemption, StopRequests

pytestmark = pytest.mark.timeout(10)


class Poller:
    stop_requested = False

    def close(self):
        pass


def test_first_signal_asks_for_a_stop_and_the_second_aborts():
    p = Preemption(grace_s=30).install()
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


def test_with_nothing_to_save_the_first_signal_ends_the_launch_from_its_own_thread():
    p = Preemption(grace_s=30).install()
    ended, exited, asked, nothing_to_save = [], threading.Event(), threading.Event(), [False]

    def at_once():
        asked.set()
        return nothing_to_save[0]

    p.exit_now = lambda code: (ended.append(code), exited.set())
    try:
        StopRequests(Poller(), p).end_at_once_while(at_once, ended.append)
        os.kill(os.getpid(), signal.SIGTERM)  # a step was trained: only a stop request
        assert asked.wait(5) and p.stop_reason == "SIGTERM (preemption)" and ended == []
        nothing_to_save[0] = True
        # the main thread waits (as in a Ray call); the watcher ends the launch all the same
        threading.Timer(0.1, os.kill, (os.getpid(), signal.SIGINT)).start()
        with pytest.raises(Abort):  # the main thread's handler: a second signal
            threading.Event().wait(5)
        assert exited.wait(5)
        assert ended == ["SIGINT before this launch trained a step: ended at once", 130]
    finally:
        p.uninstall()
