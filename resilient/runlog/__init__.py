"""The run log: the journal and everything that reads it (the status fold, the lost-time
accounting).

Used alike by the supervisor (writes), `resilient status`, the dashboard and the chaos report."""

from resilient.runlog.journal import Journal, read_records
from resilient.runlog.states import TERMINAL, JobState
from resilient.runlog.status import fold

__all__ = ["Journal", "read_records", "fold", "JobState", "TERMINAL"]
