"""What a user can get wrong, checked before anything starts: each mistake is one `UserError`
naming the field or argument and the fix (exit code 2), never a traceback or a half-made run.

Contract:
- `check_run_id(run_id)`: a folder name (letters, digits, `._-`, not `.` or `..`).
- `open_run_dir(storage, name, run_id, options, field)`: the run directory, verified to lie strictly
  inside `<storage>/<name>/`; an unknown protocol or a filesystem that cannot be set up is the
  storage field's mistake.
- `check_writable(rundir, field)`: storage takes a write (credentials, endpoint, bucket); it leaves
  nothing behind but the run directory itself.
- `check_data(spec, model_dir, tmp)`: `data.path` (and `eval.path`) can be read, have rows of
  `data.format` that can be trained on and, as text chunks, at least one sequence of
  `data.seq_len` tokens of the job's own tokenizer (the one in `model_dir`); returns the folder of
  the prepared sets (`training.prep`), which launch stages for the workers, and their stats.
- `check_adapter(spec, model_dir)`: the peft table applies to the model (its target modules
  exist: tried on a weightless copy on the meta device), and a sample, with the virtual tokens
  prompt-learning methods (prefix, prompt, P-tuning) put before it, fits the model's
  `max_position_embeddings`.
"""

from __future__ import annotations

import os
import posixpath
import re
import warnings

from resilient.config import JobSpec
from resilient.errors import SpecError, UserError
from resilient.rundir import RunDir

RUN_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


def check_run_id(run_id: str) -> None:
    if not RUN_ID.match(run_id) or run_id in (".", ".."):
        raise UserError(
            f"--run-id {run_id!r}: give a folder name of letters, digits and . _ - (no / and not "
            "starting with a dot), e.g. --run-id try-3"
        )


def storage_error(field: str, uri: str, e: BaseException) -> UserError:
    return UserError(
        f"{field} {uri!r} cannot be used ({type(e).__name__}: {str(e)[:300]}); give a local path "
        "or a URI fsspec knows (file://, s3://, gs://, ...) with its credentials (fsspec config, "
        "e.g. FSSPEC_S3, or checkpoint.storage_options)"
    )


def open_run_dir(storage: str, name: str, run_id: str, options: dict, field: str) -> RunDir:
    """`<storage>/<name>/<run_id>`, which must lie strictly inside `<storage>/<name>`."""
    check_run_id(run_id)
    try:
        parent = RunDir(f"{storage.rstrip('/')}/{name}", options)
        rundir = RunDir(f"{parent.uri}/{run_id}", options)
    except Exception as e:  # unknown protocol, missing driver, a malformed URI
        raise storage_error(field, storage, e) from None
    inside = posixpath.dirname(posixpath.normpath(rundir.root)) == posixpath.normpath(parent.root)
    if not inside:
        raise UserError(f"--run-id {run_id!r} would put the run outside {parent.uri}")
    return rundir


def check_writable(rundir: RunDir, field: str) -> None:
    try:
        rundir.makedirs()
        rundir.write_bytes(".probe", b"ok")
        rundir.remove(".probe")
    except Exception as e:  # any filesystem's refusal, spelled its own way
        raise storage_error(field, rundir.uri, e) from None


def tokenizer_of(spec: JobSpec, model_dir: str):
    """The job's tokenizer, or SpecError naming model.path."""
    from resilient.training.encode import load_tokenizer

    try:
        return load_tokenizer(spec.model.builtin, model_dir)
    except Exception as e:  # a model directory without a tokenizer, or a damaged one
        raise SpecError(
            f"model.path {spec.model.path!r} holds no tokenizer transformers can load "
            f"({type(e).__name__}); give a model directory with its tokenizer files"
        ) from None


def check_data(spec: JobSpec, model_dir: str, tmp: str) -> tuple[str, dict]:
    """The training (and evaluation) sets read, tokenised and laid out in `<tmp>/data`
    (`training.prep`); (that folder, its stats)."""
    import shutil

    from resilient.training.prep import prepare

    out, work = os.path.join(tmp, "data"), os.path.join(tmp, "prep")
    try:
        return out, prepare(spec, tokenizer_of(spec, model_dir), out, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)  # the readers' caches: as big as the data


def check_adapter(spec: JobSpec, model_dir: str) -> None:
    import torch
    from peft import get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    from resilient.config import peft_config

    try:
        config = AutoConfig.from_pretrained(model_dir)
    except (OSError, ValueError):
        return  # the model's own loading names what is wrong with it
    cfg = peft_config(spec.peft)
    try:
        # No weights on the meta device: as cheap for 70B as for the tiny model; warnings about
        # a weightless model are noise.
        with torch.device("meta"), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            get_peft_model(AutoModelForCausalLM.from_config(config), cfg)
    except (ValueError, TypeError, KeyError, AttributeError) as e:
        raise SpecError(
            f"peft: {e}; check peft.target_modules against the model's modules"
        ) from None
    limit = getattr(config, "max_position_embeddings", None)
    virtual = (cfg.num_virtual_tokens or 0) if cfg.is_prompt_learning else 0
    if limit and spec.data.seq_len + virtual > limit:
        extra = f" + peft.num_virtual_tokens {virtual}" if virtual else ""
        raise SpecError(
            f"data.seq_len {spec.data.seq_len}{extra} exceeds the model's "
            f"max_position_embeddings {limit}; lower data.seq_len"
            + (" or peft.num_virtual_tokens" if virtual else "")
        )
