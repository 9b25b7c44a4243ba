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


def node_ip() -> str:
    import ray

    return ray.util.get_node_ip_address()


def iface_for(ip: str) -> str | None:
    """The network interface that carries `ip`, or None."""
    for name, addrs in psutil.net_if_addrs().items():
        if any(a.family == socket.AF_INET and a.address == ip for a in addrs):
            return name
    return None


def free_port(ip: str) -> int:
    with socket.socket() as s:
        s.bind((ip, 0))
        return s.getsockname()[1]


def rendezvous_store(master_ip: str, master_port: int, world: int, timeout_s: float, serve: bool):
    """The rendezvous's TCPStore: served by rank 0 (`serve`), a client elsewhere. Rank 0 makes it
    before any other rank starts (`WorkerGroup.start`), so the others connect at once: a client
    that finds no server yet retries only after a backoff (measured: 0.7 s of every restart that
    replaced rank 0)."""
    import torch.distributed as dist

    return dist.TCPStore(
        master_ip,
        master_port,
        world,
        is_master=serve,
        timeout=timedelta(seconds=timeout_s),
        wait_for_workers=False,
    )


def init_process_group(
    backend: str, store, rank: int, world: int, timeout_s: float, my_ip: str
) -> None:
    """Join the default process group through `store` (see `rendezvous_store`)."""
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
