"""Process-group rendezvous that works where the hostname resolves to an unreachable address.

Contract: every address used is the IP Ray reports for the node, never the hostname; gloo and nccl
are pinned to the network interface that carries that IP (GLOO_SOCKET_IFNAME, NCCL_SOCKET_IFNAME
for nccl's bootstrap and socket transport), unless the user set one. `leave_process_group()` ends
this process's membership so it can join a new rendezvous: a broken nccl group is aborted (its
kernels may never return), any other destroyed (closing its connections, which frees peers
blocked on this process).
"""

from __future__ import annotations

import os
import socket
from datetime import timedelta

import psutil


def backend_of(cluster) -> str:
    """`cluster.backend`, with "auto" = nccl when the workers have GPUs, else gloo."""
    if cluster.backend == "auto":
        return "nccl" if cluster.resources_per_worker.get("GPU", 0) > 0 else "gloo"
    return cluster.backend


def device_of(cluster):
    """The torch device a rank trains on: its (only visible) GPU under nccl, else the CPU."""
    import torch

    return torch.device("cuda", 0) if backend_of(cluster) == "nccl" else torch.device("cpu")


def node_ip() -> str:
    import ray

    return ray.util.get_node_ip_address()


def iface_for(ip: str) -> str | None:
    """The network interface that carries `ip`, or None."""
    for name, addrs in psutil.net_if_addrs().items():
        if any(a.family == socket.AF_INET and a.address == ip for a in addrs):
            return name
    return None


def init_process_group(
    backend: str, store, rank: int, world: int, timeout_s: float, my_ip: str
) -> None:
    """Join the default process group through `store` (agents.store: rank 0's keys, over Ray)."""
    import torch.distributed as dist

    var = {"gloo": "GLOO_SOCKET_IFNAME", "nccl": "NCCL_SOCKET_IFNAME"}.get(backend)
    if var and var not in os.environ:
        iface = iface_for(my_ip) or ("lo" if my_ip.startswith("127.") else None)
        if iface:
            os.environ[var] = iface
    if backend == "nccl":
        # A collective blocked on a dead peer must raise (so the rank reports and the supervisor
        # acts), not hang the CUDA stream forever.
        os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")
    dist.init_process_group(
        backend, store=store, rank=rank, world_size=world, timeout=timedelta(seconds=timeout_s)
    )


def leave_process_group(backend: str, broken: bool) -> None:
    import torch.distributed as dist
    from torch.distributed import distributed_c10d

    if not dist.is_initialized():
        return
    abort = getattr(distributed_c10d, "_abort_process_group", None)
    if broken and backend == "nccl" and abort is not None:
        abort()
    if dist.is_initialized():
        dist.destroy_process_group()
