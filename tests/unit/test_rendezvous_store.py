"""The rendezvous store (agents.store): rank 0's keys, reached through a call (Ray's, in a job):
a get waits for its key, add and compare_set are atomic, and gloo rendezvouses through it."""

from __future__ import annotations

import threading
import time
from datetime import timedelta

import pytest

from resilient.agents.store import KeyValue, ray_store

pytestmark = pytest.mark.timeout(60)


def test_key_value_waits_adds_and_compares():
    kv = KeyValue()
    assert kv.get("a", wait_s=0.05) is None  # a missing key: the caller asks again
    threading.Timer(0.1, kv.set, ("a", b"1")).start()
    assert kv.get("a", wait_s=5) == b"1"
    assert [kv.add("n", 2), kv.add("n", 3)] == [2, 5]
    assert kv.compare_set("c", b"", b"x") == b"x" and kv.compare_set("c", b"y", b"z") == b"x"
    assert kv.check(["a", "n"]) and not kv.check(["a", "zz"])
    assert kv.delete_key("a") and not kv.delete_key("a") and kv.num_keys() == 2


def test_a_store_get_gives_up_at_its_timeout():
    kv = KeyValue()

    def call(op, *args):  # a get that waits 0.05 s a call, not a second
        return kv.get(args[0], 0.05) if op == "get" else getattr(kv, op)(*args)

    store = ray_store(call, 0.3)
    t0 = time.monotonic()
    with pytest.raises(TimeoutError, match="not set within"):
        store.get("never")
    assert time.monotonic() - t0 < 3
    store.set("k", "v")
    assert store.get("k") == b"v"
    with pytest.raises(TimeoutError):
        store.wait(["k", "missing"], timedelta(seconds=0.2))


def test_gloo_rendezvouses_through_it():
    import torch
    import torch.distributed as dist

    kv = KeyValue()
    store = ray_store(lambda op, *args: getattr(kv, op)(*args), 10)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        x = torch.ones(2)
        dist.all_reduce(x)
        assert x.tolist() == [1.0, 1.0] and kv.num_keys() > 0
    finally:
        dist.destroy_process_group()
