"""Detectors: each a small class over a window of samples; `observe(...)` returns new events.

Contract: detectors are deterministic functions of what they were fed (no clocks, no I/O), so the
same trace gives the same events in the live job, in tests and in bench/anomaly_eval.py. Every
threshold comes from `AnomalyConfig` (documented in the README). The straggler detector lives in
`anomaly.straggler` (re-exported here).
"""

from __future__ import annotations

import math
import statistics
from collections import defaultdict, deque

from resilient.anomaly.events import CORDON, RESTART, ROLLBACK, WARN, AnomalyEvent
from resilient.anomaly.straggler import StragglerDetector, median_without  # noqa: F401
from resilient.config import AnomalyConfig

# XID classes (NVIDIA's XID catalogue) -> what to do. Unknown XIDs are warnings.
XID_ACTIONS: dict[int, tuple[str, str]] = {
    **{x: (RESTART, "application error: restart the job") for x in (13, 31, 43, 45, 69)},
    **{
        x: (CORDON, "memory error: reset the GPU (the node is drained meanwhile)")
        for x in (48, 63, 64, 92, 94, 95)
    },
    **{x: (CORDON, "GPU/NVLink/GSP failure: drain the node") for x in (74, 79, 119, 120, 140)},
}
THERMAL_THROTTLE = 0x20 | 0x40  # SW and HW thermal slowdown
POWER_THROTTLE = 0x04 | 0x80  # SW power cap, HW power brake


