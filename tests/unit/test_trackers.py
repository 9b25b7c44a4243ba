"""Experiment trackers, each read back from what it wrote: TensorBoard's event files, MLflow's
sqlite store, W&B's offline run file. Steps logged once each across restarts and resumes, events
present, a failing tracker a warning while the others go on, the caller never blocked."""

import logging
import struct
import subprocess
import sys
import threading
import time

import pytest

from resilient.anomaly import tracker_sinks
from resilient.anomaly import trackers as trackers_mod
from resilient.anomaly.trackers import Trackers, from_spec
from resilient.config import validate_tree


def _spec(logging_section: dict):
    return validate_tree({"name": "t", "data": {"path": "/tmp/x.txt"}, "logging": logging_section})


def _trackers(tmp_path, run_id="r1", **kw) -> Trackers:
    return Trackers(_spec(kw.pop("logging")).logging, "t", run_id, **kw)


def _log_job(t: Trackers, steps, eval_steps=(), replay=()) -> None:
    for s in steps:
        t.train(s, {"loss": 10.0 / s, "lr": 1e-4, "grad_norm": 1.5, "tokens_per_s": 900.0})
    for s in replay:  # a restart replays steps (bit exact): they must not show twice
        t.train(s, {"loss": 10.0 / s, "lr": 1e-4, "grad_norm": 1.5, "tokens_per_s": 900.0})
    for s in eval_steps:
        t.eval(s, {"loss": 5.0 / s, "perplexity": 2.0, "accuracy": 0.5})
        t.eval(s, {"loss": 5.0 / s, "perplexity": 2.0, "accuracy": 0.5})


def _tb(folder):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    return acc


def _tb_steps(acc, tag) -> list[int]:
    return [e.step for e in acc.Scalars(tag)]


@pytest.mark.timeout(60)
def test_tensorboard_curves_once_per_step_and_events(tmp_path):
    cfg = {"tensorboard": str(tmp_path / "tb")}
    t = _trackers(tmp_path, logging=cfg)
    _log_job(t, range(1, 6), eval_steps=[3, 5], replay=[3, 4, 5])
    t.event(4, "restart", "worker group restarted (crash on rank 1)")
    t.close()
    t.close()  # idempotent
    acc = _tb(tmp_path / "tb" / "t" / "r1")
    for k in ("loss", "lr", "grad_norm", "tokens_per_s"):
        assert _tb_steps(acc, f"train/{k}") == [1, 2, 3, 4, 5]
    assert [e.value for e in acc.Scalars("train/loss")][1] == pytest.approx(5.0)
    for k in ("loss", "perplexity", "accuracy"):
        assert _tb_steps(acc, f"eval/{k}") == [3, 5]
    (text,) = acc.Tensors("events/restart/text_summary")
    assert text.step == 4
    assert b"crash on rank 1" in text.tensor_proto.string_val[0]

    # a resumed job: a new writer in the same folder, the steps it already logged left out
    t = _trackers(tmp_path, logging=cfg, last_step=5, last_eval_step=5)
    _log_job(t, range(4, 9), eval_steps=[5, 8])
    t.close()
    acc = _tb(tmp_path / "tb" / "t" / "r1")
    assert _tb_steps(acc, "train/loss") == list(range(1, 9))
    assert _tb_steps(acc, "eval/perplexity") == [3, 5, 8]


def _mlflow_client(db):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=f"sqlite:///{db}")


