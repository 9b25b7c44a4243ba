"""The Supervisor and its Watch driven through whole jobs on a scripted worker group: no Ray, no
processes, a fake clock (an hour of hang timeouts passes in milliseconds)."""

import json
import time

import pytest

from resilient.agents.scripted import Scenario
from tests.helpers import read_journal
from tests.unit.fakes import FakeNodes, Job

pytestmark = pytest.mark.timeout(60)


def transitions(job: Job) -> list[str]:
    return [r["to"] for r in job.of("transition")]


def test_clean_job_succeeds(tmp_path):
    job = Job(tmp_path)
    s = job.run()
    assert (s["state"], s["step"], s["restarts"], s["faults"]) == ("SUCCEEDED", 30, 0, [])
    assert transitions(job) == ["PREFLIGHT", "STARTING", "RUNNING", "SUCCEEDED"]
    assert job.of("final") and job.of("progress")[-1]["step"] == 30


def test_crash_restarts_from_the_survivors_snapshot(tmp_path):
    job = Job(tmp_path, Scenario(crash={12: 1}))
    s = job.run()
    assert s["state"] == "SUCCEEDED" and s["restarts"] == 1 and s["step"] == 30
    (f,) = s["faults"]
    assert (f["kind"], f["rank"], f["step"]) == ("crash", 1, 12)
    assert f["recovered_at"] and f["steps_replayed"] == 0
    assert s["restores"][-1]["step"] == 11
    assert transitions(job)[3:7] == ["DIAGNOSING", "RESTARTING", "STARTING", "RUNNING"]
    assert [d["action"] for d in job.of("decision")] == ["restart"]


def test_a_fault_during_a_recovery_leaves_neither_unrecovered(tmp_path):
    # rank 1 dies at step 12; the restart from 11 meets rank 0's error at step 12 before any step
    job = Job(tmp_path, Scenario(crash={12: 1}, error={12: 0}))
    s = job.run()
    assert s["state"] == "SUCCEEDED" and s["restarts"] == 2
    assert [f["kind"] for f in s["faults"]] == ["crash", "error"]
    assert all(f["recovered_at"] for f in s["faults"]), s["faults"]
    assert len(job.of("recovered")) == 2


def test_silent_rank_is_a_hang_after_hang_timeout(tmp_path):
    job = Job(tmp_path, Scenario(hang={9: 1}))
    s = job.run()
    (f,) = s["faults"]
    assert (f["kind"], f["rank"], s["state"]) == ("hang", 1, "SUCCEEDED")
    hung_at = job.scenario.struck[("hang", 9)]  # on the fake clock; it answered a beat before
    # hang_timeout after its last answer (within a heartbeat before hung_at), + a tick
    assert 2.0 - 0.2 < f["detected_at"] - hung_at <= 2.0 + 0.1 + 0.1
    assert len(job.scenario.starts) == 2 and job.groups[-1].step == 30


def test_training_error_after_the_grace(tmp_path):
    job = Job(tmp_path, Scenario(error={5: 0}))
    s = job.run()
    (f,) = s["faults"]
    assert (f["kind"], f["rank"], s["state"], s["restarts"]) == ("error", 0, "SUCCEEDED", 1)


def test_nan_rolls_back_before_it_and_skips_its_batch(tmp_path):
    job = Job(tmp_path, Scenario(nan={12: 0}, every=5))
    s = job.run()
    assert s["state"] == "SUCCEEDED" and s["step"] == 30
    (rb,) = s["rollbacks"]
    assert (rb["from_step"], rb["to_step"], rb["skipped_batches"]) == (12, 10, [12])
    assert transitions(job)[3:5] == ["DIAGNOSING", "ROLLING_BACK"]
    trained = dict(job.scenario.data)
    assert trained[12] == 13 and 12 not in trained.values() and trained[30] == 31


def test_fatal_xid_cordons_its_node_and_restarts_without_it(tmp_path):
    job = Job(tmp_path, Scenario(xid={8: ("node1", 79)}))
    s = job.run()
    assert s["state"] == "SUCCEEDED" and s["restarts"] == 1 and s["events"] == {"gpu_xid": 1}
    assert [c["node"] for c in s["cordoned_nodes"]] == ["node1"]
    assert job.groups[0].placement == ["node0", "node1"] and job.groups[1].placement == [
        "node0",
        "node2",
    ]
    assert job.of("anomaly")[0]["decision"] == "cordon"


