"""A training state in host memory and its serialised form.

Contract: a `Snapshot` holds everything needed to continue training bit for bit: adapter weights,
optimizer and scheduler state and the data position. All of it is `shared` by the ranks (DDP keeps
it equal on every rank, and random draws are seeded per step), so any rank's copy restores every
rank. `to_files()` gives safetensors and JSON bytes only; `Snapshot.from_files()` reads them back
without executing anything from them (no pickle).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import torch
from safetensors.numpy import save as np_save
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

SHARED = "shared.safetensors"
META = "meta.json"


@dataclass
class Snapshot:
    """State after `step` finished: `shared` tensors (adapter, optimizer) and JSON `meta`."""

    step: int
    data_step: int
    shared: dict[str, torch.Tensor]
    meta: dict[str, Any] = field(default_factory=dict)

    def to_files(self) -> dict[str, bytes]:
        meta = {**self.meta, "step": self.step, "data_step": self.data_step}
        return {SHARED: tensor_bytes(self.shared), META: json.dumps(meta, sort_keys=True).encode()}

    @classmethod
    def from_files(cls, files: dict[str, bytes]) -> Snapshot:
        meta = json.loads(files[META])
        return cls(
            step=meta["step"], data_step=meta["data_step"], shared=st_load(files[SHARED]), meta=meta
        )

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.shared.values())


# dtypes numpy holds as they are (not bfloat16 nor the float8s)
NUMPY_TWINS = {
    torch.float64,
    torch.float32,
    torch.float16,
    torch.int64,
    torch.int32,
    torch.int16,
    torch.int8,
    torch.uint8,
    torch.bool,
}


def tensor_bytes(tensors: dict[str, torch.Tensor]) -> bytes:
    """The safetensors file of `tensors` (contiguous, in host memory). Through safetensors' numpy
    front end where every dtype has a numpy twin: the same bytes in a quarter of the time (its torch
    front end builds a ctypes array per tensor: ~1 ms for an adapter's 32 tensors, on rank 0's
    hand-off thread, which holds the interpreter the training thread needs)."""
    if all(t.dtype in NUMPY_TWINS and t.is_cpu and not t.requires_grad for t in tensors.values()):
        return np_save({k: t.numpy() for k, t in tensors.items()})
    return st_save(tensors)


def host_copy(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Detached, contiguous CPU copies (the only part of a checkpoint that blocks training).

    CUDA tensors are copied into pinned host buffers on a side stream that first waits for the
    training stream (so it copies the finished step), and the call blocks only until those copies
    are done. Pinned buffers come from torch's caching host allocator, so after the first
    snapshot no page is pinned anew."""
    cuda = [v for v in tensors.values() if v.is_cuda]
    if not cuda:
        return {k: _cpu_copy(v.detach()) for k, v in tensors.items()}
    device = cuda[0].device
    stream = _side_stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    out = {}
    with torch.cuda.stream(stream):
        for k, v in tensors.items():
            if v.is_cuda:
                out[k] = torch.empty(v.shape, dtype=v.dtype, pin_memory=True)
                out[k].copy_(v.detach(), non_blocking=True)
            else:
                out[k] = _cpu_copy(v.detach())
    stream.synchronize()
    return out


def _cpu_copy(v: torch.Tensor) -> torch.Tensor:
    """A contiguous copy in host memory: one call where `v` is there already (to(copy=True) then
    contiguous() are two, a third more time for the many small tensors of an adapter)."""
    if v.is_cpu:
        return v.clone(memory_format=torch.contiguous_format)
    return v.to("cpu", copy=True).contiguous()


_STREAMS: dict[torch.device, torch.cuda.Stream] = {}


def _side_stream(device: torch.device) -> torch.cuda.Stream:
    if device not in _STREAMS:
        _STREAMS[device] = torch.cuda.Stream(device)
    return _STREAMS[device]


def optimizer_parts(state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split `optimizer.state_dict()` into tensors (`optim.<pid>.<key>`) and JSON (groups,
    scalars)."""
    tensors, scalars = {}, {}
    for pid, entry in state["state"].items():
        for k, v in entry.items():
            if isinstance(v, torch.Tensor):
                tensors[f"optim.{pid}.{k}"] = v
            else:
                scalars[f"{pid}.{k}"] = v
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def optimizer_state(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    """Inverse of `optimizer_parts`: a state dict for `optimizer.load_state_dict`, on copies: the
    optimizer updates its state in place, and the snapshot (a survivor's own) must not change."""
    state: dict[int, dict[str, Any]] = {}
    for key, v in tensors.items():
        if key.startswith("optim."):
            _, pid, k = key.split(".", 2)
            state.setdefault(int(pid), {})[k] = v.clone()
    for key, v in meta.get("scalars", {}).items():
        pid, k = key.split(".", 1)
        state.setdefault(int(pid), {})[k] = v
    return {"state": state, "param_groups": meta["param_groups"]}
