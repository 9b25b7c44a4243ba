"""The launch's terminal is the job's: what else the process writes to fds 1/2 (as Ray's C++ core
and its error listener do) goes to the run's logs, not the terminal; a cluster address with nothing
behind it is a user error naming cluster.address, at once."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from resilient.errors import UserError
from resilient.launcher.cluster import _reachable

pytestmark = pytest.mark.timeout(60)

SCRIPT = """
import os, sys, time, logging
from resilient.launcher.terminal import Terminal
with Terminal() as t:
    os.write(2, b"[2026 W] gcs_client.cc:210: Failed to get cluster ID\\n")
    print("(raylet) A worker died or was killed", file=sys.stdout, flush=True)
    t.out.write("progress 1/2\\n")
    logging.getLogger("resilient.x").warning("ours, a warning")
    deadline = time.time() + 10
    got = []
    while time.time() < deadline and len(got) < 2:
        got += t.lines.drain()
        time.sleep(0.05)
print("captured:", " | ".join(got))
"""


def test_other_programs_output_is_captured_and_ours_reaches_the_terminal():
    r = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    terminal = r.stdout + r.stderr
    assert "progress 1/2" in r.stdout and "ours, a warning" in r.stderr
    before = terminal.split("captured:")[0]
    assert "gcs_client" not in before and "(raylet)" not in before
    captured = r.stdout.split("captured:")[1]
    assert "gcs_client.cc" in captured and "A worker died" in captured


LIVE = """
import sys, time
from rich.console import Console
from resilient.launcher.progress import ProgressLine
from resilient.launcher.terminal import Terminal
with Terminal() as t:
    console = Console(file=t.out, force_terminal=True, width=100)
    with ProgressLine(console) as progress:
        progress.update({"state": "ROLLING_BACK", "step": 3, "total": 9})
        print("(raylet) A worker died or was killed", flush=True)
        print("Worker exit type: SYSTEM_ERROR", file=sys.stderr, flush=True)
        time.sleep(0.5)
        progress.update({"state": "RUNNING", "step": 4, "total": 9})
    deadline, got = time.time() + 10, []
    while time.time() < deadline and len(got) < 2:
        got += t.lines.drain()
        time.sleep(0.05)
print("captured:", " | ".join(got))
"""


def test_the_live_progress_line_on_a_terminal_lets_no_other_output_through():
    """rich's live display takes over sys.stdout and sys.stderr on a terminal and prints what is
    written there above the line: Ray's worker-death notices, which its error listener prints
    from Python, reached the terminal in every launch that had a TTY (the old code)."""
    r = subprocess.run([sys.executable, "-c", LIVE], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    before = (r.stdout + r.stderr).split("captured:")[0]
    assert "A worker died" not in before and "SYSTEM_ERROR" not in before, before
    assert "ROLLING_BACK step 3/9" in before  # the line itself is drawn
    captured = r.stdout.split("captured:")[1]
    assert "A worker died" in captured and "SYSTEM_ERROR" in captured


def test_a_cluster_address_nothing_listens_on_is_a_user_error_at_once():
    t0 = time.time()
    with pytest.raises(UserError, match=r"cluster.address '127.0.0.1:1'.*connection refused"):
        _reachable("127.0.0.1:1")
    assert time.time() - t0 < 5
    _reachable("auto")  # Ray's to resolve


def test_the_end_of_a_stopped_run_says_how_to_go_on_and_the_data_line_reads():
    from rich.console import Console

    from resilient.launcher.progress import print_summary
    from resilient.training.prep import summary

    console = Console(width=200, record=True)
    s = {"state": "STOPPED", "name": "j", "run_id": "r", "step": 7, "total_steps": 9}
    s |= {"restarts": 0, "run_dir": "/runs/j/r", "reason": "stopped on SIGTERM", "faults": []}
    print_summary(s, console, 3.0)
    assert "go on with: resilient launch --resume /runs/j/r" in console.export_text()
    stats = {"rows": 600, "used": 600, "sequences": 657, "mode": "chunks", "tokens": 21024}
    stats |= {"trained_tokens": 21024, "train_on": "all", "bad_rows": 0, "truncated": 0}
    stats |= {"num_proc": 1, "tokenise_s": 0.4, "samples_per_s": 1648}
    line = summary(stats)
    assert "657 chunked sequences" in line and "chunks sequences" not in line
