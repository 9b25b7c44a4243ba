"""Experiment trackers (TensorBoard, MLflow, Weights & Biases): one job's curves and events, sent
from the driver to those `spec.logging` configures.

Contract:
- `from_spec(spec, run_id, ids, last_step, last_eval_step)` returns a `Trackers` for the trackers
  `spec.logging` configures, or None when it configures none.
- `train(step, metrics)` / `eval(step, metrics)` log each key k as `train/k` / `eval/k` at `step`
  in every tracker (train/loss, train/lr, train/grad_norm, train/tokens_per_s; eval/loss,
  eval/perplexity, eval/accuracy). A step at or below the last one logged (`last_step` /
  `last_eval_step` on a resume) is ignored: a restart replays steps, and as a resume is bit exact
  the values are the ones already logged, so no tracker ever gets a step twice. Values that are not
  numbers are left out.
- `event(step, kind, text)`: a fault, restart, resize, rollback or early stop. TensorBoard: text
  `events/<kind>` at `step`. MLflow: tag `event.<n>.<kind>` = "step S: text", n counting the run's
  events (4 digits, so the UI lists them in order; counted on from the run's tags on a resume).
  W&B: "step S: text" under `events/<kind>` in the history, with `events/step` = S (a W&B step
  never goes back, so an event or evaluation that arrives late lands on the current W&B step, and
  `eval/step` / `events/step` are the x axes W&B plots them against).
- One tracker run per job, reopened on a resume. TensorBoard writes below
  `<tensorboard>/<name>/<run_id>` (a resume adds an events file there). MLflow: experiment
  `mlflow_experiment or name` (created if missing), a run named run_id, tagged name and run_id,
  reopened (and set RUNNING) from `ids["mlflow_run_id"]`, else found by its run_id tag, else
  created. W&B: id `ids["wandb_id"]` (a fresh one otherwise), resume="allow", name run_id.
  `ids` holds what reopens them: the caller journals it and passes it back on a resume.
  `wandb_id` is there at once; `mlflow_run_id` once the thread has opened the run (`wait_open`).
- No tracker I/O in the caller's thread: calls put items on a bounded queue (QUEUE_MAX) that one
  daemon thread drains in batches (every FLUSH_S, or at once when BATCH items wait). Full, it
  drops the oldest items, with one warning. train/eval/event/close never raise; only close waits,
  at most CLOSE_S (or its `timeout`), for the last items and for every run to end (status
  FINISHED unless told).
- A tracker that fails to open or to write: one warning naming it and the error, and it is off
  for the rest of the job; the others go on. One that is not installed: one warning naming the
  pip package. A hung tracker (W&B online with no network) stalls the others, never the caller.
- tensorboard, mlflow and wandb are imported on the thread, on opening. MLflow's and alembic's
  INFO logs are silenced; W&B runs silent and leaves the console alone (no output capture).
- Memory stays flat over weeks: the queue is bounded and nothing else grows with the job.
"""

from __future__ import annotations

import logging
import re
import secrets
import threading
import time
from collections import deque
from pathlib import Path
from typing import TYPE_CHECKING

from resilient.anomaly.tracker_sinks import (
    Event,
    MLflow,
    Point,
    Sink,
    TensorBoard,
    Wandb,
    numbers,
)

if TYPE_CHECKING:
    from resilient.config import JobSpec, LoggingConfig

log = logging.getLogger(__name__)

QUEUE_MAX = 10_000  # items waiting; at one train step a second, hours of a stalled tracker
BATCH = 200  # items that wake the thread before FLUSH_S is up
MAX_BATCH = 1_000  # items written per round, so one MLflow round stays a few log_batch calls
FLUSH_S = 1.0
CLOSE_S = 60.0
STATUSES = ("FINISHED", "FAILED", "KILLED")