def test_xid_on_a_node_without_ranks_cordons_without_a_restart(tmp_path):
    job = Job(tmp_path, Scenario(xid={8: ("node2", 79)}))
    s = job.run()
    assert s["state"] == "SUCCEEDED" and s["restarts"] == 0
    assert [c["node"] for c in s["cordoned_nodes"]] == ["node2"]
    assert job.of("anomaly")[0]["decision"] == "cordon_only"


@pytest.mark.parametrize(
    "crashed, acted_on",
    [
        # the XID that came with the death is not dropped for it: its node is why
        (1, "gpu_xid"),
        # the restart for a death elsewhere would put a rank back on the failed GPU (its XID is
        # not raised again until the GPU is used): that node is cordoned with the same restart
        (0, "crash"),
    ],
)
def test_a_crash_and_an_xid_in_one_poll_cordon_the_xids_node_in_one_restart(
    tmp_path, crashed, acted_on
):
    """A death and node1's XID in one poll: one restart, node1 cordoned, no rank placed on it."""
    job = Job(tmp_path, Scenario(xid={8: ("node1", 79)}, crash={8: crashed}))
    s = job.run()
    assert s["state"] == "SUCCEEDED" and s["restarts"] == 1
    assert [c["node"] for c in s["cordoned_nodes"]] == ["node1"]
    assert [f["kind"] for f in job.of("fault")] == [acted_on]
    assert "node1" not in {r["node"] for r in job.of("ranks")[-1]["ranks"]}


def test_stop_persists_its_step_and_ends_stopped(tmp_path):
    job = Job(tmp_path, steps=1000)
    job.stop_when = lambda: job.groups and job.groups[-1].step >= 10
    s = job.run()
    assert s["state"] == "STOPPED" and 10 < s["step"] < 1000
    assert s["last_checkpoint"] == s["step"]
    assert transitions(job)[-2:] == ["STOPPING", "STOPPED"]


def test_stop_during_the_final_persist_ends_stopped(tmp_path):
    job = Job(tmp_path, Scenario(persist_s=2.0))
    job.stop_when = lambda: job.groups and job.groups[-1].phase[0] == "persisting"
    s = job.run()
    assert s["state"] == "STOPPED" and s["step"] == 30
    assert transitions(job)[-3:] == ["RUNNING", "STOPPING", "STOPPED"]
    assert job.of("final")  # the adapter the last step exported is there too


def test_a_stop_before_the_job_started_ends_it_without_a_start(tmp_path):
    job = Job(tmp_path, stop_when=lambda: True)
    s = job.run()
    assert s["state"] == "STOPPED" and s["step"] == 0 and not job.groups
    assert transitions(job) == ["STOPPING", "STOPPED"]
    assert "resilient stop before the job started" in s["reason"]


def test_a_signal_ends_the_launch_at_once_only_until_a_step_is_trained(tmp_path):
    seen = []  # (the group's step, whether a signal would end the launch at once)
    job = Job(tmp_path, steps=1000)

    def stop_when():
        seen.append((job.groups[-1].step if job.groups else None, job.control.at_once()))
        return job.groups and job.groups[-1].step >= 10

    job.stop_when = stop_when
    assert job.run()["state"] == "STOPPED"
    assert seen[0] == (None, True)  # before the preflight
    first_false = next(i for i, (_, at_once) in enumerate(seen) if not at_once)
    assert all(not at_once for _, at_once in seen[first_false:])
    assert seen[first_false][0] >= 1 and seen[-1][1] is False


