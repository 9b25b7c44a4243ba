"""The Watch alone, over a scripted group on a fake clock: what it reports, and when."""

import pytest

from resilient.agents.scripted import FakeClock, Scenario, ScriptedGroup
from resilient.config import SupervisorConfig
from resilient.supervisor.faults import FaultKind
from resilient.supervisor.watch import AWAY_S, ERROR_GRACE, TICK, Watch

pytestmark = pytest.mark.timeout(30)
CFG = SupervisorConfig(heartbeat_interval=0.1, hang_timeout=5.0)


def watch(scenario: Scenario, total: int = 1000):
    clock = FakeClock()
    scenario.heartbeat_s = CFG.heartbeat_interval
    group = ScriptedGroup(scenario, ["n0", "n1"], total, clock)
    group.start(None, (), [])
    return Watch(group, 0, 2, CFG, clock), group, clock


def until(w: Watch, pred, limit: int = 10_000):
    for _ in range(limit):
        seen = w.poll()
        if pred(seen):
            return seen
    raise AssertionError("never seen")


def test_ready_then_progress_then_done():
    w, group, _ = watch(Scenario(), total=20)
    ready = until(w, lambda s: s.ready)
    assert ready.ready.ready_at >= group.training_at and ready.fault is None
    steps = []
    end = until(w, lambda s: steps.append(s.step) or s.ended)
    assert end.ended == "done" and end.step == 20 and end.median_step_s == pytest.approx(0.2)
    seen = [s for s in steps if s is not None]
    assert seen == sorted(seen) and seen[-1] == 20


def test_a_sigstopped_rank_is_a_hang_within_timeout_and_one_heartbeat():
    w, group, clock = watch(Scenario(hang={30: 1}))
    until(w, lambda s: s.step and s.step >= 29)
    last = group.last_answer[1]
    seen = until(w, lambda s: s.fault)
    f = seen.fault
    assert (f.kind, f.rank) == (FaultKind.HANG, 1) and "answered no heartbeat" in f.evidence
    assert CFG.hang_timeout - CFG.heartbeat_interval <= clock() - last <= CFG.hang_timeout + 0.2


def test_no_step_for_hang_timeout_is_a_hang_of_the_group():
    scenario = Scenario(stall={6: 0})  # every rank answers, none finishes a step (a deadlock)
    w, _, clock = watch(scenario)
    f = until(w, lambda s: s.fault).fault
    assert (f.kind, f.rank) == (FaultKind.HANG, None) and "no rank finished a step" in f.evidence
    stalled_at = scenario.struck[("stall", 6)]
    assert CFG.hang_timeout - 0.2 < clock() - stalled_at <= CFG.hang_timeout + 0.3


def test_a_death_is_seen_in_one_poll_and_an_error_after_the_grace():
    w, _, _ = watch(Scenario(crash={4: 0}))
    f = until(w, lambda s: s.fault).fault
    assert (f.kind, f.rank, f.step) == (FaultKind.CRASH, 0, 4)
    w, _, clock = watch(Scenario(error={4: 1}))
    until(w, lambda s: any(h.phase == "error" for h in s.latest.values()))
    t0 = clock()
    f = until(w, lambda s: s.fault).fault
    assert (f.kind, f.rank) == (FaultKind.ERROR, 1) and clock() - t0 > ERROR_GRACE - 0.2


def test_a_group_stuck_before_training_ends_at_start_timeout():
    cfg = SupervisorConfig(heartbeat_interval=0.1, hang_timeout=5.0, start_timeout=20.0)
    clock = FakeClock()
    scenario = Scenario(start_s=1e9, heartbeat_s=0.1)  # answers, never gets to training
    group = ScriptedGroup(scenario, ["n0", "n1"], 100, clock)
    group.start(None, (), [])
    w = Watch(group, 0, 2, cfg, clock)
    f = until(w, lambda s: s.fault).fault
    assert f.kind == FaultKind.START_TIMEOUT and "start_timeout=20s" in f.evidence
    assert cfg.start_timeout < clock() - w.started <= cfg.start_timeout + 0.3


class _Failing:
    """Two ranks that both failed before training, with `errors[rank]`."""

    def __init__(self, errors: dict[int, str], clock):
        from resilient.agents.heartbeat import Heartbeat

        self.latest = {
            r: Heartbeat(rank=r, pid=r, phase="error", now=clock(), error=e, error_at=clock())
            for r, e in errors.items()
        }
        self.dead, self.pending = {}, {}
        self.last_answer = {r: clock() for r in errors}

    def poll(self, wait_s):
        return []

    def node_of(self, rank):
        return "n0"


