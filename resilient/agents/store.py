"""The rendezvous store: a torch.distributed Store kept in rank 0's worker, reached through Ray.

Why not TCPStore: c10d formats the address of every socket it connects or accepts with
getnameinfo, a reverse DNS lookup, and where the node's resolver does not answer that blocks for the
resolver's whole timeout (5 s x 2 attempts by default) on every rendezvous, at every restart:
measured on the namespace cluster, a restart that took 10.3 s instead of 0.3 s. Through Ray there
is no new connection, port or name: the calls use the channels Ray already has to rank 0.

Contract: `KeyValue()` holds one rendezvous's keys (thread-safe): `set`, `get` (waits up to
POLL_S for a missing key, then answers None: the caller asks again), `add`, `compare_set`,
`check`, `delete_key`, `num_keys`. `ray_store(call, timeout_s)` is a `torch.distributed.Store`
whose operations go through `call(op, *args)` (rank 0: its own KeyValue; the others: a Ray call to
rank 0's worker); `get` and `wait` ask again until the store's timeout, then raise. This module
imports torch only in `ray_store` (a spare's actor module must not: see agents.warmup).
"""

from __future__ import annotations

import functools
import threading
import time
from collections.abc import Callable
from datetime import timedelta

POLL_S = 1.0  # a waiting get holds a server thread at most this long per call
CALL_S = 30.0  # beyond POLL_S, how long a call to rank 0 may take before the rendezvous fails


class KeyValue:
    def __init__(self) -> None:
        self._data: dict[str, bytes] = {}
        self._cond = threading.Condition()

    def set(self, key: str, value: bytes) -> None:
        with self._cond:
            self._data[key] = value
            self._cond.notify_all()

    def get(self, key: str, wait_s: float = POLL_S) -> bytes | None:
        with self._cond:
            self._cond.wait_for(lambda: key in self._data, timeout=wait_s)
            return self._data.get(key)

    def add(self, key: str, amount: int) -> int:
        with self._cond:
            value = int(self._data.get(key, b"0")) + amount
            self._data[key] = str(value).encode()
            self._cond.notify_all()
            return value

    def compare_set(self, key: str, expected: bytes, desired: bytes) -> bytes:
        with self._cond:
            current = self._data.get(key)
            if current == expected or (current is None and expected == b""):
                self._data[key] = desired
                self._cond.notify_all()
                return desired
            return expected if current is None else current

    def check(self, keys: list[str]) -> bool:
        with self._cond:
            return all(k in self._data for k in keys)

    def delete_key(self, key: str) -> bool:
        with self._cond:
            return self._data.pop(key, None) is not None

    def num_keys(self) -> int:
        with self._cond:
            return len(self._data)


def _bytes(value) -> bytes:
    return value.encode() if isinstance(value, str) else bytes(value)


def on_worker(master) -> Callable:
    """`call` for a rank other than 0: each operation a Ray call to rank 0's worker `master`
    (its `kv` method; a get may wait there up to POLL_S)."""
    import ray

    def call(op: str, *args):
        return ray.get(master.kv.remote(op, *args), timeout=POLL_S + CALL_S)

    return call


def ray_store(call: Callable, timeout_s: float):
    """A torch.distributed Store over `call(op, *args)` (see the module contract)."""
    return _store_class()(call, timeout_s)


@functools.cache
def _store_class():
    import torch.distributed as dist

    class RayStore(dist.Store):
        def __init__(self, call: Callable, timeout_s: float):
            super().__init__()
            self.call, self.timeout_s = call, timeout_s

        def set_timeout(self, timeout: timedelta) -> None:
            self.timeout_s = timeout.total_seconds()

        def set(self, key: str, value) -> None:
            self.call("set", key, _bytes(value))

        def get(self, key: str) -> bytes:
            deadline = time.monotonic() + self.timeout_s
            while True:
                value = self.call("get", key)
                if value is not None:
                    return value
                if time.monotonic() > deadline:
                    raise TimeoutError(
                        f"rendezvous: key {key!r} not set within {self.timeout_s:g}s"
                    )

        def add(self, key: str, amount: int) -> int:
            return self.call("add", key, amount)

        def compare_set(self, key: str, expected, desired) -> bytes:
            return self.call("compare_set", key, _bytes(expected), _bytes(desired))

        def wait(self, keys: list[str], timeout: timedelta | None = None) -> None:
            limit = timeout.total_seconds() if timeout is not None else self.timeout_s
            deadline = time.monotonic() + limit
            for key in keys:
                while (
                    self.call("get", key, min(POLL_S, max(0.0, deadline - time.monotonic())))
                    is None
                ):
                    if time.monotonic() > deadline:
                        raise TimeoutError(f"rendezvous: key {key!r} not set within {limit:g}s")

        def check(self, keys: list[str]) -> bool:
            return self.call("check", list(keys))

        def delete_key(self, key: str) -> bool:
            return self.call("delete_key", key)

        def num_keys(self) -> int:
            return self.call("num_keys")

    return RayStore
