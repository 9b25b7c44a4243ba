"""The live progress line and the end-of-run summary.

Contract: `ProgressLine.update(status)` shows `state step/total, loss, tokens/s, restarts, ETA`; on
a terminal it redraws one line (rich), elsewhere it prints a line when the state changes or every
`every_s` seconds, so logs stay readable. `print_summary(status, console)` prints the run's outcome.
"""

from __future__ import annotations

import time

from rich.console import Console
from rich.live import Live
from rich.table import Table
from rich.text import Text

from resilient.runlog.states import JobState

STATE_W = max(len(s.value) for s in JobState)  # the columns after it stay put


def _eta(seconds: float | None) -> str:
    if seconds is None:
        return "--:--"
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


class ProgressLine:
    def __init__(self, console: Console, every_s: float = 5.0):
        self.console, self.every_s = console, every_s
        self.live = (
            # rich would take over sys.stdout/sys.stderr and print what others write there above
            # the line (Ray's worker-death notices): they stay on the descriptors
            # launcher.terminal captures
            Live(
                console=console,
                refresh_per_second=4,
                transient=True,
                redirect_stdout=False,
                redirect_stderr=False,
            )
            if console.is_terminal
            else None
        )
        self._samples: list[tuple[float, int]] = []
        self._last_print, self._last_state = 0.0, None
        self.loss = self.tps = None

    def __enter__(self):
        if self.live:
            self.live.__enter__()
        return self

    def __exit__(self, *exc):
        if self.live:
            self.live.__exit__(*exc)

    def render(self, s: dict) -> str:
        step, total = s.get("step", 0), s.get("total", 0)
        now = time.time()
        self._samples = [(t, st) for t, st in self._samples if now - t < 60] + [(now, step)]
        (t0, s0), (t1, s1) = self._samples[0], self._samples[-1]
        eta = (total - step) * (t1 - t0) / (s1 - s0) if s1 > s0 else None
        self.loss = s.get("loss", self.loss) if s.get("loss") is not None else self.loss
        self.tps = (
            s.get("tokens_per_s", self.tps) if s.get("tokens_per_s") is not None else self.tps
        )
        loss = f"{self.loss:.4f}" if self.loss is not None else "-"
        tps = f"{self.tps:,.0f}" if self.tps is not None else "-"
        return (
            f"{s['state']:<{STATE_W}} step {step}/{total}  loss {loss}  {tps} tok/s  "
            f"restarts {s.get('restarts', 0)}  ETA {_eta(eta)}"
        )

    def update(self, s: dict) -> None:
        line = self.render(s)
        if self.live:
            self.live.update(Text(line))
            return
        now = time.time()
        if s["state"] != self._last_state or now - self._last_print >= self.every_s:
            self.console.print(line, highlight=False)
            self._last_print, self._last_state = now, s["state"]


def print_summary(s: dict, console: Console, wall_s: float) -> None:
    ok = s["state"] == "SUCCEEDED"
    console.print(
        f"\n[bold {'green' if ok else 'red'}]{s['state']}[/] {s.get('name')}/{s.get('run_id')}: "
        f"step {s['step']}/{s['total_steps']} in {wall_s:.1f}s from launch, "
        f"restarts {s['restarts']}"
    )
    console.print(f"run directory: {s.get('run_dir')}", highlight=False, soft_wrap=True)
    if ok:
        console.print(f"final adapter: {s.get('run_dir')}/final", highlight=False, soft_wrap=True)
    elif s.get("reason"):
        console.print(f"reason: {s['reason']}", highlight=False, soft_wrap=True)
    if s["state"] == "STOPPED":
        console.print(
            f"go on with: resilient launch --resume {s.get('run_dir')}",
            highlight=False,
            soft_wrap=True,
        )
    if s["faults"]:
        t = Table(title="faults", title_justify="left")
        for col in ("kind", "rank", "step", "detected after", "recovery_s", "steps replayed"):
            t.add_column(col)
        for f in s["faults"]:
            lag = f"{f['detected_at'] - f['injected_at']:.2f}s" if f.get("injected_at") else "-"
            rec = f"{f['recovery_s']:.2f}" if f.get("recovery_s") is not None else "not recovered"
            t.add_row(
                f["kind"],
                str(f["rank"]),
                str(f["step"]),
                lag,
                rec,
                str(f.get("steps_replayed", "-")),
            )
        console.print(t)