class Trackers:
    """Forwards one job's curves and events to TensorBoard, MLflow and W&B (those configured)."""

    def __init__(
        self,
        cfg: LoggingConfig,
        name: str,
        run_id: str,
        ids: dict | None = None,
        last_step: int = 0,
        last_eval_step: int = 0,
    ):
        self.ids: dict = dict(ids or {})
        self._last = {"train": int(last_step), "eval": int(last_eval_step)}
        self._sinks = self._sinks_for(cfg, name, run_id, int(last_step))
        self._q: deque[Point | Event] = deque()
        self._cv = threading.Condition()
        self._lock = threading.Lock()  # the last steps, should two threads log
        self._closing = False
        self._status = "FINISHED"
        self._warned: set[str] = set()
        self._opened = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="resilient-trackers", daemon=True)
        self._thread.start()

    def _sinks_for(self, cfg: LoggingConfig, name: str, run_id: str, last_step: int) -> list:
        sinks: list[Sink] = []
        if cfg.tensorboard:
            sinks.append(TensorBoard(Path(cfg.tensorboard) / name / run_id))
        if cfg.mlflow:
            exp = cfg.mlflow_experiment or name
            sinks.append(MLflow(cfg.mlflow, exp, name, run_id, self.ids))
        if cfg.wandb:
            # made here, not by W&B, so the caller can journal it before the thread opens the run
            self.ids.setdefault("wandb_id", secrets.token_hex(4))
            sinks.append(Wandb(cfg.wandb, run_id, self.ids["wandb_id"], last_step))
        return sinks

    # --- the caller's side: no I/O, never raises ---

    def train(self, step: int, metrics: dict[str, float]) -> None:
        self._point("train", step, metrics)

    def eval(self, step: int, metrics: dict[str, float]) -> None:
        self._point("eval", step, metrics)

    def _point(self, prefix: str, step: int, metrics: dict) -> None:
        try:
            values = numbers(metrics)
            if not values:
                return
            with self._lock:
                if step <= self._last[prefix]:
                    return  # replayed after a restart or a resume: already logged
                self._last[prefix] = step
            self._put(Point(prefix, int(step), values, time.time()))
        except Exception as e:
            self._warn_once(prefix, "trackers: %s(%r) ignored: %r", prefix, step, e)

    def event(self, step: int, kind: str, text: str) -> None:
        try:
            kind = re.sub(r"[^\w\-./ ]", "_", str(kind)) or "event"  # MLflow's tag key alphabet
            self._put(Event(int(step), kind, str(text), time.time()))
        except Exception as e:
            self._warn_once("event", "trackers: event(%r) ignored: %r", kind, e)

    def _put(self, item: Point | Event) -> None:
        with self._cv:
            if self._closing:
                return
            if len(self._q) >= QUEUE_MAX:
                self._q.popleft()
                self._warn_once(
                    "full",
                    "trackers: %d items waiting, dropping the oldest (slow tracker?)",
                    QUEUE_MAX,
                )
            self._q.append(item)
            if len(self._q) >= BATCH:
                self._cv.notify()

    def wait_open(self, timeout: float | None = None) -> dict:
        """`ids` once every tracker has opened (or failed to): what the caller journals."""
        self._opened.wait(timeout)
        return dict(self.ids)

    def close(self, status: str = "FINISHED", timeout: float = CLOSE_S) -> None:
        """Write what waits, end every tracker run with `status` (FINISHED, FAILED, KILLED; W&B
        gets exit code 0 or 1) and stop the thread, waiting `timeout` at most. Idempotent."""
        with self._cv:
            if self._closing:
                return
            self._closing = True
            self._status = status if status in STATUSES else "FINISHED"
            self._cv.notify()
        self._thread.join(timeout)
        if self._thread.is_alive():
            log.warning("trackers: still writing after %.0f s; leaving them to it", timeout)

    def _warn_once(self, key: str, msg: str, *args) -> None:
        if key not in self._warned:
            self._warned.add(key)
            log.warning(msg, *args)

    # --- the thread's side: all tracker I/O ---

    def _loop(self) -> None:
        try:
            self._sinks = [s for s in self._sinks if self._guard(s, "open", s.open)]
        finally:
            self._opened.set()
        while True:
            with self._cv:
                if not self._closing and len(self._q) < BATCH:
                    self._cv.wait(FLUSH_S)
                batch = [self._q.popleft() for _ in range(min(len(self._q), MAX_BATCH))]
                closing = self._closing
            if batch:
                self._sinks = [
                    s for s in self._sinks if self._guard(s, "write", s.write, s.fresh(batch))
                ]
            elif closing:
                break
        for s in self._sinks:
            self._guard(s, "close", s.close, self._status)

    def _guard(self, sink: Sink, what: str, fn, *args) -> bool:
        """Run one tracker call; False (after one warning, the tracker closed) if it failed."""
        try:
            fn(*args)
            return True
        except ImportError as e:
            log.warning(
                "%s tracker off: not installed (pip install %s): %s", sink.label, sink.package, e
            )
        except Exception as e:
            log.warning(
                "%s tracker failed to %s, off for the rest of the job: %s: %s",
                sink.label,
                what,
                type(e).__name__,
                e,
            )
            if what != "close":
                try:  # release what it holds (files, W&B's service); it is off either way
                    sink.close("FAILED")
                except Exception:
                    pass
        return False


