"""ComPEFT (Yadav et al., 2023): a trained adapter kept as a sparse, ternary update of its initial
state.

Contract: `compress(dense, init, density)` keeps, for each tensor (in name order), the `density`
fraction of entries where the update `dense - init` is largest in magnitude: a bit mask of their
positions, a bit for each one's sign, and one scale per tensor, chosen so the packed update keeps
the whole update's L2 norm (`norm / sqrt(kept)`: the least-squares scale, the mean kept magnitude,
shrinks the update and costs more eval loss; docs/benchmarks.md). All tensors' bits are packed
into one uint8 tensor `bits` and the scales into one float32 tensor `scales`, so the file holds two
entries however large the adapter.
`expand(packed, init)` inverts it: `init + scale * sign` on the kept positions, `init` elsewhere, in
init's dtypes. Names, shapes and dtypes come from `init`, which `digest` pins: an expansion against
another initial state is refused by the caller, never silently wrong.
"""

from __future__ import annotations

import hashlib
import math

import numpy as np
import torch


def compress(
    dense: dict[str, torch.Tensor], init: dict[str, torch.Tensor], density: float
) -> dict[str, torch.Tensor]:
    if sorted(dense) != sorted(init):
        raise ValueError("the adapter and its initial state hold different tensors")
    bits, scales = [], []
    for name in sorted(init):
        delta = (dense[name].float() - init[name].float()).flatten()
        keep = torch.zeros(delta.numel(), dtype=torch.bool)
        if delta.numel():
            keep[delta.abs().topk(max(1, math.ceil(density * delta.numel()))).indices] = True
        keep &= delta != 0  # an unchanged entry carries nothing
        kept = delta[keep]
        scales.append(delta.norm() / math.sqrt(kept.numel()) if kept.numel() else torch.zeros(()))
        bits += [np.packbits(keep.numpy()), np.packbits((kept > 0).numpy())]
    return {
        "bits": torch.from_numpy(np.concatenate(bits)),
        "scales": torch.stack(scales).float(),
    }


def expand(
    packed: dict[str, torch.Tensor], init: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    blob, scales = packed["bits"].numpy(), packed["scales"]
    if scales.numel() != len(init):
        raise ValueError(f"{scales.numel()} packed tensors for an adapter of {len(init)}")
    out, at = {}, 0

    def bits(count: int) -> np.ndarray:
        nonlocal at
        size = (count + 7) // 8
        if at + size > blob.size:  # numpy's unpackbits would make up the missing bits
            raise ValueError(f"packed bits: {blob.size} bytes, too few for this adapter")
        at += size
        return np.unpackbits(blob[at - size : at], count=count)

    for i, name in enumerate(sorted(init)):
        keep = bits(init[name].numel()).astype(bool)
        signs = bits(int(keep.sum())).astype(np.float32) * 2 - 1
        values = init[name].float().flatten().clone()
        values[torch.from_numpy(keep)] += scales[i] * torch.from_numpy(signs)
        out[name] = values.reshape(init[name].shape).to(init[name].dtype)
    if at != blob.size:
        raise ValueError(f"packed bits: {blob.size} bytes where this adapter needs {at}")
    return out


def digest(tensors: dict[str, torch.Tensor]) -> str:
    """A content hash of named tensors (names, dtypes, shapes and bytes)."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()
