"""Where a step's time goes, thread by thread: the kernel's scheduler statistics over a window of
steady training, for one system at a time (Linux only).

bench/overhead.py says how much CPU each process spends a step; this says, for the two training
threads, how much of a step each spent on a core, waiting for one (run-queue wait), and how often
it was preempted (involuntary context switches) or gave its core up (voluntary: a collective's
wait), and which other threads took the cores meanwhile. One run of bench/recovery.py's workload
(`--batch 4` by default: a shorter step, where what runs beside the ranks weighs more), of
`resilient` (its spec overrides with `--set`) or `plain` (torchrun DDP, no checkpoints); the
window starts `--delay` seconds after the launch (past the start-up) and lasts `--window`. Every
thread on the machine is counted (run it on a quiet one); threads that end inside the window are
not.
Usage: python bench/threads.py resilient|plain [--steps 1500] [--batch 4] [--delay S]
                               [--window 25] [--set KEY=VALUE ...] [--top 12]
"""

from __future__ import annotations

import argparse
import glob
import os
import sys
import tempfile
import threading
import time
from collections import defaultdict
from dataclasses import dataclass

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))

from bench.harness import read_log, run_resilient, run_torchrun  # noqa: E402


@dataclass(frozen=True)
class Sched:
    """One thread's counters: ns on a core, ns waiting for one, slices, and its context switches
    (voluntary, involuntary)."""

    cpu: int
    wait: int
    slices: int
    vol: int
    nonvol: int
    name: str  # process name / thread name

    def minus(self, before: Sched | None) -> Sched:
        if before is None:
            return self
        return Sched(
            self.cpu - before.cpu,
            self.wait - before.wait,
            self.slices - before.slices,
            self.vol - before.vol,
            self.nonvol - before.nonvol,
            self.name,
        )


def _switches(status: str, key: str) -> int:
    return int(status.split(f"\n{key}:")[1].split()[0])


def sample() -> dict[str, Sched]:
    """Every thread's counters, by /proc path (threads that end meanwhile are skipped)."""
    out = {}
    for task in glob.glob("/proc/[0-9]*/task/[0-9]*"):
        proc = task.split("/task/")[0]
        try:
            cpu, wait, slices = map(int, open(f"{task}/schedstat").read().split())
            status = "\n" + open(f"{task}/status").read()
            name = f"{open(f'{proc}/comm').read().strip()}/{open(f'{task}/comm').read().strip()}"
        except (OSError, ValueError, IndexError):
            continue
        vol = _switches(status, "voluntary_ctxt_switches")
        out[task] = Sched(
            cpu, wait, slices, vol, _switches(status, "nonvoluntary_ctxt_switches"), name
        )
    return out


def steps_between(work: str, system: str, t0: float, t1: float) -> int:
    """Rank 0's steps that ended inside [t0, t1]."""
    if system == "resilient":
        import pyarrow.parquet as pq

        rows = pq.read_table(f"{work}/runs/res-threads/r/metrics/train").to_pylist()
        ends = [r["t"] for r in rows if r["rank"] == 0]
    else:
        ends = [t for _, t, _, _ in read_log(f"{work}/tr-threads/steps.log")]
    return sum(t0 <= t <= t1 for t in ends)


def report(system: str, sets: list[str], diff: dict[str, Sched], steps: int, span: float, top: int):
    ranked = sorted(diff.values(), key=lambda s: -s.cpu)
    train, rest = ranked[:2], ranked[2:]
    n = max(steps, 1)
    print(
        f"{system} {' '.join(sets)}: {steps} steps in {span:.1f} s, {1e3 * span / n:.2f} ms a step"
    )
    for s in train:
        print(
            f"  training thread {s.name}: on a core {s.cpu / 1e6 / n:.2f} ms a step, waiting for "
            f"one {s.wait / 1e6 / n:.2f} ms, preempted {s.nonvol / n:.1f} times, yielded "
            f"{s.vol / n:.1f}"
        )
    by = defaultdict(lambda: [0, 0])
    for s in rest:
        by[s.name][0] += s.cpu
        by[s.name][1] += s.slices
    side = sum(s.cpu for s in rest)
    print(f"  every other thread: {side / 1e6 / span:.1f} ms of CPU a second; the most:")
    for name, (cpu, slices) in sorted(by.items(), key=lambda kv: -kv[1][0])[:top]:
        print(f"    {name:<40} {cpu / 1e6 / span:6.2f} ms/s {slices / span:7.1f} runs/s")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("system", choices=("resilient", "plain"))
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument(
        "--delay", type=float, help="seconds after the launch (default: 35 resilient, 15 plain)"
    )
    ap.add_argument("--window", type=float, default=25.0)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--top", type=int, default=12)
    a = ap.parse_args()
    if a.delay is None:  # past the start-up: Ray's and the warm-up of the spares, or torchrun's
        a.delay = 35.0 if a.system == "resilient" else 15.0
    from resilient.training.corpus import write_corpus
    from resilient.training.data import BYTE_VOCAB
    from resilient.training.model import build_tiny_llama

    work = tempfile.mkdtemp(prefix="resilient-threads-")
    write_corpus(f"{work}/corpus.txt")
    build_tiny_llama(f"{work}/base", BYTE_VOCAB)
    run_args = argparse.Namespace(
        steps=a.steps,
        seq_len=a.seq_len,
        batch=a.batch,
        every=0,
        hang_timeout=10.0,
        collective_timeout=30.0,
        limit=a.delay + a.window + 600.0,
    )
    if a.system == "resilient":
        job = threading.Thread(target=run_resilient, args=(work, "threads", [], run_args, a.set))
    else:
        job = threading.Thread(target=run_torchrun, args=(work, "threads", [], run_args, 0))
    job.start()
    time.sleep(a.delay)
    before, t0 = sample(), time.time()
    time.sleep(a.window)
    after, t1 = sample(), time.time()
    if not job.is_alive():  # its threads are gone from `after`, and its steps end early
        print("the run ended inside the window: give it more --steps or a shorter --window")
    job.join()
    diff = {k: v.minus(before.get(k)) for k, v in after.items()}
    report(a.system, a.set, diff, steps_between(work, a.system, t0, t1), t1 - t0, a.top)


if __name__ == "__main__":
    main()
