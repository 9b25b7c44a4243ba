"""SIGTERM/SIGINT as events: the first asks for a stop (named), the second ends at once."""

import os
import signal

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
