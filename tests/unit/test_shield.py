"""launcher.shield: what starts inside `shielded()` does not hear SIGTERM or SIGINT, nor what it
starts; this thread hears them again after; `end` SIGKILLs what is deaf."""

import contextlib
import signal
import subprocess
import sys
import time

import psutil
import pytest

from resilient.launcher import shield

pytestmark = [
    pytest.mark.timeout(30),
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="signal masks from /proc"),
]

# a child that starts a grandchild, prints its pid and waits
TREE = (
    "import subprocess, sys, time; "
    "c = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); "
    "print(c.pid, flush=True); time.sleep(60)"
)


def start_tree() -> tuple[subprocess.Popen, psutil.Process]:
    proc = subprocess.Popen([sys.executable, "-c", TREE], stdout=subprocess.PIPE, text=True)
    return proc, psutil.Process(int(proc.stdout.readline()))


def test_what_starts_inside_does_not_hear_the_stop_signals_nor_what_it_starts():
    before = signal.pthread_sigmask(signal.SIG_BLOCK, set())
    with shield.shielded():
        proc, grandchild = start_tree()
    try:
        assert signal.pthread_sigmask(signal.SIG_BLOCK, set()) == before  # this thread hears
        assert shield.blocks_sigterm(proc.pid) and shield.blocks_sigterm(grandchild.pid)
        assert {p.pid for p in shield.deaf_descendants()} >= {proc.pid, grandchild.pid}
        for sig in (signal.SIGTERM, signal.SIGINT):
            proc.send_signal(sig)
            grandchild.send_signal(sig)
        with pytest.raises(subprocess.TimeoutExpired):
            proc.wait(timeout=0.5)
        assert grandchild.is_running()
        t0 = time.monotonic()
        shield.end([psutil.Process(proc.pid), grandchild])
        assert time.monotonic() - t0 < 2
        assert proc.wait(timeout=5) == -signal.SIGKILL
        assert not shield.alive(grandchild)
    finally:
        proc.kill()
        with contextlib.suppress(psutil.Error):
            grandchild.kill()
        proc.wait()


def test_what_starts_outside_hears_them_and_is_not_deaf():
    proc, grandchild = start_tree()
    try:
        assert not shield.blocks_sigterm(proc.pid) and not shield.blocks_sigterm(grandchild.pid)
        assert proc.pid not in {p.pid for p in shield.deaf_descendants()}
        proc.terminate()
        assert proc.wait(timeout=5) == -signal.SIGTERM
    finally:
        proc.kill()
        grandchild.kill()
        proc.wait()


def test_a_process_gone_is_not_deaf():
    assert not shield.blocks_sigterm(2**22 + 1)  # above any pid_max