def test_an_error_after_a_stop_was_asked_for_ends_stopped(tmp_path, monkeypatch):
    """The same signal can end a Ray cluster the user started beside the launch: the start it
    breaks fails with Ray's error, which is the stop's doing, not a bug."""
    from resilient.agents.scripted import ScriptedGroup

    def broken(self, *a):
        raise RuntimeError("RPC error: recvmsg:Connection reset by peer")

    monkeypatch.setattr(ScriptedGroup, "start", broken)
    calls = []
    job = Job(tmp_path, stop_when=lambda: calls.append(1) or len(calls) > 1, stop_by_signal=True)
    s = job.run()
    assert s["state"] == "STOPPED" and "stopping met RuntimeError: RPC error" in s["reason"]
    assert transitions(job)[-2:] == ["STOPPING", "STOPPED"]
    # without a signal (none, or a `resilient stop`, which breaks nothing) it is a bug: FAILED
    for name, when in (("none", None), ("stop", lambda: calls.append(1) or len(calls) > 3)):
        (tmp_path / name).mkdir()
        with pytest.raises(RuntimeError):
            Job(tmp_path / name, stop_when=when).run()
        last = [r for r in read_journal(tmp_path / name / "runs" / "unit" / "r") if "to" in r][-1]
        assert last["to"] == "FAILED" and last["cause"].startswith("internal error: RuntimeError")


def test_a_fault_while_stopping_goes_through_the_policy(tmp_path):
    job = Job(tmp_path, Scenario(crash={11: 1}), steps=1000)
    job.stop_when = lambda: job.groups and job.groups[-1].step >= 10
    s = job.run()
    assert s["state"] == "FAILED" and "while stopping" in s["reason"]
    (d,) = job.of("decision")
    assert d["action"] == "give_up" and job.of("fault")[0]["kind"] == "crash"
    assert transitions(job)[-2:] == ["STOPPING", "FAILED"]


def test_a_fault_while_stopping_on_a_signal_ends_stopped(tmp_path):
    """The signal's own doing (it can end a Ray cluster the user started, the ranks with it):
    STOPPED, naming the signal and the fault, resumable from the newest persisted step."""
    job = Job(tmp_path, Scenario(crash={11: 1}), steps=1000, stop_by_signal=True)
    job.stop_when = lambda: job.groups and job.groups[-1].step >= 10
    s = job.run()
    assert s["state"] == "STOPPED" and "SIGTERM" in s["reason"] and "crash of rank 1" in s["reason"]
    assert "--resume" in s["reason"]
    (d,) = job.of("decision")
    assert d["action"] == "stop" and job.of("fault")[0]["kind"] == "crash"
    assert transitions(job)[-2:] == ["STOPPING", "STOPPED"]


def test_spent_budget_gives_up_with_a_reason(tmp_path):
    job = Job(tmp_path, Scenario(crash={3: 0}), spec={"supervisor": {"max_restarts": 0}})
    s = job.run()
    assert s["state"] == "FAILED" and "max_restarts=0" in s["reason"]
    assert "crash of rank 0 at step 3" in s["reason"]


def test_unreadable_storage_is_waited_for_never_taken_for_no_checkpoint(tmp_path, monkeypatch):
    from resilient.supervisor import restore

    monkeypatch.setattr(restore, "RETRY_S", 0.01)
    job = Job(tmp_path, Scenario(crash={12: 1}))
    job.nodes = FakeNodes(job.scenario)
    first = lambda: len(job.scenario.starts) == 1  # noqa: E731
    job.stop_when = lambda: setattr(job.nodes, "storage_down", 3) if first() else None
    s = job.run()
    assert s["state"] == "SUCCEEDED" and s["restores"][-1]["step"] == 11
    (wait,) = job.of("restore_wait")
    assert "down" in wait["error"] and wait["persisted"] == 11


def test_storage_without_the_persisted_checkpoints_is_refused(tmp_path):
    job = Job(tmp_path, Scenario(crash={12: 1}))
    job.nodes = FakeNodes(job.scenario)
    job.stop_when = lambda: setattr(job.nodes, "storage_lost", len(job.scenario.starts) == 1)
    s = job.run()
    assert s["state"] == "FAILED" and "refusing to start over" in s["reason"]
    assert len(job.scenario.starts) == 1


