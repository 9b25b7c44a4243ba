"""The spec's chaos section: planned faults (`[[chaos]]`) and random chaos (`--chaos-mtbf`).

Contract: as for every section (`config.sections`): unknown keys are errors, numbers are finite and
bounded, each field's description is the README's spec reference for that key.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from resilient.catalogue import FAULTS, GPU, NODE_OR_RANK, PARAMS, RANDOM, RANDOM_DEFAULT
from resilient.config.sections import DAY, WEEK, _Section

CHAOS_FAULTS = tuple(FAULTS)


class ChaosEntry(_Section):
    """One planned fault: `fault` hits `rank` (or `node`) when the job reaches `at_step`, once."""

    at_step: int | None = Field(None, ge=1, description="The step at whose start the fault fires.")
    at_time: float | None = Field(
        None, ge=0, description="Or: seconds of training after which it fires."
    )
    fault: Literal[CHAOS_FAULTS] = Field(..., description="See the README's fault catalogue.")
    rank: int | None = Field(
        None, ge=0, description="The rank hit (default 0 unless `node` is given)."
    )
    node: int | None = Field(
        None,
        ge=0,
        description="GPU faults and bad_compute: the node hit, by index in the journal's node "
        "list (bad_compute may give `rank` instead: the node that rank runs on).",
    )
    factor: float = Field(
        2.0, gt=1.0, le=1000, description="slow: the rank's compute takes this many times longer."
    )
    xid: int = Field(79, ge=1, description="gpu_xid: the XID the simulated GPU reports.")
    count: int = Field(1, ge=1, description="ecc: uncorrectable ECC errors added.")
    temperature: float = Field(
        95.0, ge=-50, le=200, description="thermal: the simulated GPU's temperature in C."
    )
    seconds: float = Field(
        5.0, gt=0, le=DAY, description="storage_outage: how long storage refuses writes."
    )

    @model_validator(mode="after")
    def _target(self) -> ChaosEntry:
        if (self.at_step is None) == (self.at_time is None):
            raise ValueError("give exactly one trigger: at_step or at_time")
        if self.node is not None and self.fault not in GPU + NODE_OR_RANK:
            raise ValueError(
                f"fault {self.fault!r} is aimed at a rank; `node` only goes with "
                f"{', '.join(GPU + NODE_OR_RANK)}"
            )
        if self.node is not None and self.rank is not None:
            raise ValueError("give `rank` or `node`, not both")
        return self

    @property
    def target_rank(self) -> int | None:
        return self.rank if self.rank is not None else (None if self.node is not None else 0)

    @property
    def params(self) -> dict[str, Any]:
        """The fault's parameters (factor, xid, count, temperature, seconds)."""
        return {k: getattr(self, k) for k in PARAMS}


class RandomChaos(_Section):
    """Random chaos (`--chaos-mtbf`): faults drawn as the job trains, from a seed."""

    mtbf_s: float = Field(
        ..., gt=0, le=WEEK, description="Mean seconds of training between two faults."
    )
    faults: list[Literal[RANDOM]] = Field(
        default_factory=lambda: list(RANDOM_DEFAULT), min_length=1, description="Drawn from."
    )
    seed: int = Field(0, ge=0, lt=2**31, description="The same seed, the same faults.")


class ChaosConfig(_Section):
    """Faults the job suffers on purpose. Written as a list of entries (`[[chaos]]`), or as a
    table (`[chaos]` with `allow_inject`, `random`, and the entries as `[[chaos.plan]]`)."""

    plan: list[ChaosEntry] = Field(default_factory=list, description="Planned faults.")
    random: RandomChaos | None = Field(None, description="Random chaos (`--chaos-mtbf`).")
    allow_inject: bool = Field(
        False,
        description="Carry out `resilient chaos inject` requests (`launch --allow-chaos`); "
        "without it the job refuses them.",
    )

    @model_validator(mode="before")
    @classmethod
    def _entries(cls, v: Any) -> Any:
        return {"plan": v} if isinstance(v, list) else v
