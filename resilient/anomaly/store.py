"""Metric samples and anomaly events as Parquet in the run directory (pyarrow).

Contract: `ParquetLog(rundir, name).append(rows)` buffers rows; `flush()` writes them as one new,
complete file `<name>/part-<n>.parquet`, so the directory is a dataset pandas/pyarrow can read at
any moment while the job runs (`pd.read_parquet(run_dir + "/metrics/train")`). Schemas (README,
"Metrics and events"): one column per key of the rows; the writer never drops a column.
"""

from __future__ import annotations

import io
import threading

import pyarrow as pa
import pyarrow.parquet as pq

from resilient.rundir import RunDir


class ParquetLog:
    def __init__(self, rundir: RunDir, name: str, schema: pa.Schema):
        self.rundir, self.name, self.schema = rundir, name, schema
        self.rows: list[dict] = []
        self.part = len([n for n in rundir.listdir(name) if n.endswith(".parquet")])
        self.lock = threading.Lock()

    def append(self, rows: list[dict]) -> None:
        with self.lock:
            self.rows.extend(rows)

    def flush(self) -> bool:
        with self.lock:
            rows, self.rows = self.rows, []
        if not rows:
            return True
        table = pa.Table.from_pylist(
            [{f: r.get(f) for f in self.schema.names} for r in rows], schema=self.schema
        )
        buf = io.BytesIO()
        pq.write_table(table, buf)
        try:
            self.rundir.write_bytes(f"{self.name}/part-{self.part:06d}.parquet", buf.getvalue())
        except Exception:  # storage outage: keep the rows for the next flush
            with self.lock:
                self.rows = rows + self.rows
            return False
        self.part += 1
        return True


f64, i64, s = pa.float64(), pa.int64(), pa.string()
TRAIN = pa.schema(
    [
        ("t", f64),
        ("rank", i64),
        ("step", i64),
        ("data_step", i64),
        ("loss", f64),
        ("mean_loss", f64),
        ("grad_norm", f64),
        ("step_time", f64),
        ("compute_s", f64),
        ("data_wait", f64),
        ("tokens_per_s", f64),
        ("attempt", i64),
    ]
)
GPU = pa.schema(
    [
        ("t", f64),
        ("node", s),
        ("gpu", i64),
        ("lost", pa.bool_()),
        ("util", f64),
        ("mem_used", i64),
        ("mem_total", i64),
        ("temp", f64),
        ("power_w", f64),
        ("sm_clock", f64),
        ("throttle_reasons", i64),
        ("ecc_volatile_uncorrected", i64),
        ("ecc_aggregate_uncorrected", i64),
        ("retired_pending", i64),
        ("remap_pending", pa.bool_()),
        ("remap_failed", pa.bool_()),
        ("pcie_replay", i64),
        ("recovery_action", i64),
        ("xid", i64),
    ]
)
HOST = pa.schema(
    [
        ("t", f64),
        ("node", s),
        ("cpu_percent", f64),
        ("mem_percent", f64),
        ("disk_read", i64),
        ("disk_write", i64),
        ("net_sent", i64),
        ("net_recv", i64),
        ("rss_json", s),
    ]
)
EVENTS = pa.schema(
    [
        ("t", f64),
        ("kind", s),
        ("severity", s),
        ("action", s),
        ("node", s),
        ("rank", i64),
        ("step", i64),
        ("evidence", s),
        ("decision", s),
    ]
)
