"""The trackers `spec.logging` names, one class each: opened, written to and closed only on the
trackers' thread (`anomaly.trackers`), which guards every call.

Contract: a sink has `label` (named in warnings), `package` (what pip installs), `floor` (the
newest train and eval steps the tracker already holds, learnt on opening a resumed run: points at
or below it are not written again) and `open()`, `write(batch)`, `close(status)`; each may raise.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import NamedTuple

log = logging.getLogger(__name__)
TEXT_MAX = 5_000  # MLflow's tag value limit in older servers; longer texts are cut
FLOOR_TAGS = {"train/loss": "train", "eval/loss": "eval"}  # what says a step is held


class Point(NamedTuple):
    prefix: str  # train or eval
    step: int
    values: dict[str, float]
    t: float  # when the caller logged it (MLflow keeps it as the metric's timestamp)


class Event(NamedTuple):
    step: int
    kind: str
    text: str
    t: float


def numbers(metrics: dict) -> dict[str, float]:
    out = {}
    for k, v in metrics.items():
        if v is None or isinstance(v, str | bytes):
            continue
        try:  # numpy and 0-d torch scalars convert too
            out[str(k)] = float(v)
        except (TypeError, ValueError):
            continue
    return out


class Sink:
    """One tracker: opened, written to and closed on the trackers' thread only."""

    label = ""  # named in warnings
    package = ""  # what pip installs
    floor: dict[str, int]  # {"train": step, "eval": step} held already (a resumed run)

    def fresh(self, batch: list) -> list:
        """The batch less the points this tracker holds already."""
        f = self.floor
        return [it for it in batch if not isinstance(it, Point) or it.step > f[it.prefix]]

    def open(self) -> None:
        raise NotImplementedError

    def write(self, batch: list[Point | Event]) -> None:
        raise NotImplementedError

    def close(self, status: str) -> None:
        raise NotImplementedError


class TensorBoard(Sink):
    label, package = "TensorBoard", "tensorboard"

    def __init__(self, folder: Path):
        self.folder = folder
        self.writer = None
        self.floor = {"train": 0, "eval": 0}

    def open(self) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self._learn_floor()
        self.writer = SummaryWriter(log_dir=str(self.folder))

    def _learn_floor(self) -> None:
        """A resumed run's folder: the newest steps its event files hold (read once, on open)."""
        if not self.folder.is_dir():
            return
        from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

        for name in os.listdir(self.folder):
            if not name.startswith("events.out.tfevents"):
                continue
            for ev in EventFileLoader(str(self.folder / name)).Load():
                for v in ev.summary.value:
                    prefix = FLOOR_TAGS.get(v.tag)
                    if prefix:
                        self.floor[prefix] = max(self.floor[prefix], ev.step)

    def write(self, batch: list[Point | Event]) -> None:
        w = self.writer
        for it in batch:
            if isinstance(it, Point):
                for k, v in it.values.items():
                    w.add_scalar(f"{it.prefix}/{k}", v, it.step, walltime=it.t)
            else:
                w.add_text(f"events/{it.kind}", it.text, it.step, walltime=it.t)
        w.flush()

    def close(self, status: str) -> None:
        if self.writer is not None:
            self.writer.close()


def _quiet_mlflow() -> None:
    # mlflow gives its logger a handler at INFO on import (database creation and migrations
    # announce themselves there, alembic next to it): the driver's terminal is the user's.
    for name in ("mlflow", "alembic"):
        logger = logging.getLogger(name)
        if logger.getEffectiveLevel() < logging.WARNING:
            logger.setLevel(logging.WARNING)


