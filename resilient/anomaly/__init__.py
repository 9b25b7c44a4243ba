"""TEE: GPU, host and training metrics turned into classified events the supervisor acts on."""

from resilient.anomaly.events import AnomalyEvent

__all__ = ["AnomalyEvent"]
