"""Shared test helpers: job specs on the generated corpus, the CLI as a subprocess, adapter
comparison."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

from resilient.agents.priority import below
from resilient.training.corpus import write_corpus

BASE_SPEC = """\
name = "{name}"
[cluster]
num_workers = 2
[model]
builtin = "tiny-llama"
[peft]
method = "lora"
r = 4
lora_alpha = 8
target_modules = ["q_proj", "v_proj"]
[data]
path = "{corpus}"
seq_len = 32
[train]
steps = {steps}
batch_size = 2
seed = 7
[checkpoint]
storage = "{storage}"
every = 5
[supervisor]
heartbeat_interval = 0.5
hang_timeout = 4.0
"""


def write_job(
    dirpath: Path, name: str = "t", steps: int = 24, storage: str | None = None, extra: str = ""
) -> Path:
    corpus = dirpath / "corpus.txt"
    if not corpus.exists():
        write_corpus(str(corpus), lines=600)
    spec = dirpath / f"{name}.toml"
    spec.write_text(
        BASE_SPEC.format(
            name=name, corpus=corpus, steps=steps, storage=storage or f"file://{dirpath}/runs"
        )
        + extra
    )
    return spec


def resilient_cli(
    *args: str, timeout: float = 240, env: dict | None = None, cwd: str | Path | None = None
) -> subprocess.CompletedProcess:
    """Run the `resilient` CLI in its own process group (in `cwd`); on timeout the whole group
    is killed."""
    cmd = [sys.executable, "-m", "resilient.cli", *args]
    p = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
        env={**os.environ, **(env or {})},
        cwd=cwd,
    )
    try:
        out, _ = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired as e:
        os.killpg(p.pid, signal.SIGKILL)
        out, _ = p.communicate()
        raise AssertionError(
            f"resilient {' '.join(args)} timed out after {timeout}s:\n{out[-3000:]}"
        ) from e
    return subprocess.CompletedProcess(cmd, p.returncode, out, "")


def status(run_dir: Path | str) -> dict:
    r = resilient_cli("status", str(run_dir), "--json", timeout=60)
    assert r.returncode == 0, r.stdout
    return json.loads(r.stdout)


def load_adapter(adapter_dir: Path | str) -> dict:
    from safetensors.torch import load_file

    return load_file(str(Path(adapter_dir) / "adapter_model.safetensors"))


def adapter(run_dir: Path | str) -> dict:
    """The final adapter of a run."""
    return load_adapter(Path(run_dir) / "final")


def assert_same_adapter(a: dict, b: dict) -> None:
    import torch

    assert a.keys() == b.keys() and a
    differ = [k for k in a if not torch.equal(a[k], b[k])]
    assert not differ, f"{len(differ)} of {len(a)} tensors differ, e.g. {differ[0]}"


@contextmanager
def background_launch(*args: str):
    """`resilient launch ARGS` running in the background (own process group, killed on exit)."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "resilient.cli", "launch", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        yield proc
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()


def await_journal(run: Path, predicate, timeout: float = 120) -> None:
    """Wait until the run's journal text satisfies `predicate`.

    The journal is the event to await.
    """
    journal = Path(run) / "journal.jsonl"
    deadline = time.time() + timeout
    while time.time() < deadline:
        if journal.exists() and predicate(journal.read_text()):
            return
        time.sleep(0.2)
    raise AssertionError(f"{journal}: condition not met within {timeout}s")


def read_journal(run: Path | str) -> list[dict]:
    """The run's journal records, in order (through the project's own reader)."""
    from resilient.rundir import RunDir
    from resilient.runlog.journal import read_records

    return read_records(RunDir(str(run)))


# The niceness this test process runs at: "normal priority" for what it starts (a CI runner may run
# everything at -10; the ranks keep whatever they inherit, only Ray's waiting processes go lower).
NORMAL_NICE = os.getpriority(os.PRIO_PROCESS, 0)
LOWERED_NICE = below(NORMAL_NICE)  # what a lowered thread or process runs at (agents.priority)


def niceness(pid: int) -> dict[int, int]:
    """{thread id: niceness} of a process's threads (Linux keeps niceness per thread)."""
    tids = [int(t) for t in os.listdir(f"/proc/{pid}/task")]
    return {t: os.getpriority(os.PRIO_PROCESS, t) for t in tids}


def await_gone(procs: list, timeout: float = 10.0) -> list:
    """Wait until none of `procs` (psutil processes) is alive (a zombie is not); those still alive
    at `timeout`."""
    from resilient.launcher.shield import alive

    deadline = time.monotonic() + timeout
    while True:
        left = [p for p in procs if alive(p)]
        if not left or time.monotonic() >= deadline:
            return left
        time.sleep(0.05)
