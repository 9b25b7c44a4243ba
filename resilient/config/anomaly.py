"""The spec's `anomaly` section: the anomaly detector's collectors, thresholds and exports.

Contract: as for every section (`config.sections`): unknown keys are errors, numbers are finite and
bounded, and each field's description is the README's spec reference for that key.
"""

from __future__ import annotations

from typing import Literal

from pydantic import AliasChoices, Field

from resilient.config.sections import DAY, _Section


class AnomalyConfig(_Section):
    """The anomaly detector (TEE): collectors, detector thresholds and exports."""

    interval: float = Field(
        1.0, gt=0, le=3600, description="Seconds between GPU/host samples on each node."
    )
    gpu: Literal["auto", "nvml", "simulated", "off"] = Field(
        "auto",
        description='"auto": NVML when a GPU answers, else off; "simulated": a settable fake '
        "GPU per node.",
    )
    straggler_factor: float = Field(
        2.0,
        gt=1.0,
        le=100,
        validation_alias=AliasChoices("straggler_factor", "straggler_ratio"),
        description="A rank this much slower than its peers' median... (also `straggler_ratio`)",
    )
    straggler_window: int = Field(
        10, ge=3, le=100_000, description="...for this many consecutive steps is a straggler."
    )
    straggler_window_s: float = Field(
        5.0,
        ge=0,
        le=DAY,
        description="...and for at least this many seconds (a blip of fast steps is not one).",
    )
    straggler_action: Literal["replace", "warn"] = Field(
        "replace",
        description='"replace": a straggler rank is replaced (from a warm spare, on another node '
        'where there is one) and a node whose ranks straggle twice is cordoned; "warn": journalled '
        "only, the job goes on at the straggler's pace.",
    )
    straggler_min_s: float = Field(
        0.002, ge=0, le=3600, description="Ignore ranks whose compute time is below this."
    )
    spike_z: float = Field(
        8.0, gt=0, le=1e6, description="Robust z-score (median/MAD) of a loss spike."
    )
    spike_window: int = Field(
        50, ge=10, le=100_000, description="Losses the spike detector looks back over."
    )
    spike_patience: int = Field(
        3, ge=1, le=1000, description="Consecutive spikes that trigger a rollback."
    )
    leak_mb_per_min: float = Field(
        200.0, gt=0, le=1e6, description="Steady RSS growth of a worker above this: a warning."
    )
    leak_window_s: float = Field(
        120.0, gt=0, le=DAY, description="Seconds of RSS history the leak detector fits."
    )
    thermal_c: float = Field(
        90.0, ge=0, le=200, description="GPU temperature at or above which a warning fires."
    )
    prometheus_host: str = Field(
        "127.0.0.1",
        description="Where the driver serves Prometheus metrics; another address than loopback "
        "exposes them to the network (they hold no secrets).",
    )
    prometheus_port: int = Field(
        0, ge=0, le=65535, description="Serve Prometheus metrics on prometheus_host:PORT (0 = off)."
    )
    prometheus_allow_hosts: list[str] = Field(
        default_factory=list,
        description="Host header names the metrics server answers to besides its address (a "
        "proxy's); any other is refused (400), a defence against DNS rebinding.",
    )
    pcie_replay_per_min: float = Field(
        8.0,
        gt=0,
        le=1e9,
        description="PCIe replays per minute above which a GPU's link is degraded (a warning, "
        "once per episode); 8 is NVIDIA's recommended maximum (DCGM).",
    )
    pcie_replay_window_s: float = Field(
        300.0, gt=0, le=DAY, description="Seconds over which the PCIe replay rate is measured."
    )
