"""The job spec: one validated tree (JobSpec) from TOML/YAML plus `--set` overrides.

Contract: `load_spec(path, overrides)` reads TOML (``.toml``) or YAML (``.yaml``/``.yml``), applies
``--set dotted.key=value`` overrides and returns a frozen, fully validated `JobSpec`, or raises
`SpecError` whose message names the offending field and what to do about it. Every key listed in
the README's spec reference is part of the public contract; unknown keys are errors.
"""

from resilient.config.adapter import peft_config
from resilient.config.anomaly import AnomalyConfig
from resilient.config.chaos import CHAOS_FAULTS, ChaosConfig, ChaosEntry, RandomChaos
from resilient.config.data import DataConfig, EvalConfig, LoggingConfig, WandbConfig
from resilient.config.load import apply_overrides, load_spec, parse_value, read_tree, validate_tree
from resilient.config.sections import (
    CheckpointConfig,
    ClusterConfig,
    ModelConfig,
    SupervisorConfig,
)
from resilient.config.spec import JobSpec
from resilient.config.train import TrainConfig

__all__ = [
    "CHAOS_FAULTS",
    "AnomalyConfig",
    "ChaosConfig",
    "ChaosEntry",
    "CheckpointConfig",
    "ClusterConfig",
    "DataConfig",
    "EvalConfig",
    "LoggingConfig",
    "WandbConfig",
    "JobSpec",
    "ModelConfig",
    "RandomChaos",
    "SupervisorConfig",
    "TrainConfig",
    "apply_overrides",
    "load_spec",
    "parse_value",
    "peft_config",
    "read_tree",
    "validate_tree",
]
