"""PCIe replay and retired-page rules, through the simulated NVML device and the real collector:
each fires once on a rising counter and never on a flat one."""

import pytest

from resilient.anomaly.collectors import GpuCollector
from resilient.anomaly.detectors import HardwareDetector
from resilient.anomaly.simulated import SimulatedNvml
from resilient.config import AnomalyConfig, SupervisorConfig
from resilient.supervisor.faults import Action, History
from resilient.supervisor.policy import decide, judge

pytestmark = pytest.mark.timeout(60)
CFG = AnomalyConfig()


def run(sim, det, seconds, start=0.0, each=None):
    """Sample every second from `start` for `seconds`, stamping samples with that clock (the
    detector reads time only from samples); `each(t)` changes the GPU before a sample."""
    col = GpuCollector(sim)
    events = []
    for i in range(seconds):
        t = start + i
        if each:
            each(t)
        for s in col.sample():
            s["t"] = t
            events += det.observe("n0", s)
    return events


def test_simulated_counters_reach_the_sample():
    sim = SimulatedNvml(2)
    sim.set(1, pcie_replay=7, retired_sbe=2, retired_dbe=1, retired_pending=1)
    a, b = GpuCollector(sim).sample()
    assert (a["pcie_replay"], a["retired_pages_sbe"], a["retired_pages_dbe"]) == (0, 0, 0)
    assert (b["pcie_replay"], b["retired_pages_sbe"], b["retired_pages_dbe"]) == (7, 2, 1)
    assert b["retired_pending"] == 1
    sim.set(0, retired_sbe=None, retired_dbe=None)  # no page retirement (it remaps rows)
    a, _ = GpuCollector(sim).sample()
    assert a["retired_pages_sbe"] is None and a["retired_pages_dbe"] is None


def test_pcie_replay_flat_or_slow_counter_is_quiet():
    sim, det = SimulatedNvml(1), HardwareDetector(CFG)
    sim.set(0, pcie_replay=123_456)  # a high count from before the job: not a rate
    assert run(sim, det, 3_000) == []
    slow = CFG.pcie_replay_per_min / 2 / 60  # half the limit, per second
    assert run(sim, det, 3_000, 3_000, lambda t: sim.set(0, pcie_replay=int(t * slow))) == []


def test_pcie_replay_fires_once_per_episode():
    sim, det = SimulatedNvml(2), HardwareDetector(CFG)
    fast = CFG.pcie_replay_per_min * 3 / 60  # three times the limit, per second
    ev = run(sim, det, 1_800, each=lambda t: sim.set(1, pcie_replay=int(t * fast)))
    assert [(e.kind, e.severity, e.action, e.evidence["gpu"]) for e in ev] == [
        ("pcie_replay", "warning", "warn", 1)
    ]
    # held to a whole window's budget until a window has passed: no early alarm on a rate guess
    assert ev[0].t >= CFG.pcie_replay_window_s / 3
    assert ev[0].evidence["replays"] > CFG.pcie_replay_per_min * CFG.pcie_replay_window_s / 60
    judged = judge(ev[0], ["n0"], {}, 10, 0.0)
    assert judged.decision == "warn" and judged.fault is None  # training goes on
    # flat for a whole window ends the episode; rising again is a new one
    ev = run(sim, det, 600, 1_800)
    assert ev == []
    base = sim.gpus[1]["pcie_replay"]
    ev = run(
        sim, det, 1_800, 2_400, lambda t: sim.set(1, pcie_replay=base + int((t - 2_400) * fast))
    )
    assert [e.kind for e in ev] == ["pcie_replay"]


def test_pcie_replay_burst_and_counter_restart():
    sim, det = SimulatedNvml(1), HardwareDetector(CFG)
    budget = int(CFG.pcie_replay_per_min * CFG.pcie_replay_window_s / 60)
    run(sim, det, 10)
    sim.set(0, pcie_replay=budget + 1)  # more than a whole window allows, in one second
    assert [e.kind for e in run(sim, det, 1, 10)] == ["pcie_replay"]
    det = HardwareDetector(CFG)
    sim.set(0, pcie_replay=1_000_000)
    run(sim, det, 10, 100)
    sim.set(0, pcie_replay=0)  # a driver reload restarts the counter: not a negative rate, no alarm
    assert run(sim, det, 600, 110) == []


def test_retired_pages_flat_counts_are_quiet():
    sim, det = SimulatedNvml(2), HardwareDetector(CFG)
    sim.set(0, retired_sbe=4, retired_dbe=2)  # pages retired before the job: the baseline
    sim.set(1, retired_sbe=None, retired_dbe=None)  # a GPU without page retirement
    assert run(sim, det, 3_000) == []


def test_retired_page_increase_warns_once():
    sim, det = SimulatedNvml(1), HardwareDetector(CFG)
    run(sim, det, 5)
    sim.set(0, retired_sbe=1)
    ev = run(sim, det, 100, 5)
    assert [(e.kind, e.severity, e.action) for e in ev] == [
        ("gpu_retired_pages", "warning", "warn")
    ]
    assert ev[0].evidence["rose"] == ["retired_pages_sbe"] and not ev[0].evidence["pending"]
    sim.set(0, retired_dbe=1)
    ev = run(sim, det, 100, 105)
    assert [e.kind for e in ev] == ["gpu_retired_pages"]
    assert ev[0].evidence["rose"] == ["retired_pages_dbe"]


def test_pending_retirement_cordons_like_an_unhealthy_gpu():
    sim, det = SimulatedNvml(2), HardwareDetector(CFG)
    run(sim, det, 5)
    sim.set(1, retired_dbe=1, retired_pending=1)  # a double-bit error: retired at the next reset
    ev = run(sim, det, 100, 5)
    assert [(e.kind, e.severity, e.action, e.evidence["gpu"]) for e in ev] == [
        ("gpu_retired_pages", "critical", "cordon", 1)
    ]
    assert ev[0].evidence["pending"] and ev[0].evidence["retired_pages_dbe"] == 1
    # the supervisor acts on it as on a pending row remap: cordon the node, restart without it
    verdict = judge(ev[0], ["n0", "n1"], {}, 10, 0.0)
    assert verdict.decision == "cordon" and verdict.fault.node == "n0"
    assert decide(verdict.fault, History(0), SupervisorConfig()).action == Action.CORDON
    assert judge(ev[0], ["n1"], {}, 10, 0.0).decision == "cordon_only"  # no rank there
    # after a reset the flag clears; pending again is a new event
    sim.set(1, retired_pending=0)
    assert run(sim, det, 10, 105) == []
    sim.set(1, retired_dbe=2, retired_pending=1)
    assert [e.action for e in run(sim, det, 10, 115)] == ["cordon"]