def test_checkpoints_known_bad_everywhere_start_over_and_say_so(tmp_path, caplog):
    job = Job(tmp_path, Scenario(crash={12: 1}))
    job.nodes = FakeNodes(job.scenario)
    job.stop_when = lambda: setattr(job.nodes, "damaged", len(job.scenario.starts) == 1)
    s = job.run()
    assert s["state"] == "SUCCEEDED" and len(job.scenario.starts) == 2
    (restore,) = job.of("restore")
    assert restore["step"] == 0 and restore["tier"] == "none" and restore["lost_steps"] == 11
    assert "checksum" in " ".join(restore["skipped"])
    assert "fails verification" in caplog.text


class CutOff:
    """Node health that finds rank `rank`'s node cut off once the job passes `after` steps."""

    def __init__(self, after: int, rank: int):
        self.after, self.rank, self.node = after, rank, None

    def check(self, group, now, step):
        from resilient.supervisor.faults import Fault, FaultKind

        if self.node is None and step > self.after:
            self.node = group.node_of(self.rank)
            return Fault(FaultKind.PARTITION, self.rank, step, now, "cut off", node=self.node)
        return None

    def explain(self, fault, group):
        return fault


def test_a_partitioned_node_is_cordoned_lost_and_its_rank_alone_replaced(tmp_path):
    job = Job(tmp_path, health=CutOff(after=12, rank=1))
    s = job.run()
    assert s["state"] == "SUCCEEDED" and s["step"] == 30 and s["restarts"] == 1
    (f,) = s["faults"]
    assert (f["kind"], f["rank"], f["node"]) == ("partition", 1, job.health.node)
    assert f["recovered_at"] and f["steps_replayed"] == 0
    assert [c["node"] for c in s["cordoned_nodes"]] == [job.health.node]
    assert job.of("nodes_lost")[0]["nodes"] == [job.health.node]
    assert job.health.node in job.nodes.lost()  # never placed on again
    (survivors,) = job.of("survivors")
    assert survivors["kept"] == [0] and survivors["replaced"] == [1]
    (decision,) = job.of("decision")
    assert decision["keep_survivors"] and decision["exclude_nodes"] == [job.health.node]
    assert job.of("nodes_lost")[0]["generation"] == 1  # a new writers' generation, fenced:
    fence = tmp_path / "runs" / "unit" / "r" / "fence.json"
    await_fence = [fence.exists() or time.sleep(0.05) for _ in range(100)]
    assert any(await_fence) and json.loads(fence.read_text())["generation"] == 1


def test_a_scripted_straggler_is_detected_and_replaced_alone(tmp_path):
    """The scripted group's `slow` fault: the rank computes 4x slower and its peers wait; the
    straggler detector names it and the policy replaces it (its peers keep their processes)."""
    job = Job(
        tmp_path,
        Scenario(slow={20: 1}),
        steps=200,
        spec={"cluster": {"num_workers": 3}, "anomaly": {"straggler_window_s": 1.0}},
    )
    job.nodes = FakeNodes(job.scenario, n=3)
    s = job.run()
    assert s["state"] == "SUCCEEDED" and s["step"] == 200
    (f,) = s["faults"]
    assert (f["kind"], f["rank"]) == ("straggler", 1), f
    assert f["detected_at"] - job.scenario.struck[("slow", 20)] < 15.0
    assert [d["action"] for d in job.of("decision")] == ["restart"]
    assert set(job.groups[-1].pids) == {0, 1, 2} and job.groups[-1].pids[0] == 1000


def test_a_scripted_node_loss_is_one_fault_for_the_node(tmp_path):
    """Every rank on the lost node dies; the probe finds its raylet gone: one `node_loss` fault,
    the node cordoned and left out of the next placement."""
    from resilient.supervisor.health import NodeHealth

    sc = Scenario(node_loss={15: "node1"}, standby=["node2"])
    job = Job(tmp_path, sc, steps=40, spec={"cluster": {"num_workers": 2}})
    job.nodes = FakeNodes(sc, n=3)
    job.health = NodeHealth(job.nodes, prober=job.nodes.probe)
    s = job.run()
    assert s["state"] == "SUCCEEDED" and s["step"] == 40
    (f,) = s["faults"]
    assert (f["kind"], f["node"]) == ("node_loss", "node1"), f
    assert job.groups[-1].placement == ["node0", "node2"] and "node1" in job.nodes.gone
