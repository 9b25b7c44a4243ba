"""The spec's `data`, `eval` and `logging` sections: what is trained on, what is held out to
evaluate, and where the curves go besides the run directory.

Contract: as every section (`sections`): unknown keys refused, frozen, bounded numbers, a
description on every field. `DataConfig.resolved()` fills the format-dependent defaults (`train_on`,
`packing`); `DataConfig.fingerprinted()` is what a checkpoint depends on (keys added after the
first release are left out at their defaults, so older runs keep their fingerprint).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator

from resilient.config.sections import _Section

FORMATS = ("text", "prompt_completion", "alpaca", "chat")
# Keys that came after the first release: a fingerprint names them only when they are not default.
LATER_KEYS = ("format", "train_on", "packing", "too_long", "chat_template", "num_proc")


def _local_absolute(v: str | None) -> str | None:
    return str(Path(v).expanduser().absolute()) if v and "://" not in v else v


class DataConfig(_Section):
    """The training set."""

    path: str = Field(
        ...,
        description="A local file (txt, jsonl/json, parquet, csv, arrow), a folder of such files "
        "or one written by `datasets`' save_to_disk, or an fsspec URI of either (s3://...).",
    )
    format: Literal["text", "prompt_completion", "alpaca", "chat"] = Field(
        "text",
        description="text (one document per line, or a `text` field), prompt_completion "
        "(`prompt`, `completion`), alpaca (`instruction`, `input`, `output`) or chat "
        "(`messages`: a list of {role, content}, rendered with the chat template).",
    )
    seq_len: int = Field(64, ge=8, le=8192, description="Tokens per training sequence.")
    train_on: Literal["completion", "all"] | None = Field(
        None,
        description="Which tokens carry loss: completion (the completion, output or assistant "
        "turns, end-of-turn tokens included) or all. Default: completion for the structured "
        "formats, all for text.",
    )
    packing: bool | None = Field(
        None,
        description="true: several samples per sequence, position ids restarting per sample, "
        "no attention across samples; false: one sample per sequence, padded per microbatch. "
        "Default: text concatenates documents into seq_len chunks (attention across them), the "
        "structured formats do not pack.",
    )
    too_long: Literal["truncate", "drop"] = Field(
        "truncate",
        description="A sample longer than seq_len is cut to it (truncate) or left out (drop); "
        "either is counted.",
    )
    chat_template: str | None = Field(
        None,
        description="A Jinja chat template (as Hugging Face tokenizers take) for format = chat; "
        "default: the tokenizer's own. The built-in byte-level model has none. Unused (and "
        "said so at launch) with the other formats.",
    )
    num_proc: int = Field(
        0,
        ge=0,
        le=256,
        description="Processes tokenising at launch (`datasets.map`); 0 = one per CPU, at most 8.",
    )

    _path = field_validator("path")(classmethod(lambda cls, v: _local_absolute(v)))

    @field_validator("chat_template")
    @classmethod
    def _template(cls, v: str | None) -> str | None:
        if v is None:
            return v
        from jinja2 import TemplateSyntaxError
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        try:
            ImmutableSandboxedEnvironment().parse(v)
        except TemplateSyntaxError as e:
            raise ValueError(f"not a Jinja template ({e.message}, line {e.lineno})") from None
        return v

    @model_validator(mode="after")
    def _consistent(self) -> DataConfig:
        if self.format == "text" and self.train_on == "completion":
            raise ValueError(
                'data.train_on = "completion" needs completions: use a structured data.format '
                '(prompt_completion, alpaca, chat) or train_on = "all"'
            )
        return self  # a chat_template beside another format is unused, and launch says so

    def resolved(self) -> tuple[str, bool | None]:
        """(train_on, packing) with the format's defaults: packing None means text chunks."""
        train_on = self.train_on or ("all" if self.format == "text" else "completion")
        packing = (
            self.packing if self.packing is not None else (None if self.format == "text" else False)
        )
        return train_on, packing

    def fingerprinted(self) -> dict:
        dump = self.model_dump()
        for k in LATER_KEYS:
            if dump[k] == type(self).model_fields[k].default:
                del dump[k]
        return dump


class EvalConfig(_Section):
    """Evaluation on held-out data: loss, perplexity and token accuracy of the trained tokens."""

    path: str | None = Field(
        None, description="An evaluation set of data.format, read as data.path is."
    )
    split: float = Field(
        0.0,
        ge=0,
        le=0.5,
        description="Hold out this fraction of data.path's samples (seeded by train.seed) "
        "instead of eval.path; 0 = none.",
    )
    every: int = Field(
        0, ge=0, le=10**9, description="Evaluate every N steps, and after the last (0 = last only)."
    )
    max_batches: int = Field(
        0,
        ge=0,
        le=10**9,
        description="Microbatches (of train.batch_size sequences) per evaluation; 0 = all.",
    )
    early_stop_patience: int = Field(
        0,
        ge=0,
        le=10**6,
        description="End the job (SUCCEEDED, with the reason) after this many evaluations "
        "without a lower eval loss; 0 = never.",
    )
    early_stop_min_delta: float = Field(
        0.0, ge=0, le=1e3, description="An eval loss lower by less than this is no improvement."
    )

    _path = field_validator("path")(classmethod(lambda cls, v: _local_absolute(v)))

    @model_validator(mode="after")
    def _consistent(self) -> EvalConfig:
        if self.path and self.split:
            raise ValueError("give eval.path or eval.split, not both")
        if not self.enabled and (self.every or self.early_stop_patience or self.max_batches):
            raise ValueError(
                "eval.every, eval.max_batches and eval.early_stop_patience need an evaluation "
                "set: add eval.path, or eval.split (a fraction of data.path held out, e.g. 0.05)"
            )
        return self

    @property
    def enabled(self) -> bool:
        return bool(self.path or self.split)

    def due(self, step: int, last: int) -> bool:
        """Whether step `step` (of `last`) is evaluated."""
        return self.enabled and (step == last or bool(self.every and step % self.every == 0))


class WandbConfig(_Section):
    """Weights & Biases: one W&B run per job, resumed with it."""

    project: str = Field(..., min_length=1, description="The W&B project.")
    entity: str | None = Field(None, description="The W&B entity (team or user); default: yours.")
    mode: Literal["online", "offline"] = Field(
        "online", description="offline writes under `dir` for a later `wandb sync`."
    )
    dir: str | None = Field(None, description="Where W&B writes its files (default: ./wandb).")

    _dir = field_validator("dir")(classmethod(lambda cls, v: _local_absolute(v)))


class LoggingConfig(_Section):
    """Trackers that receive the job's curves (train/loss, train/lr, train/grad_norm,
    train/tokens_per_s, eval/loss, eval/perplexity, eval/accuracy) and its faults, restarts and
    resizes as events. A tracker that fails is a warning, never a training fault."""

    tensorboard: str | None = Field(
        None, description="A TensorBoard log folder; the run writes below <folder>/<name>/<run id>."
    )
    mlflow: str | None = Field(
        None, description="An MLflow tracking URI (sqlite:///mlflow.db works offline)."
    )
    mlflow_experiment: str | None = Field(
        None, description="The MLflow experiment (default: the job's name)."
    )
    wandb: WandbConfig | None = Field(None, description="Weights & Biases: {project, mode, ...}.")

    _tb = field_validator("tensorboard")(classmethod(lambda cls, v: _local_absolute(v)))

    @property
    def any(self) -> bool:
        return bool(self.tensorboard or self.mlflow or self.wandb)
