import logging
import socket
import threading

import pytest

logging.getLogger("werkzeug").setLevel(logging.ERROR)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class TcpGate:
    """A TCP forwarder on loopback in front of a server.

    `close()` drops every connection and refuses new ones (a real outage from the client's side,
    kept-alive connections included); `open()` ends it.
    """

    def __init__(self, target_port: int):
        self.target, self.port = target_port, free_port()
        self.conns: list[socket.socket] = []
        self.listener = None
        self.lock = threading.Lock()

    def open(self):
        ls = socket.socket()
        ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        ls.bind(("127.0.0.1", self.port))
        ls.listen(64)
        self.listener = ls
        threading.Thread(target=self._accept, args=(ls,), daemon=True).start()

    def _accept(self, ls):
        while True:
            try:
                client, _ = ls.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target))
            except OSError:
                client.close()
                continue
            with self.lock:
                self.conns += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(src, dst):
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self):
        if self.listener:
            try:  # shutdown() wakes the thread blocked in accept(); close() alone would not
                self.listener.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            self.listener.close()
            self.listener = None
        with self.lock:
            conns, self.conns = self.conns, []
        for c in conns:
            try:
                c.shutdown(socket.SHUT_RDWR)
                c.close()
            except OSError:
                pass


class S3Server:
    """moto's S3 server on loopback, stoppable mid-test (its buckets live on in this process).

    Stopping it refuses new connections; connections the client keeps alive may still be served
    (werkzeug finishes them), so an outage is felt by every new request, not necessarily by all.
    `TcpGate` above cuts every connection: the outage tests put the job behind one."""

    def __init__(self):
        from moto.server import ThreadedMotoServer

        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self._cls = ThreadedMotoServer
        self.server = None

    def start(self):
        self.server = self._cls(ip_address="127.0.0.1", port=self.port)
        self.server.start()

    def stop(self):
        if self.server:
            self.server.stop()
            self.server = None

    def shutdown(self):
        self.stop()

    def fs(self):
        import s3fs

        return s3fs.S3FileSystem(
            client_kwargs={"endpoint_url": self.endpoint}, skip_instance_cache=True
        )


@pytest.fixture
def s3(monkeypatch):
    import boto3

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "test")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "test")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    server = S3Server()
    server.start()
    monkeypatch.setenv("FSSPEC_S3", f'{{"client_kwargs": {{"endpoint_url": "{server.endpoint}"}}}}')
    boto3.client("s3", endpoint_url=server.endpoint).create_bucket(Bucket="runs")
    yield server
    server.shutdown()