@pytest.mark.timeout(180)
def test_mlflow_one_run_per_job_continued_on_resume(tmp_path, capfd):
    db = tmp_path / "mlflow.db"
    cfg = {"mlflow": f"sqlite:///{db}"}
    t = _trackers(tmp_path, logging=cfg)
    ids = t.wait_open(120)
    assert ids["mlflow_run_id"]
    _log_job(t, range(1, 4), eval_steps=[3], replay=[2, 3])
    t.event(3, "fault", "rank 1 crashed")
    t.close()

    t2 = _trackers(tmp_path, logging=cfg, ids=ids, last_step=3, last_eval_step=3)
    assert t2.wait_open(120) == ids
    c = _mlflow_client(db)
    assert c.get_run(ids["mlflow_run_id"]).info.status == "RUNNING"  # reopened
    _log_job(t2, range(2, 7), eval_steps=[3, 6])
    t2.event(5, "resize", "world size 4 -> 2")
    t2.close()

    exp = c.get_experiment_by_name("t")
    (run,) = c.search_runs([exp.experiment_id])
    assert run.info.run_id == ids["mlflow_run_id"]
    assert run.info.status == "FINISHED"
    assert run.info.run_name == "r1"
    tags = run.data.tags
    assert (tags["name"], tags["run_id"]) == ("t", "r1")
    assert tags["event.0000.fault"] == "step 3: rank 1 crashed"
    assert tags["event.0001.resize"] == "step 5: world size 4 -> 2"
    for k in ("loss", "lr", "grad_norm", "tokens_per_s"):
        steps = [m.step for m in c.get_metric_history(run.info.run_id, f"train/{k}")]
        assert sorted(steps) == [1, 2, 3, 4, 5, 6]
    for k in ("loss", "perplexity", "accuracy"):
        steps = [m.step for m in c.get_metric_history(run.info.run_id, f"eval/{k}")]
        assert sorted(steps) == [3, 6]

    # ids lost: the run is found again by its run_id tag, not duplicated
    t3 = _trackers(tmp_path, logging=cfg, last_step=6)
    assert t3.wait_open(120)["mlflow_run_id"] == ids["mlflow_run_id"]
    t3.close()
    assert len(c.search_runs([exp.experiment_id])) == 1
    out, err = capfd.readouterr()
    assert "mlflow" not in (out + err).lower() and "alembic" not in (out + err).lower()


@pytest.mark.timeout(120)
def test_unusable_mlflow_is_one_warning_and_tensorboard_goes_on(tmp_path, caplog):
    cfg = {"tensorboard": str(tmp_path / "tb"), "mlflow": "nosuchscheme://nowhere"}
    with caplog.at_level(logging.WARNING, logger="resilient.anomaly.trackers"):
        t = _trackers(tmp_path, logging=cfg)
        _log_job(t, range(1, 4))
        t.close()
    warns = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warns) == 1 and warns[0].startswith("MLflow tracker failed to open"), warns
    assert _tb_steps(_tb(tmp_path / "tb" / "t" / "r1"), "train/loss") == [1, 2, 3]


@pytest.mark.timeout(120)
def test_tracker_failing_on_write_is_switched_off_once(tmp_path, caplog, monkeypatch):
    calls = []

    def boom(self, batch):
        calls.append(len(batch))
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(trackers_mod, "FLUSH_S", 0.05)
    monkeypatch.setattr(tracker_sinks.MLflow, "write", boom)
    cfg = {"tensorboard": str(tmp_path / "tb"), "mlflow": f"sqlite:///{tmp_path / 'm.db'}"}
    with caplog.at_level(logging.WARNING, logger="resilient.anomaly.trackers"):
        t = _trackers(tmp_path, logging=cfg)
        t.wait_open(120)
        for s in range(1, 4):
            t.train(s, {"loss": 1.0})
            time.sleep(0.2)  # several rounds of writes
        t.close()
    warns = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warns == [
        "MLflow tracker failed to write, off for the rest of the job: RuntimeError: disk on fire"
    ]
    assert len(calls) == 1
    assert _tb_steps(_tb(tmp_path / "tb" / "t" / "r1"), "train/loss") == [1, 2, 3]
    # switched off, its run was ended as FAILED
    c = _mlflow_client(tmp_path / "m.db")
    assert c.get_run(t.ids["mlflow_run_id"]).info.status == "FAILED"


