"""Staging the job's inputs at launch, so that no worker ever reads a path of the driver's.

Contract: `model_dir(spec, tmp)` is a local directory holding the base model: the built-in model
built into `tmp`, `model.path` itself when local (UserError naming the field when it is not a
directory), or `model.path`'s files fetched through fsspec into `tmp` when it is a URI.
`stage(rundir, spec, tmp, model=None, data=None)` publishes into the run directory what it does
not hold yet: the base model (`base_model/`) and the prepared sets (`data/`: `data` is the folder
`inputs.check_data` made, prepared now when None), each with a
manifest written last (`rundir.staged`). It is idempotent: a resumed run whose staged inputs are
whole reads nothing of the user's, so its input files may be gone.
"""

from __future__ import annotations

import os

from resilient.config import JobSpec
from resilient.errors import UserError
from resilient.rundir import RunDir, staged
from resilient.rundir.layout import BASE_MODEL, DATA


def model_dir(spec: JobSpec, tmp: str) -> str:
    path = spec.model.path
    if spec.model.builtin:
        from resilient.training.data import BYTE_VOCAB
        from resilient.training.model import build_tiny_llama
        from resilient.training.tiny_chat import build_tiny_chat_model

        out = os.path.join(tmp, "base")
        if not os.path.isdir(out):
            if spec.model.builtin == "tiny-llama-chat":
                build_tiny_chat_model(out)
            else:
                build_tiny_llama(out, BYTE_VOCAB)
        return out
    if "://" not in path:
        if not os.path.isdir(path):
            raise UserError(
                f"model.path {path!r} is not a directory; give a Hugging Face model directory "
                "(local, or an fsspec URI such as s3://bucket/model)"
            )
        return path
    return _download(path, os.path.join(tmp, "base"))


def _download(uri: str, out: str) -> str:
    import fsspec

    try:
        fs, root = fsspec.core.url_to_fs(uri)
        names = [p for p in fs.ls(root, detail=False) if fs.isfile(p)]
        if not names:
            raise FileNotFoundError(f"no files under {uri}")
        os.makedirs(out, exist_ok=True)
        fs.get(names, out + "/")
    except Exception as e:  # any filesystem's refusal, spelled its own way
        raise UserError(
            f"model.path {uri!r} cannot be read ({type(e).__name__}: {str(e)[:200]}); give a "
            "Hugging Face model directory that fsspec can list, with its credentials"
        ) from None
    return out


def stage(rundir: RunDir, spec: JobSpec, tmp: str, model: str | None = None, data=None) -> None:
    if not staged.published(rundir, BASE_MODEL):
        model = model or model_dir(spec, tmp)
        staged.publish(rundir, model, BASE_MODEL)
    if not staged.published(rundir, DATA):
        from resilient.launcher.inputs import check_data

        if data is None:
            data, _ = check_data(spec, model or staged.local_dir(rundir, BASE_MODEL), tmp)
        staged.publish(rundir, data, DATA)
