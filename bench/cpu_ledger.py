"""Where a machine's CPU goes while a bench runs: every process's CPU time, sampled from /proc.

Wall time says how long a step took; on a machine whose cores the ranks fill, what slows them is
the CPU everything beside them takes, and that this tells apart by process (Linux only).

Contract: `Ledger()` samples every process's user+system CPU seconds every `every_s` on a thread
until `stop()`; `ledger.processes(t0, t1)` is [(CPU seconds between the samples nearest t0 and t1,
part, process name)], most first, each process's part `part_of(its name, its command line)` but
the two that spent the most, "ranks" (each system's two ranks). A process that started inside the
window counts from its start, one that ended inside it not at all.
"""

from __future__ import annotations

import os
import threading
import time

# what each part's processes are called: their name (`comm`, at most 15 characters; Ray names its
# workers after their actor class) or, for a Python program, its command line
PARTS = (
    ("resilient node agent", ("ray::NodeAgent",), ()),
    ("resilient spares", ("ray::TrainWorker",), ()),  # the ranks are counted apart, before this
    ("resilient driver", (), ("resilient.cli",)),
    ("torchrun agent", ("pt_elastic",), ("torch.distributed.run",)),
    ("ray", ("raylet", "gcs_server", "ray::"), ("ray/dashboard", "ray/autoscaler", "ray/_private")),
)


def part_of(name: str, cmdline: str) -> str:
    for part, names, commands in PARTS:
        if any(name.startswith(n[:15]) for n in names) or any(c in cmdline for c in commands):
            return part
    return "other (kernel, the bench, the machine)"


Key = tuple[int, int]  # (pid, start time): a process, whatever it renames itself to (a kernel
# worker takes the name of its current work)


def _read() -> dict[Key, tuple[str, float]]:
    """{process: (its name, user+system CPU seconds so far)}."""
    hz = os.sysconf("SC_CLK_TCK")
    out = {}
    for p in os.listdir("/proc"):
        if not p.isdigit():
            continue
        try:
            with open(f"/proc/{p}/stat") as f:
                s = f.read()
        except OSError:  # ended since listed
            continue
        fields = s[s.rindex(")") + 2 :].split()
        cpu = (int(fields[11]) + int(fields[12])) / hz
        out[(int(p), int(fields[19]))] = (s[s.index("(") + 1 : s.rindex(")")], cpu)
    return out


class Ledger:
    def __init__(self, every_s: float = 0.5):  # a sample costs ~1 ms of CPU
        self.samples: list[tuple[float, dict[Key, tuple[str, float]]]] = []
        self.cmdlines: dict[Key, str] = {}
        self.every_s, self.done = every_s, threading.Event()
        self.thread = threading.Thread(target=self._loop, daemon=True, name="cpu-ledger")
        self.thread.start()

    def _loop(self) -> None:
        while not self.done.is_set():
            snap = _read()
            for key in snap.keys() - self.cmdlines.keys():
                try:
                    with open(f"/proc/{key[0]}/cmdline", "rb") as f:
                        self.cmdlines[key] = f.read().replace(b"\0", b" ").decode(errors="replace")
                except OSError:
                    self.cmdlines[key] = ""
            self.samples.append((time.time(), snap))
            self.done.wait(self.every_s)

    def stop(self) -> None:
        self.done.set()
        self.thread.join()

    def processes(self, t0: float, t1: float) -> list[tuple[float, str, str]]:
        """[(CPU seconds between the samples nearest t0 and t1, part, process name)], most first."""
        inside = [s for s in self.samples if t0 <= s[0] <= t1] or self.samples
        first, last = inside[0][1], inside[-1][1]
        spent = sorted(
            (
                (cpu - first.get(key, (name, 0.0))[1], key, name)
                for key, (name, cpu) in last.items()
            ),
            reverse=True,
        )
        return [
            (cpu, "ranks" if i < 2 else part_of(name, self.cmdlines.get(key, "")), name)
            for i, (cpu, key, name) in enumerate(spent)
        ]