@pytest.mark.timeout(60)
def test_caller_never_blocks_on_a_stalled_tracker(tmp_path, caplog, monkeypatch):
    release, writes = threading.Event(), []

    def stalled(self, batch):
        release.wait(30)
        writes.append([it.step for it in batch])

    monkeypatch.setattr(trackers_mod, "QUEUE_MAX", 50)
    monkeypatch.setattr(tracker_sinks.TensorBoard, "write", stalled)
    with caplog.at_level(logging.WARNING, logger="resilient.anomaly.trackers"):
        t = _trackers(tmp_path, logging={"tensorboard": str(tmp_path / "tb")})
        t.wait_open(30)
        t.train(1, {"loss": 1.0})
        time.sleep(1.5)  # the thread took step 1 and hangs writing it
        start = time.monotonic()
        for s in range(2, 20_002):
            t.train(s, {"loss": 1.0, "weird": None, "name": "x"})
        t.event(20_001, "early/stop", "no better eval loss in 3 evaluations")
        assert time.monotonic() - start < 5
        assert len(t._q) == 50  # bounded: memory stays flat
        release.set()
        t.close()
    full = [r for r in caplog.records if "dropping the oldest" in r.getMessage()]
    assert len(full) == 1
    assert writes[0] == [1]
    assert writes[1][-2:] == [20_001, 20_001]  # the newest kept, the event last
    assert len(writes[1]) == 50