@pytest.mark.parametrize(
    ("errors", "everywhere"),
    [
        ({0: "NoCredentialsError: no keys\ntb", 1: "NoCredentialsError: no keys\ntb2"}, True),
        ({0: "NoCredentialsError: no keys\ntb", 1: "RuntimeError: other\ntb"}, False),
    ],
)
def test_the_same_error_on_every_rank_before_training_is_marked(errors, everywhere):
    from resilient.supervisor import policy
    from resilient.supervisor.faults import Action, History

    clock = FakeClock()
    w = Watch(_Failing(errors, clock), 0, 2, CFG, clock)
    w.poll()  # the grace starts
    for _ in range(int((ERROR_GRACE + 0.5) / TICK)):  # a tick per poll, as a group's poll takes
        clock.advance(TICK)
        f = w.poll().fault
    assert f.kind == FaultKind.ERROR and f.everywhere is everywhere
    d = policy.decide(f, History(), CFG)
    if everywhere:
        assert d.action == Action.GIVE_UP and "NoCredentialsError: no keys" in d.reason
    else:
        assert d.action == Action.RESTART
    outage = f.__class__(**{**f.__dict__, "evidence": "ConnectionError: Connection refused"})
    assert policy.decide(outage, History(), CFG).action == Action.RESTART  # an outage passes


@pytest.mark.parametrize("busy", ["evaluating", "verifying"])
def test_a_long_evaluation_is_progress_not_a_hang(busy):
    """Ranks evaluating (or recomputing steps to find an odd replica) for longer than
    hang_timeout are not stuck, and the next step gets a whole hang_timeout after that ends."""
    from resilient.agents.heartbeat import Heartbeat

    w, _, clock = watch(Scenario())
    until(w, lambda s: s.ready)
    beats = {
        r: lambda phase, r=r: Heartbeat(rank=r, pid=r, phase=phase, now=clock()) for r in (0, 1)
    }
    t0 = clock()
    evaluating = {r: beats[r](busy) for r in beats}
    assert w._stalled(t0 + 3 * CFG.hang_timeout, evaluating) is None
    training = {r: beats[r]("training") for r in beats}
    assert w._stalled(t0 + 3 * CFG.hang_timeout + CFG.hang_timeout / 2, training) is None
    f = w._stalled(t0 + 4 * CFG.hang_timeout + 0.1, training)
    assert f is not None and f.kind == FaultKind.HANG


def away(group, clock, seconds: float) -> None:
    """The supervisor's process stops for `seconds` during the next poll (Ctrl-Z, a VM paused):
    the ranks go on, and their answers wait unread until a later poll."""
    real = group.poll

    def stopped(wait_s):
        group.poll = real
        clock.advance(seconds + wait_s)
        return []

    group.poll = stopped


def test_a_supervisor_away_past_the_hang_timeout_blames_no_rank():
    """Back from a stop longer than hang_timeout, the supervisor counts none of it: the ranks
    trained meanwhile, and no limit ran out while it watched."""
    w, group, clock = watch(Scenario())
    until(w, lambda s: s.step and s.step >= 20)
    away(group, clock, CFG.hang_timeout + 2.0)
    seen = [w.poll() for _ in range(100)]
    assert not [s.fault for s in seen if s.fault]
    assert max(s.step or 0 for s in seen) > 20 + CFG.hang_timeout / 0.2


def test_a_rank_that_hangs_while_the_supervisor_is_away_is_found_in_time_watched():
    """A rank stopped during the supervisor's absence is found no later than one limit after
    the supervisor is back."""
    w, group, clock = watch(Scenario(hang={30: 1}))
    until(w, lambda s: s.step and s.step >= 28)
    away(group, clock, CFG.hang_timeout + 2.0)
    assert w.poll().fault is None
    back = clock()
    f = until(w, lambda s: s.fault).fault
    assert (f.kind, f.rank) == (FaultKind.HANG, 1)
    assert clock() - back <= CFG.hang_timeout + 0.3  # no more than the limit, watched


def test_a_short_pause_of_the_supervisor_counts():
    """Up to AWAY_S beyond a tick is the supervisor's own work (a journal write, a GC pause): a
    rank silent through it is as silent as ever."""
    w, group, clock = watch(Scenario(hang={30: 1}))
    until(w, lambda s: s.step and s.step >= 29)
    last = group.last_answer[1]
    away(group, clock, AWAY_S - 0.1)
    f = until(w, lambda s: s.fault).fault
    assert (f.kind, f.rank) == (FaultKind.HANG, 1)
    assert clock() - last <= CFG.hang_timeout + 0.2


def test_a_rank_that_hangs_before_its_first_answer_in_training_is_found_at_the_learnt_limit():
    """Steps of 10 ms and heartbeats every second: rank 1 answered once, still starting, and was
    SIGSTOPped at step 40, before its next answer. Rank 0 finished steps, which every rank's
    collective is part of, so the group is training: the learnt limit applies (about two
    intervals), not the start's (the old code waited for rank 1 to say it trained, and took 10 s;
    its evidence said "phase created")."""
    cfg = SupervisorConfig(heartbeat_interval=1.0, hang_timeout="auto")
    clock = FakeClock()
    scenario = Scenario(step_s=0.01, start_s=0.2, heartbeat_s=1.0, hang={40: 1})
    group = ScriptedGroup(scenario, ["n0", "n1"], 100000, clock)
    group.start(None, (), [])
    w = Watch(group, 0, 2, cfg, clock)
    seen = until(w, lambda s: s.fault)
    f = seen.fault
    assert (f.kind, f.rank) == (FaultKind.HANG, 1), f
    assert clock() - scenario.struck[("hang", 40)] < 3.0, f.evidence
