"""Inputs staged at launch and rank logs, on a local run directory and on an object store
(fsspec's memory filesystem): what workers read is what the launcher published, whole; log lines
come back once each, in order."""

import pytest

from resilient.config import validate_tree
from resilient.errors import SpecError
from resilient.launcher import staging
from resilient.rundir import RunDir, staged
from resilient.rundir.layout import BASE_MODEL, DATA
from resilient.runlog.ranklogs import LogReader, RankLogs, log_url, ranks
from resilient.training.corpus import write_corpus
from resilient.training.data import BYTE_VOCAB, StagedData
from resilient.training.model import build_tiny_llama

pytestmark = pytest.mark.timeout(60)


def _spec(tmp_path, **model):
    write_corpus(str(tmp_path / "c.txt"), 100)
    return validate_tree(
        {
            "name": "s",
            "model": model or {"builtin": "tiny-llama"},
            "data": {"path": str(tmp_path / "c.txt"), "seq_len": 16},
            "checkpoint": {"storage": str(tmp_path / "runs")},
        }
    )


@pytest.mark.parametrize("where", ["local", "memory"])
def test_stage_publishes_model_and_samples_once(tmp_path, where):
    uri = str(tmp_path / "run") if where == "local" else f"memory://stage-{tmp_path.name}/run"
    rd, spec = RunDir(uri), _spec(tmp_path)
    staging.stage(rd, spec, str(tmp_path / "tmp"))
    assert staged.published(rd, BASE_MODEL) and staged.published(rd, DATA)
    rows = StagedData(staged.local_dir(rd, DATA)).train
    samples = [rows.get("input_ids", i).tolist() for i in range(len(rows))]
    assert len(samples[0]) == 16 and len(samples) > 0
    (tmp_path / "c.txt").unlink()  # staged: the user's file is not read again
    staging.stage(rd, spec, str(tmp_path / "tmp2"))
    again = StagedData(staged.local_dir(rd, DATA)).train
    assert [again.get("input_ids", i).tolist() for i in range(len(again))] == samples


def test_model_path_may_be_an_fsspec_uri(tmp_path):
    build_tiny_llama(str(tmp_path / "m"), BYTE_VOCAB)
    spec = _spec(tmp_path, path=f"file://{tmp_path}/m")
    got = staging.model_dir(spec, str(tmp_path / "tmp"))
    assert (tmp_path / "tmp" / "base" / "config.json").exists() and got.endswith("base")


def test_ray_client_address_is_refused_with_the_recipe(tmp_path):
    with pytest.raises(SpecError, match="ray job submit"):
        validate_tree(
            {
                "name": "s",
                "data": {"path": "x.txt"},
                "cluster": {"address": "ray://head:10001"},
            }
        )


@pytest.mark.parametrize("where", ["local", "memory"])
def test_rank_logs_come_back_once_in_order(tmp_path, where):
    uri = str(tmp_path / "run") if where == "local" else f"memory://logs-{tmp_path.name}/run"
    rd = RunDir(uri)
    logs = RankLogs(rd)
    reader = LogReader(rd, 1)
    logs.append(1, [f"line {i}" for i in range(3)])
    logs.append(0, ["rank zero"])
    logs.flush()
    assert reader.new_lines() == ["line 0", "line 1", "line 2"]
    logs.append(1, ["line 3"])
    logs.close()
    assert reader.new_lines() == ["line 3"]
    assert ranks(rd) == [0, 1]
    assert "rank-1" in log_url(rd, 1)


def test_a_float16_overflow_step_is_no_fault(tmp_path):
    """The gradient scaler skips an overflowing update and lowers its scale: no NaN event (a
    rollback would restore the scale that overflowed, again and again)."""
    from resilient.anomaly.monitor import AnomalyMonitor

    mon = AnomalyMonitor(_spec(tmp_path), RunDir(str(tmp_path / "run")))
    try:
        row = {"t": 1.0, "rank": 0, "step": 1, "loss": 2.0, "mean_loss": 2.0, "compute_s": 0.01}
        assert mon.training([{**row, "grad_norm": float("inf"), "overflow": True}]) == []
        (e,) = mon.training([{**row, "step": 2, "grad_norm": float("inf"), "overflow": False}])
        assert e.kind == "nan"
    finally:
        mon.close()