class MLflow(Sink):
    label, package = "MLflow", "mlflow"

    def __init__(self, uri: str, experiment: str, name: str, run_id: str, ids: dict):
        self.uri, self.experiment, self.ids = uri, experiment, ids
        self.name, self.run_id = name, run_id
        self.client = None
        self.run = ""  # the MLflow run id
        self.n = 0  # events tagged in this run so far
        self.floor = {"train": 0, "eval": 0}

    def open(self) -> None:
        from mlflow.tracking import MlflowClient

        _quiet_mlflow()
        c = self.client = MlflowClient(tracking_uri=self.uri)
        exp = c.get_experiment_by_name(self.experiment)
        eid = exp.experiment_id if exp else c.create_experiment(self.experiment)
        run = self._reopen(eid) or c.create_run(
            eid, run_name=self.run_id, tags={"name": self.name, "run_id": self.run_id}
        )
        self.run = run.info.run_id
        if run.info.status != "RUNNING":
            c.update_run(self.run, status="RUNNING")
        self.n = sum(1 for k in run.data.tags if k.startswith("event."))
        self.ids["mlflow_run_id"] = self.run
        for tag, prefix in FLOOR_TAGS.items():  # a reopened run: what it holds (read once)
            if tag in run.data.metrics:
                steps = (m.step for m in c.get_metric_history(self.run, tag))
                self.floor[prefix] = max(steps, default=0)

    def _reopen(self, eid: str):
        """The job's run: the journaled id, else the run tagged with run_id, else None."""
        c, known = self.client, self.ids.get("mlflow_run_id")
        if known:
            try:
                run = c.get_run(known)
                if run.info.lifecycle_stage == "active":
                    return run
            except Exception as e:  # a tracking URI that changed, a run deleted for good
                log.warning(
                    "MLflow run %s not found (%s); looking for run_id %s", known, e, self.run_id
                )
        quoted = self.run_id.replace("'", "\\'")
        found = c.search_runs([eid], filter_string=f"tags.run_id = '{quoted}'", max_results=1)
        return found[0] if found else None

    def write(self, batch: list[Point | Event]) -> None:
        from mlflow.entities import Metric, RunTag

        metrics, tags = [], []
        for it in batch:
            ms = int(it.t * 1000)
            if isinstance(it, Point):
                metrics += [
                    Metric(f"{it.prefix}/{k}", v, ms, it.step) for k, v in it.values.items()
                ]
            else:
                text = f"step {it.step}: {it.text}"[:TEXT_MAX]
                tags.append(RunTag(f"event.{self.n:04d}.{it.kind}", text))
                self.n += 1
        # log_batch takes at most 1000 metrics, 100 tags, 1000 entries in all per call
        while metrics or tags:
            m, metrics = metrics[:900], metrics[900:]
            t, tags = tags[:100], tags[100:]
            self.client.log_batch(self.run, metrics=m, tags=t)

    def close(self, status: str) -> None:
        if self.run:
            self.client.set_terminated(self.run, status=status)


class Wandb(Sink):
    label, package = "W&B", "wandb"

    def __init__(self, cfg, run_id: str, wandb_id: str, last_step: int):
        self.cfg, self.run_id, self.wandb_id, self.last_step = cfg, run_id, wandb_id, last_step
        self.run = None
        self.step = 0  # the W&B step last logged: W&B drops (and prints) a step that goes back
        self.floor = {"train": 0, "eval": 0}  # W&B's own step keeps its history in order

    def open(self) -> None:
        import wandb

        if self.cfg.dir:
            Path(self.cfg.dir).mkdir(parents=True, exist_ok=True)
        self.run = r = wandb.init(
            project=self.cfg.project,
            entity=self.cfg.entity,
            mode=self.cfg.mode,
            dir=self.cfg.dir,
            id=self.wandb_id,
            resume="allow",
            name=self.run_id,
            reinit="create_new",  # the job's own run: leave any other run of the process alone
            settings=wandb.Settings(silent=True, console="off"),
        )
        for p in ("eval", "events"):  # their own x axes: they may land on a later W&B step
            r.define_metric(f"{p}/step")
            r.define_metric(f"{p}/*", step_metric=f"{p}/step")
        self.step = max(r.step, self.last_step + 1 if self.last_step else 0)

    def write(self, batch: list[Point | Event]) -> None:
        row: dict = {}
        for it in batch:
            step = max(it.step, self.step)
            if row and step != self.step:
                self.run.log(row, step=self.step)
                row = {}
            self.step = step
            if isinstance(it, Point):
                row.update((f"{it.prefix}/{k}", v) for k, v in it.values.items())
                if it.prefix == "eval":
                    row["eval/step"] = it.step
            else:
                key, text = f"events/{it.kind}", f"step {it.step}: {it.text}"[:TEXT_MAX]
                row[key] = f"{row[key]}\n{text}" if key in row else text
                row["events/step"] = it.step
        if row:  # the same W&B step logged again later merges into this row
            self.run.log(row, step=self.step)

    def close(self, status: str) -> None:
        if self.run is not None:
            self.run.finish(exit_code=0 if status == "FINISHED" else 1)
