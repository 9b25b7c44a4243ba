import socket

import logging

import pytest

logging.getLogger("werkzeug").setLevel(logging.ERROR)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class S3Server:
    """moto's S3 server on loopback, stoppable mid-test (its buckets live on in this process)."""

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

    def fs(self):
        import s3fs

        return s3fs.S3FileSystem(client_kwargs={"endpoint_url": self.endpoint}, skip_instance_cache=True)


@pytest.fixture
def s3(monkeypatch):
    import boto3

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "test")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "test")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    server = S3Server()
    server.start()
    monkeypatch.setenv("FSSPEC_S3", '{"client_kwargs": {"endpoint_url": "%s"}}' % server.endpoint)
    boto3.client("s3", endpoint_url=server.endpoint).create_bucket(Bucket="runs")
    yield server
    server.stop()