class HardwareDetector:
    """XIDs, uncorrectable ECC increases, row-remap failure/pending, retired pages, recovery
    action, lost GPU, thermal, PCIe replays.

    Retired pages: a page retirement pending (the GPU needs a reset to retire it) cordons, as a
    pending row remap does; retired-page counts that rise without a new pending retirement warn.
    PCIe replays: a counter that grows faster than `pcie_replay_per_min`, over the last
    `pcie_replay_window_s` seconds (or by more than a whole window's budget in less), warns once,
    and again only after the rate fell back under the limit."""

    def __init__(self, cfg: AnomalyConfig):
        self.cfg = cfg
        self.last: dict[tuple[str, int], dict] = {}
        self.warned: set[tuple[str, int, str]] = set()
        # (t, counter) per GPU: the newest sample at or before the window's start, then the rest
        self.replays: dict[tuple[str, int], deque] = defaultdict(deque)

    def observe(self, node: str, s: dict) -> list[AnomalyEvent]:
        key = (node, s["gpu"])
        prev = self.last.get(key, {})
        self.last[key] = s
        if s.get("lost"):
            lost = (
                "gpu_lost",
                CORDON,
                "critical",
                {"reason": "GPU is lost: NVML no longer answers"},
            )
            found = [] if prev.get("lost") else [lost]
        else:
            found = self._failures(s, prev) + self._warnings(node, s) + self._pcie(node, s)
        return [
            AnomalyEvent(
                s["t"], kind, severity, action, node=node, evidence={"gpu": s["gpu"], **evidence}
            )
            for kind, action, severity, evidence in found
        ]

    @staticmethod
    def _failures(s: dict, prev: dict) -> list[tuple[str, str, str, dict]]:
        """(kind, action, severity, evidence) of what failed since the previous sample."""
        out = []
        if s.get("xid"):
            action, why = XID_ACTIONS.get(s["xid"], (WARN, "unclassified XID"))
            severity = "critical" if action != WARN else "warning"
            out.append(("gpu_xid", action, severity, {"xid": s["xid"], "reason": why}))
        for f in ("ecc_volatile_uncorrected", "ecc_aggregate_uncorrected"):
            if s.get(f) is not None and prev.get(f) is not None and s[f] > prev[f]:
                out.append(
                    (
                        "gpu_ecc",
                        CORDON,
                        "critical",
                        {
                            "counter": f,
                            "before": prev[f],
                            "now": s[f],
                            "reason": "uncorrectable ECC errors rose",
                        },
                    )
                )
                break
        if s.get("remap_failed") and not prev.get("remap_failed"):
            out.append(("gpu_remap", CORDON, "critical", {"reason": "row remapping failed"}))
        elif s.get("remap_pending") and not prev.get("remap_pending"):
            out.append(
                (
                    "gpu_remap",
                    CORDON,
                    "critical",
                    {"pending": True, "reason": "row remap pending: the GPU needs a reset"},
                )
            )
        out += _retired_pages(s, prev)
        if s.get("recovery_action") and not prev.get("recovery_action"):
            out.append(
                (
                    "gpu_recovery",
                    CORDON,
                    "critical",
                    {
                        "recovery_action": s["recovery_action"],
                        "reason": "driver asks for a recovery action",
                    },
                )
            )
        return out

    def _warnings(self, node: str, s: dict) -> list[tuple[str, str, str, dict]]:
        """Thermal and power throttling: warned once until the condition clears."""
        g, throttle = s["gpu"], s.get("throttle_reasons") or 0
        out = []
        hot = (s.get("temp") or 0) >= self.cfg.thermal_c or bool(throttle & THERMAL_THROTTLE)
        if hot and (node, g, "thermal") not in self.warned:
            self.warned.add((node, g, "thermal"))
            out.append(
                (
                    "thermal",
                    WARN,
                    "warning",
                    {"temp": s.get("temp"), "throttle_reasons": s.get("throttle_reasons")},
                )
            )
        elif not hot:
            self.warned.discard((node, g, "thermal"))
        if throttle & POWER_THROTTLE and (node, g, "power") not in self.warned:
            self.warned.add((node, g, "power"))
            out.append(
                ("power_throttle", WARN, "warning", {"throttle_reasons": s.get("throttle_reasons")})
            )
        return out

    def _pcie(self, node: str, s: dict) -> list[tuple[str, str, str, dict]]:
        """PCIe replays faster than the limit: warned once until the rate falls back under it."""
        count = s.get("pcie_replay")
        if count is None:  # not supported here, or not read this time: nothing to compare
            return []
        key, t = (node, s["gpu"]), s["t"]
        window = self.cfg.pcie_replay_window_s
        series = self.replays[key]
        if series and count < series[-1][1]:  # the counter restarted (driver reload, GPU reset)
            series.clear()
        series.append((t, count))
        while len(series) >= 2 and series[1][0] <= t - window:
            series.popleft()
        t0, c0 = series[0]
        # A span shorter than the window is held to the whole window's budget, so a short burst
        # at the start is judged as if the window were full rather than extrapolated to a rate.
        budget = self.cfg.pcie_replay_per_min * max(t - t0, window) / 60
        over = count - c0 > budget
        flag = (node, s["gpu"], "pcie_replay")
        if over and flag not in self.warned:
            self.warned.add(flag)
            evidence = {
                "replays": count - c0,
                "seconds": round(t - t0, 3),
                "per_min_limit": self.cfg.pcie_replay_per_min,
                "counter": count,
                "reason": "PCIe replays above the limit: a degraded link slows every collective",
            }
            return [("pcie_replay", WARN, "warning", evidence)]
        if not over:
            self.warned.discard(flag)
        return []


RETIRED = ("retired_pages_sbe", "retired_pages_dbe")  # retired-page counts, by cause


def _retired_pages(s: dict, prev: dict) -> list[tuple[str, str, str, dict]]:
    """A page retirement newly pending: the GPU needs a reset before the page is retired, so it
    is treated like a pending row remap (cordon). Retired-page counts that rose otherwise (the
    first sample is the baseline, as for ECC) are a warning: the memory is protected, but wearing.
    """
    rose = [
        f for f in RETIRED if s.get(f) is not None and prev.get(f) is not None and s[f] > prev[f]
    ]
    counts = {f: s.get(f) for f in RETIRED}
    if s.get("retired_pending") and not prev.get("retired_pending"):
        reason = "page retirement pending: the GPU needs a reset"
        return [
            ("gpu_retired_pages", CORDON, "critical", {"pending": True, **counts, "reason": reason})
        ]
    if rose:
        before = {f"{f}_before": prev[f] for f in rose}
        reason = "GPU memory pages retired (ECC errors)"
        return [
            (
                "gpu_retired_pages",
                WARN,
                "warning",
                {"pending": False, "rose": rose, **counts, **before, "reason": reason},
            )
        ]
    return []


