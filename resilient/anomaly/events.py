"""AnomalyEvent: what a detector found, with its evidence and the action it suggests."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

# Suggested actions, in increasing severity. The supervisor's policy maps them to decisions.
# REPLACE: the rank alone is replaced (a straggler), its peers keep their processes.
WARN, REPLACE, RESTART, ROLLBACK, CORDON = "warn", "replace", "restart", "rollback", "cordon"


@dataclass(frozen=True)
class AnomalyEvent:
    t: float
    # gpu_xid, gpu_ecc, gpu_remap, gpu_retired_pages, gpu_recovery, gpu_lost, hang, straggler,
    # nan, loss_spike, rss_leak, thermal, power_throttle, pcie_replay
    kind: str
    severity: str  # "warning" or "critical"
    action: str  # warn, replace, restart, rollback, cordon
    node: str | None = None
    rank: int | None = None
    step: int | None = None
    evidence: dict = field(default_factory=dict)

    def to_record(self) -> dict:
        d = asdict(self)
        d["evidence"] = json.dumps(self.evidence, sort_keys=True, default=str)
        return d
