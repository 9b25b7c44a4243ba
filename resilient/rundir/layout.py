"""The run directory's layout: every name below `<checkpoint.storage>/<name>/<run_id>/`.

Contract: the only place that spells these names; everything else imports them from here.
"""

from __future__ import annotations

import os

from resilient.rundir.fs import RunDir

SPEC_FILE = "spec.json"  # the validated spec the run was launched with (JSON)
JOURNAL = "journal.jsonl"  # the run journal (runlog), on a local run directory
JOURNAL_DIR = "journal"  # the run journal's segments, on an object store
STATUS = "status.json"  # the journal's first records, folded (runlog.snapshot)
CONTROL = "control"  # requests to the running job (resilient stop, resilient chaos inject)
STOP_FILE = f"{CONTROL}/stop"
SCALE_FILE = f"{CONTROL}/scale.json"  # resilient scale: the number of ranks wanted
CHAOS = "chaos"  # one marker per fault that fired (rundir.markers)
CHAOS_REPORT = "chaos_report.json"
FINAL = "final"  # the final adapter, in peft's format
# the writers' generation: a checkpoint writer of an older one (a zombie of a lost or cut-off node)
# commits and deletes nothing (checkpoint.storage)
FENCE = "fence.json"
BASE_MODEL = "base_model"  # the base model, staged at launch (rundir.staged)
DATA = "data"  # the tokenised corpus, staged at launch (rundir.staged)
LOGS = "logs"  # each rank's output (runlog.ranklogs)


def inject_request(req_id: str) -> str:
    """Where `resilient chaos inject` leaves request `req_id`."""
    return f"{CONTROL}/inject-{req_id}.json"


DRIVER_LOG = "driver"  # the launching process's own output that is not the launcher's (Ray's)


def log_stem(rank: int | str) -> str:
    """`logs/rank-N` for a rank, `logs/driver` for the driver's output."""
    return f"{LOGS}/rank-{rank}" if isinstance(rank, int) else f"{LOGS}/{rank}"


def rank_log(rank: int | str) -> str:
    """A rank's (or the driver's) log on a local run directory (an object store holds segments
    under `logs/rank-N/`)."""
    return f"{log_stem(rank)}.log"


def base_ref(rundir: RunDir, model_path: str) -> str:
    """What an exported adapter's config names as its base model: the user's model directory (or
    URI), or the run's own `base_model/` (relative to the adapter where the run directory is
    remote)."""
    if model_path:
        return model_path if "://" in model_path else os.path.abspath(model_path)
    return rundir.local_path(BASE_MODEL) if rundir.is_local else f"../{BASE_MODEL}"
