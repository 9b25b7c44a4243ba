"""GradCapture: DDP's own all-reduce, with a look at a rank's local gradients on the way.

Contract: `GradCapture(ddp, params, unused)` registers itself as the DDP communication hook. It
reduces every bucket as DDP's own `allreduce_hook` does (divide by the world, then sum, one
all-reduce per DDP bucket). It is registered on every step, checked or not, so every step of a
run reduces alike and a checked step trains the update an unchecked one would, to the bit, at any
world size. While `armed`, it first keeps a copy of each bucket's local gradients; `digest()` then
gives `integrity.digest` of them in `params` order (None for the `unused` names and for
parameters no bucket carried), which is what the rank's own gradient digest is when its only
microbatch is also the one DDP reduces, and disarms.

Why a hook rather than all-reducing by hand: a ring all-reduce's sum order depends on where an
element sits in the buffer, so a flat buffer of our own differs from DDP's buckets in the last
bit at 3+ ranks, and a checked step would train a different adapter than an unchecked one.
(DDP without any hook scales by 1/world as it copies into the bucket: not the same last bit as
dividing afterwards, which is why the hook is always there rather than only on checked steps.)
"""

import torch
import torch.distributed as dist
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

from resilient.training.integrity import digest


class GradCapture:  # no `from __future__ import annotations`: DDP reads the hook's annotations
    def __init__(self, ddp, params: list[torch.nn.Parameter], unused: set[int]):
        self.params, self.unused = params, unused  # unused: ids of parameters without gradient
        self.armed = False
        self._seen: dict[int, torch.Tensor] = {}
        ddp.register_comm_hook(None, self._hook)

    def _hook(self, state, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
        if self.armed:
            for p, g in zip(bucket.parameters(), bucket.gradients(), strict=True):
                self._seen[id(p)] = g.detach().clone()
        return allreduce_hook(state, bucket)

    def digest(self) -> int:
        seen, self._seen, self.armed = self._seen, {}, False
        return digest(None if id(p) in self.unused else seen.get(id(p)) for p in self.params)
