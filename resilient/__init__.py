"""resilient: fault-tolerant LoRA fine-tuning on Ray (supervisor, anomaly detector, checkpoint
engine)."""

from resilient.config import JobSpec, load_spec
from resilient.errors import SpecError, UserError

__all__ = ["JobSpec", "load_spec", "SpecError", "UserError", "launch"]


def launch(spec: JobSpec, run_id: str | None = None) -> dict:
    """Run a job to its end and return its status (see `resilient.launcher.launch`)."""
    from resilient.launcher import launch as _launch

    return _launch(spec, run_id)