class NumericsDetector:
    """NaN/Inf loss or grad norm -> rollback; a loss spike (robust z-score over a window of the
    steps before it) -> warning, and a rollback after `spike_patience` consecutive spikes. Fed the
    job-wide mean loss per step. A step before the newest one seen (the job went back: a rollback,
    or a restart that replays) forgets the losses from that step on."""

    def __init__(self, cfg: AnomalyConfig):
        self.cfg = cfg
        self.window: deque[tuple[int, float]] = deque(maxlen=cfg.spike_window)  # (step, loss)
        self.spikes: list[int] = []

    def observe(
        self, t: float, step: int, loss: float, grad_norm: float, rank: int | None = None
    ) -> list[AnomalyEvent]:
        if self.window and step < self.window[-1][0]:
            # Those losses belong to the timeline the job left: as a baseline, later training's
            # lower losses would call the earlier steps' spikes (a rollback far back then failed
            # on "spikes" it cannot get past).
            while self.window and self.window[-1][0] >= step:
                self.window.pop()
            self.spikes = []
        if not (math.isfinite(loss) and math.isfinite(grad_norm)):
            return [
                AnomalyEvent(
                    t,
                    "nan",
                    "critical",
                    ROLLBACK,
                    rank=rank,
                    step=step,
                    evidence={"loss": repr(loss), "grad_norm": repr(grad_norm)},
                )
            ]
        ev = []
        if len(self.window) >= self.window.maxlen // 2:
            losses = [x for _, x in self.window]
            med = statistics.median(losses)
            mad = statistics.median(abs(x - med) for x in losses) * 1.4826
            z = (loss - med) / mad if mad > 0 else 0.0
            if z > self.cfg.spike_z:
                self.spikes.append(step)
                action = ROLLBACK if len(self.spikes) >= self.cfg.spike_patience else WARN
                ev.append(
                    AnomalyEvent(
                        t,
                        "loss_spike",
                        "warning" if action == WARN else "critical",
                        action,
                        rank=rank,
                        step=step,
                        evidence={
                            "loss": loss,
                            "median": med,
                            "z": round(z, 2),
                            "spike_steps": list(self.spikes),
                        },
                    )
                )
                if action == ROLLBACK:
                    self.spikes = []
                return ev  # a spike does not enter the baseline
        self.spikes = []
        self.window.append((step, loss))
        return ev


class HostDetector:
    """Steady RSS growth of a worker (a leak): least-squares slope over `leak_window_s` above
    `leak_mb_per_min` with a good fit (R^2 >= 0.9)."""

    def __init__(self, cfg: AnomalyConfig):
        self.cfg = cfg
        self.series: dict[int, deque] = defaultdict(deque)
        self.flagged: set[int] = set()

    def observe(self, t: float, node: str, rss: dict[int, int]) -> list[AnomalyEvent]:
        ev = []
        for rank, b in rss.items():
            s = self.series[rank]
            s.append((t, b / 2**20))
            while s and t - s[0][0] > self.cfg.leak_window_s:
                s.popleft()
            if len(s) < 10 or t - s[0][0] < self.cfg.leak_window_s / 2:
                continue
            slope, r2 = _fit(s)
            per_min = slope * 60
            if per_min > self.cfg.leak_mb_per_min and r2 >= 0.9:
                if rank not in self.flagged:
                    self.flagged.add(rank)
                    ev.append(
                        AnomalyEvent(
                            t,
                            "rss_leak",
                            "warning",
                            WARN,
                            node=node,
                            rank=rank,
                            evidence={
                                "mb_per_min": round(per_min, 1),
                                "r2": round(r2, 3),
                                "rss_mb": round(s[-1][1], 1),
                            },
                        )
                    )
            else:
                self.flagged.discard(rank)
        return ev


def _fit(points) -> tuple[float, float]:
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    sxy = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True))
    syy = sum((y - my) ** 2 for y in ys)
    if sxx == 0 or syy == 0:
        return 0.0, 0.0
    slope = sxy / sxx
    return slope, (sxy * sxy) / (sxx * syy)
