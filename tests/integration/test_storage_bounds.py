"""Object-store calls are bounded in time: a store that accepts connections but never answers (a
half-open connection after a network fault) makes RunDir raise, instead of blocking its caller
forever, and the same RunDir works again once the store answers."""

import socket
import threading
import time

import pytest
from fsspec.exceptions import FSTimeoutError

import resilient.rundir.fs as rundir_mod
from resilient.rundir import RunDir


class Blackhole:
    """Accepts TCP connections and reads whatever is sent, never answers."""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        self.conns: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                c, _ = self.sock.accept()
            except OSError:
                return
            self.conns.append(c)
            threading.Thread(target=self._drain, args=(c,), daemon=True).start()

    @staticmethod
    def _drain(c):
        try:
            while c.recv(65536):
                pass
        except OSError:
            pass

    def close(self):
        self.sock.close()
        for c in self.conns:
            c.close()


@pytest.mark.timeout(120)
def test_calls_on_a_silent_store_raise_within_the_bound(s3, monkeypatch):
    monkeypatch.setattr(rundir_mod, "OP_TIMEOUT_S", 2.0)
    hole = Blackhole()
    try:
        rd = RunDir(
            "s3://runs/bounded",
            {"client_kwargs": {"endpoint_url": f"http://127.0.0.1:{hole.port}"}},
        )
        for call in (
            lambda: rd.write_bytes("journal.jsonl", b"x" * 1000),
            lambda: rd.exists("spec.json"),
            lambda: rd.listdir("checkpoints"),
        ):
            t0 = time.time()
            with pytest.raises((FSTimeoutError, TimeoutError)):
                call()
            assert time.time() - t0 < 10, "a call on a silent store was not bounded"
    finally:
        hole.close()
    # the real store, through the same code path: works
    rd = RunDir("s3://runs/bounded", {"client_kwargs": {"endpoint_url": s3.endpoint}})
    rd.write_bytes("a.json", b"{}")
    assert rd.read_json("a.json") == {} and rd.exists("a.json")


def test_s3_defaults_keep_the_users_choices(monkeypatch):
    from resilient.rundir.fs import S3_CLIENT_DEFAULTS, storage_socket, with_s3_defaults

    assert with_s3_defaults("file:///tmp/x", {}) == {}
    got = with_s3_defaults("s3://b/x", {"config_kwargs": {"read_timeout": 300}})
    connector = got["config_kwargs"].pop("connector_args")
    assert got["config_kwargs"] == {**S3_CLIENT_DEFAULTS, "read_timeout": 300}
    assert connector == {"socket_factory": storage_socket}  # sockets that give up on a dead link
