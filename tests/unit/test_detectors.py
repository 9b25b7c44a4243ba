"""Each detector on synthetic series: fires within its window, silent on long healthy noise."""

import math
import random

import pytest

from resilient.anomaly.collectors import GpuCollector
from resilient.anomaly.detectors import (
    HardwareDetector,
    HostDetector,
    NumericsDetector,
    StragglerDetector,
)
from resilient.anomaly.simulated import SimulatedNvml
from resilient.config import AnomalyConfig

pytestmark = pytest.mark.timeout(60)
CFG = AnomalyConfig()


def healthy_steps(n, world=2, seed=0, base=0.05, noise=0.08):
    r = random.Random(seed)
    for step in range(1, n + 1):
        drift = 1 + 0.3 * math.sin(step / 500)  # job-wide slow phases must not look like stragglers
        for rank in range(world):
            yield step * 0.1, rank, step, base * drift * (1 + r.gauss(0, noise))


def test_straggler_fires_within_window_and_not_on_noise():
    det = StragglerDetector(CFG, world=4)
    assert [
        e for t, rk, s, x in healthy_steps(10_000, world=4) for e in det.observe(t, rk, s, x)
    ] == []
    det = StragglerDetector(CFG, world=2)
    events = []
    for t, rank, step, x in healthy_steps(200):
        if rank == 1 and step > 100:
            x *= 3.0
        events += det.observe(t, rank, step, x)
    assert len(events) == 1 and events[0].rank == 1 and events[0].kind == "straggler"
    # a full window of steps, and straggler_window_s of them (a step is 0.1 s here)
    assert events[0].step <= 100 + CFG.straggler_window + CFG.straggler_window_s / 0.1 + 1


def test_a_rank_that_straggles_again_after_a_restart_is_seen_again():
    det = StragglerDetector(CFG, world=2)
    events = []
    for attempt in (0, 1):  # the restart kept rank 1 on the same slow node
        for t, rank, step, x in healthy_steps(200):
            slow = rank == 1 and (step > 50 or attempt)  # slow from the restart's first step
            events += det.observe(
                t + 100 * attempt, rank, step, x * (3.0 if slow else 1.0), attempt
            )
    assert [(e.kind, e.rank) for e in events] == [("straggler", 1)] * 2


def test_job_wide_slowdown_is_not_a_straggler():
    det = StragglerDetector(CFG, world=2)
    events = []
    for t, rank, step, x in healthy_steps(300):
        events += det.observe(t, rank, step, x * (3.0 if step > 150 else 1.0))
    assert events == []


def test_nan_and_spikes():
    det = NumericsDetector(CFG)
    r = random.Random(1)
    losses = [3.0 - i * 1e-4 + r.gauss(0, 0.02) for i in range(10_000)]
    assert [e for i, x in enumerate(losses) for e in det.observe(i, i, x, 1.0)] == []
    (e,) = det.observe(0, 10_001, float("nan"), 1.0)
    assert e.kind == "nan" and e.action == "rollback"
    kinds = [ev.action for s in range(3) for ev in det.observe(0, 10_002 + s, 50.0, 1.0)]
    assert kinds == ["warn", "warn", "rollback"]  # spike_patience = 3


def test_a_rollback_far_back_is_not_a_loss_spike():
    """After the job goes back (a rollback to step 0: an SDC found at the first audit), the early
    steps' higher losses are judged against the steps before them, not against later training's;
    a real spike after the rollback is still caught."""
    det = NumericsDetector(CFG)
    r = random.Random(3)
    loss = [0.0] + [6.0 * 0.999**s + r.gauss(0, 0.005) for s in range(1, 301)]
    assert [e for s in range(1, 201) for e in det.observe(s, s, loss[s], 1.0)] == []
    again = [e for s in range(1, 301) for e in det.observe(s, s, loss[s], 1.0)]
    assert again == []  # trained again from step 1: the same losses, no spike
    kinds = [ev.action for s in range(301, 304) for ev in det.observe(0, s, 50.0, 1.0)]
    assert kinds == ["warn", "warn", "rollback"]


def test_rss_leak_and_no_false_alarm():
    det = HostDetector(CFG)
    r = random.Random(2)
    quiet = [
        e
        for i in range(10_000)
        for e in det.observe(i * 1.0, "n", {0: int((2000 + r.gauss(0, 5)) * 2**20)})
    ]
    assert quiet == []
    det = HostDetector(CFG)
    leak = [
        e for i in range(200) for e in det.observe(i * 1.0, "n", {0: int((2000 + i * 10) * 2**20)})
    ]
    assert len(leak) == 1 and leak[0].kind == "rss_leak" and leak[0].evidence["mb_per_min"] > 500


def collect(sim):
    return GpuCollector(sim)


def test_an_xid_is_attributed_by_index_not_by_handle_identity():
    sim = SimulatedNvml(3)
    col = collect(sim)
    assert col.handles[2] is not sim.nvmlDeviceGetHandleByIndex(2)  # opaque, like ctypes pointers
    sim.xid(2, 48)
    assert [(s["gpu"], s["xid"]) for s in col.sample()] == [(0, 0), (1, 0), (2, 48)]


def test_an_older_nvidia_ml_py_without_the_recovery_field_still_samples(monkeypatch):
    monkeypatch.delattr(SimulatedNvml, "NVML_FI_DEV_GET_GPU_RECOVERY_ACTION")
    (s,) = collect(SimulatedNvml(1)).sample()
    assert s["recovery_action"] is None and s["temp"] == 55.0 and not s["lost"]


def test_simulated_gpu_through_the_real_collector():
    sim = SimulatedNvml(2)
    col = collect(sim)
    det = HardwareDetector(CFG)
    healthy = [e for _ in range(10_000) for s in col.sample() for e in det.observe("n0", s)]
    assert healthy == []
    sim.xid(1, 79)
    ev = [e for s in col.sample() for e in det.observe("n0", s)]
    assert [(e.kind, e.action, e.evidence["xid"], e.evidence["gpu"]) for e in ev] == [
        ("gpu_xid", "cordon", 79, 1)
    ]
    sim.set(0, ecc_volatile=3, ecc_aggregate=3)
    assert [e.kind for s in col.sample() for e in det.observe("n0", s)] == ["gpu_ecc"]
    sim.set(0, remap_pending=True)
    assert [e.kind for s in col.sample() for e in det.observe("n0", s)] == ["gpu_remap"]
    sim.set(1, temp=96.0, throttle=0x40)
    assert [e.kind for s in col.sample() for e in det.observe("n0", s)] == ["thermal"]
    sim.set(0, recovery_action=2)
    assert [e.kind for s in col.sample() for e in det.observe("n0", s)] == ["gpu_recovery"]
    sim.lose(1)
    samples = col.sample()
    assert samples[1]["lost"] and [e.kind for s in samples for e in det.observe("n0", s)] == [
        "gpu_lost"
    ]


def test_xid_classes():
    det = HardwareDetector(CFG)
    actions = {}
    for xid in (13, 48, 79, 999):
        (e,) = det.observe("n", {"gpu": 0, "t": 0, "xid": xid})
        actions[xid] = e.action
    assert actions == {13: "restart", 48: "cordon", 79: "cordon", 999: "warn"}
