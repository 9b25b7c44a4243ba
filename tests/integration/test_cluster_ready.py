"""Ready for clusters: the GPU-ready training keys resume bit for bit from inputs staged at launch
(the user's data file is deleted once the job runs), the ranks' output lands in the run directory
and a fault names its rank's log, and the driver serves Prometheus metrics while the job runs."""

import re
import socket
import time
import urllib.request

import pytest

from tests.helpers import (
    adapter,
    assert_same_adapter,
    await_journal,
    background_launch,
    resilient_cli,
    status,
    write_job,
)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(400)]

GPU_READY = """
[model]
builtin = "tiny-llama"
dtype = "bfloat16"
[train]
steps = 120
batch_size = 2
seed = 7
grad_accum_steps = 2
gradient_checkpointing = true
lr_scheduler = "cosine"
warmup_steps = 3
"""


def _spec(work, data: str, extra: str = "") -> str:
    """The test spec with the GPU-ready keys in place of its own [model]/[train] tables."""
    text = write_job(work, name="g").read_text()
    text = re.sub(r"\[model\]\n[^\[]*", "", text)
    text = re.sub(r"\[train\]\n[^\[]*", "", text)
    text = text.replace(f'path = "{work}/corpus.txt"', f'path = "{data}"')
    path = work / f"g-{len(extra)}.toml"
    path.write_text(text + GPU_READY + extra)
    return str(path)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _scrape_restarted(port: int, proc, timeout: float = 120) -> str:
    """The driver's /metrics once it shows the restarted job running again. Scraped every 0.1 s
    from the restart on, while the job runs (it ends a few seconds later: awaiting a journal
    record first could miss the window); fails if the job ends before."""
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        try:
            text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read()
        except OSError:  # between attempts, or the exporter not up yet
            text = b""
        metrics = text.decode()
        if re.search(r"^resilient_restarts_total 1\.0$", metrics, re.M) and re.search(
            r'^resilient_job_state\{state="RUNNING"\} 1\.0$', metrics, re.M
        ):
            return metrics
        time.sleep(0.1)
    raise AssertionError(f"no scrape showed the restarted job running (exit {proc.poll()})")


def test_staged_inputs_gpu_ready_keys_logs_and_metrics(tmp_path):
    work = tmp_path
    write_job(work)  # the corpus
    r = resilient_cli("launch", _spec(work, f"{work}/corpus.txt"), "--run-id", "clean")
    assert r.returncode == 0, r.stdout
    doomed = work / "doomed.txt"
    doomed.write_text((work / "corpus.txt").read_text())
    port = _free_port()
    extra = (
        f"\n[anomaly]\nprometheus_port = {port}\n"
        '\n[[chaos]]\nat_step = 10\nfault = "kill"\nrank = 1\n'
    )
    run = work / "runs" / "g" / "staged"
    with background_launch(_spec(work, str(doomed), extra), "--run-id", "staged") as proc:
        await_journal(run, lambda j: '"to": "RUNNING"' in j)
        doomed.unlink()  # every later (re)start reads the staged copy only
        await_journal(run, lambda j: '"type": "restart"' in j)
        metrics = _scrape_restarted(port, proc)
        out, _ = proc.communicate(timeout=300)
        assert proc.returncode == 0, out
    assert re.search(r'^resilient_faults_total\{kind="crash"\} 1\.0$', metrics, re.M)
    assert_same_adapter(adapter(work / "runs" / "g" / "clean"), adapter(run))
    (fault,) = status(run)["faults"]
    assert fault["log"].endswith("logs/rank-1.log")
    logs = resilient_cli("logs", str(run), "--rank", "0")
    assert logs.returncode == 0 and logs.stdout.strip(), logs.stdout
    assert (run / "logs" / "rank-1.log").exists()
    bad = resilient_cli("logs", str(run), "--rank", "7")
    assert bad.returncode == 2 and "--rank 7" in bad.stdout
