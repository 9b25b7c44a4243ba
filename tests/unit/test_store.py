import pandas as pd
import pytest

from resilient.anomaly import store
from resilient.rundir import RunDir

pytestmark = pytest.mark.timeout(30)


def test_parquet_log_is_a_dataset_readable_while_written(tmp_path):
    rd = RunDir(f"file://{tmp_path}/run")
    log = store.ParquetLog(rd, "metrics/train", store.TRAIN)
    log.append([{"t": 1.0, "rank": 0, "step": 1, "loss": 2.5, "compute_s": 0.01}])
    assert log.flush()
    log.append([{"t": 2.0, "rank": 1, "step": 1, "loss": 2.4}])
    log.flush()
    df = pd.read_parquet(str(tmp_path / "run" / "metrics" / "train"))
    assert list(df["rank"]) == [0, 1] and set(store.TRAIN.names) == set(df.columns)
    again = store.ParquetLog(rd, "metrics/train", store.TRAIN)  # a resumed run appends new parts
    again.tiers.open()
    assert again.tiers.next == 2


def test_objects_grow_with_merges_not_flushes_and_seal_leaves_one(tmp_path):
    rd = RunDir(f"file://{tmp_path}/run")
    log = store.ParquetLog(rd, "metrics/train", store.TRAIN)
    for i in range(200):  # 200 flushes of one row
        log.append([{"t": float(i), "rank": 0, "step": i}])
        assert log.flush()
        assert len(rd.listdir("metrics/train")) <= 12 + 60
    df = pd.read_parquet(str(tmp_path / "run" / "metrics" / "train"))
    assert sorted(df["step"]) == list(range(200))
    log.seal()
    assert len(rd.listdir("metrics/train")) == 1
    rows = store.read_table(rd, "metrics/train", ["step"])
    assert [r["step"] for r in rows] == list(range(200))