def from_spec(
    spec: JobSpec,
    run_id: str,
    ids: dict | None = None,
    last_step: int = 0,
    last_eval_step: int = 0,
) -> Trackers | None:
    """The job's trackers, or None when `spec.logging` configures none."""
    cfg = spec.logging
    if not (cfg.tensorboard or cfg.mlflow or cfg.wandb):
        return None
    return Trackers(cfg, spec.name, run_id, ids, last_step, last_eval_step)


EVENTS = ("fault", "restart", "resize", "rollback", "cordon")


class Feed:
    """What the driver sees, fed to `Trackers`: step records (`training(row)`: rank 0's, which
    carries the job-wide mean loss) and journal records (`record(rec)`: evaluations, and faults,
    restarts, resizes, rollbacks, cordons and an early stop as events)."""

    def __init__(self, trackers: Trackers):
        self.trackers = trackers
        self.step = 0  # the newest step seen: where an event without one lands

    def training(self, row: dict) -> None:
        if row.get("rank") != 0 or row.get("overflow"):
            return
        self.step = max(self.step, int(row["step"]))
        self.trackers.train(
            row["step"],
            {
                "loss": row.get("mean_loss"),
                "lr": row.get("lr"),
                "grad_norm": row.get("grad_norm"),
                "tokens_per_s": row.get("tokens_per_s"),
            },
        )

    def record(self, rec: dict) -> None:
        kind = rec.get("type")
        if kind == "eval":
            keys = ("loss", "perplexity", "accuracy")
            self.trackers.eval(rec["step"], {k: rec.get(k) for k in keys})
            if rec.get("early_stop"):
                self.trackers.event(rec["step"], "early_stop", rec["early_stop"])
        elif kind in EVENTS:
            step = rec.get("step") or rec.get("from_step") or self.step
            self.trackers.event(int(step), kind, describe(rec))


def describe(rec: dict) -> str:
    """A journal record as one line for a tracker's event list."""
    g, kind = rec.get, rec["type"]
    if kind == "fault":
        where = f" of rank {g('rank')}" if g("rank") is not None else ""
        return f"{g('kind')}{where} at step {g('step')}: {str(g('evidence') or '')[:200]}"
    if kind == "restart":
        return f"restart {g('n', '')}".strip()
    if kind == "resize":
        return f"{g('from')} -> {g('to')} ranks at step {g('step')}: {g('reason')}"
    if kind == "rollback":
        return f"step {g('from_step')} -> {g('to_step')}: {g('reason')}"
    return f"node {g('node')}: {g('reason')}"  # cordon
