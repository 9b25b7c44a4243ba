"""Metric samples and anomaly events as rolling Parquet in the run directory (pyarrow).

Contract: `ParquetLog(rundir, name, schema).append(rows)` buffers rows; `flush()` writes them as
one new, complete Parquet object below `<name>/`, and older ones are merged in tiers as the job goes
(`rundir.tiers`: a level-1 object per 12 flushes, a level-2 one per 60 of those, about an hour at
the default 5 s), so the objects per dataset grow with hours, not with flushes; `seal()` at the end
of a job merges what is below the top tier into one. The folder is a dataset pandas/pyarrow reads at
any moment (`pd.read_parquet(run_dir + "/metrics/train")`; for an instant while a merge lands a
reader that lists the folder itself may see rows twice: `read_table` never does). Schemas (README,
"Metrics and events"): one column per key of the rows; the writer never drops a column.
"""

from __future__ import annotations

import io
import threading

import pyarrow as pa
import pyarrow.parquet as pq

from resilient.rundir import RunDir
from resilient.rundir.tiers import Tiers, read_segments

FANOUT = (12, 60)


def _to_bytes(table: pa.Table) -> bytes:
    buf = io.BytesIO()
    pq.write_table(table, buf)
    return buf.getvalue()


def _from_bytes(data: bytes, columns: list[str] | None = None) -> pa.Table:
    return pq.read_table(io.BytesIO(data), columns=columns)


def concat(blobs: list[bytes]) -> bytes:
    """Parquet objects of one schema, in order, as one. A column an older object lacks (a run
    resumed by a newer `resilient` that samples more) is null there rather than a failed merge."""
    tables = [_from_bytes(b) for b in blobs]
    return _to_bytes(pa.concat_tables(tables, promote_options="default"))


def decode_rows(segment, data: bytes) -> list[dict]:
    """The rows of one stored segment (for `rundir.tiers.SegmentCache`)."""
    return _from_bytes(data).to_pylist()


def decode_table(segment, data: bytes) -> list[pa.Table]:
    """One stored segment as a one-entry list holding its table (a `SegmentCache` of columns)."""
    return [_from_bytes(data)]


def read_table(rundir: RunDir, name: str, columns: list[str] | None = None) -> list[dict]:
    """Every row of the dataset `name`, once, in order."""
    return [
        r for _, data in read_segments(rundir, name) for r in _from_bytes(data, columns).to_pylist()
    ]


class ParquetLog:
    def __init__(self, rundir: RunDir, name: str, schema: pa.Schema):
        self.rundir, self.name, self.schema = rundir, name, schema
        self.rows: list[dict] = []
        self.tiers = Tiers(rundir, name, ".parquet", concat, FANOUT)
        self.lock = threading.Lock()

    def append(self, rows: list[dict]) -> int:
        """Buffer `rows`; how many rows wait now."""
        with self.lock:
            self.rows.extend(rows)
            return len(self.rows)

    def flush(self) -> bool:
        with self.lock:
            rows, self.rows = self.rows, []
        if not rows:
            return True
        table = pa.Table.from_pylist(
            [{f: r.get(f) for f in self.schema.names} for r in rows], schema=self.schema
        )
        try:
            self.tiers.put(_to_bytes(table), 1)
        except Exception:  # storage outage: keep the rows for the next flush
            with self.lock:
                self.rows = rows + self.rows
            return False
        return True

    def seal(self) -> None:
        """The end of the job: flush, then one object for everything below the top tier."""
        if self.flush():
            try:
                self.tiers.seal()
            except Exception:  # storage outage: the unmerged objects stay, all readable
                pass


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
        ("retired_pages_sbe", i64),
        ("retired_pages_dbe", i64),
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