@pytest.mark.timeout(60)
def test_missing_library_names_the_package(tmp_path, caplog, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` raises ImportError
    cfg = {"tensorboard": str(tmp_path / "tb"), "wandb": {"project": "p", "mode": "offline"}}
    with caplog.at_level(logging.WARNING, logger="resilient.anomaly.trackers"):
        t = _trackers(tmp_path, logging=cfg)
        _log_job(t, range(1, 3))
        t.close()
    warns = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warns) == 1 and "pip install wandb" in warns[0], warns
    assert _tb_steps(_tb(tmp_path / "tb" / "t" / "r1"), "train/loss") == [1, 2]


def _wandb_records(path):
    """The records of a W&B run file: a LevelDB-style log of protobuf `Record`s."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, pos, buf, out, block = path.read_bytes(), 7, b"", [], 32768
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _, n, kind = struct.unpack("<IHB", data[pos : pos + 7])
        buf, pos = buf + data[pos + 7 : pos + 7 + n], pos + 7 + n
        if kind in (1, 4):  # a full record, or the last piece of one
            rec = pb.Record()
            rec.ParseFromString(buf)
            out.append(rec)
            buf = b""
    return out


def _wandb_history(run_dir) -> list[dict]:
    rows = []
    for f in sorted(run_dir.glob("wandb/offline-run-*/run-*.wandb")):
        for r in _wandb_records(f):
            if r.WhichOneof("record_type") == "history":
                rows.append({i.key or "/".join(i.nested_key): i.value_json for i in r.history.item})
    return rows


@pytest.mark.timeout(180)
def test_wandb_offline_run_resumed_with_its_id(tmp_path, caplog):
    pytest.importorskip("wandb", reason="wandb not installed (pip install wandb)")
    cfg = {"wandb": {"project": "p", "mode": "offline", "dir": str(tmp_path / "wb")}}
    with caplog.at_level(logging.WARNING, logger="resilient.anomaly.trackers"):
        t = _trackers(tmp_path, logging=cfg)
        ids = t.wait_open(120)
        _log_job(t, range(1, 4), eval_steps=[3], replay=[1, 2])
        t.event(3, "restart", "after a crash")
        t.close()
        assert not t._thread.is_alive()  # W&B's run finished within CLOSE_S
        t = _trackers(tmp_path, logging=cfg, ids=ids, last_step=3, last_eval_step=3)
        _log_job(t, range(3, 6), eval_steps=[3, 5])
        t.close()
        assert not t._thread.is_alive()
    # a W&B call that failed switched the tracker off with one warning: say which
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []

    # one offline folder per process, both holding the same run (`wandb sync` joins them)
    files = sorted((tmp_path / "wb" / "wandb").glob("offline-run-*/run-*.wandb"))
    assert [f.name for f in files] == [f"run-{ids['wandb_id']}.wandb"] * 2
    # W&B's own process writes the run file: finish() may return before its last records land
    deadline = time.monotonic() + 30
    while True:
        try:
            rows = _wandb_history(tmp_path / "wb")
        except Exception:  # a record half written
            rows = []
        if len(rows) >= 5 or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert [int(r["_step"]) for r in rows] == [1, 2, 3, 4, 5]
    assert all("train/loss" in r for r in rows)
    evals = [(int(r["_step"]), int(r["eval/step"])) for r in rows if "eval/loss" in r]
    assert evals == [(3, 3), (5, 5)]
    (ev,) = [r for r in rows if "events/restart" in r]
    assert ev["events/restart"] == '"step 3: after a crash"' and ev["events/step"] == "3"


@pytest.mark.timeout(30)
def test_from_spec_none_without_trackers(tmp_path):
    assert from_spec(_spec({}), "r1") is None
    t = from_spec(_spec({"tensorboard": str(tmp_path / "tb")}), "r1", last_step=7)
    assert isinstance(t, Trackers) and t._last["train"] == 7
    t.close()
    t.train(8, {"loss": 1.0})  # after close: ignored, never raises
    t.event(8, "x", "y")


@pytest.mark.timeout(60)
def test_import_leaves_tracker_libraries_alone():
    code = (
        "import sys, resilient.anomaly.trackers\n"
        "bad = [m for m in ('mlflow', 'wandb', 'tensorboard', 'torch.utils.tensorboard')"
        " if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=50)


@pytest.mark.timeout(90)
def test_a_resumed_driver_that_lost_count_logs_no_step_twice(tmp_path):
    """The driver died between journal records: on a resume it believes fewer steps were logged
    than the trackers hold. TensorBoard and MLflow each learn what they hold on reopening."""
    cfg = {"tensorboard": str(tmp_path / "tb"), "mlflow": f"sqlite:///{tmp_path}/m.db"}
    first = _trackers(tmp_path, logging=cfg)
    _log_job(first, range(1, 9), eval_steps=[4, 8])
    first.close("KILLED")
    again = _trackers(tmp_path, logging=cfg, ids=first.ids, last_step=5, last_eval_step=0)
    _log_job(again, range(6, 13), eval_steps=[8, 12])
    again.close()
    acc = _tb(tmp_path / "tb" / "t" / "r1")
    assert _tb_steps(acc, "train/loss") == list(range(1, 13))
    assert _tb_steps(acc, "eval/loss") == [4, 8, 12]
    c = _mlflow_client(tmp_path / "m.db")
    (run,) = [r for e in c.search_experiments() for r in c.search_runs([e.experiment_id])]
    steps = sorted(m.step for m in c.get_metric_history(run.info.run_id, "train/loss"))
    assert steps == list(range(1, 13))


@pytest.mark.timeout(60)
def test_the_feed_takes_rank_zero_and_the_journal(tmp_path):
    from resilient.anomaly.trackers import Feed

    cfg = {"tensorboard": str(tmp_path / "tb")}
    t = _trackers(tmp_path, logging=cfg)
    feed = Feed(t)
    for rank in (0, 1):
        feed.training(
            {
                "rank": rank,
                "step": 1,
                "mean_loss": 2.0,
                "lr": 1e-3,
                "grad_norm": 1.0,
                "tokens_per_s": 10.0,
                "loss": 3.0 + rank,
            }
        )
    feed.record(
        {
            "type": "eval",
            "step": 1,
            "loss": 1.5,
            "perplexity": 4.5,
            "accuracy": 0.3,
            "early_stop": "early stop at step 1",
        }
    )
    feed.record({"type": "fault", "kind": "crash", "rank": 1, "step": 1, "evidence": "gone"})
    feed.record({"type": "progress", "step": 1})  # not an event
    t.close()
    acc = _tb(tmp_path / "tb" / "t" / "r1")
    assert [e.value for e in acc.Scalars("train/loss")] == [2.0]  # the job-wide mean
    assert [e.value for e in acc.Scalars("eval/loss")] == [1.5]
    assert {"events/fault/text_summary", "events/early_stop/text_summary"} <= set(
        acc.Tags()["tensors"]
    )
