"""Connect to Ray, create the run directory, run the supervisor, follow progress, print the
summary."""

from resilient.launcher.launch import launch, resume

__all__ = ["launch", "resume"]
