"""A run directory: filesystem access through fsspec (`fs`), its layout (`layout`), the chaos
markers (`markers`) and the control requests (`control`) kept in it."""

from resilient.rundir.fs import RunDir, run_dir_for

__all__ = ["RunDir", "run_dir_for"]
