"""The dashboard's port: never Ray's dashboard's 8265 by default, the next free one when its own
default is taken, and a clear error when the port the user named is taken."""

import socket

import pytest

from resilient.dashboard.app import DEFAULT_PORT, pick_port
from resilient.errors import UserError

pytestmark = pytest.mark.timeout(30)


def test_default_is_not_rays_and_moves_on_when_taken():
    assert DEFAULT_PORT != 8265
    with socket.socket() as held:
        try:
            held.bind(("127.0.0.1", DEFAULT_PORT))
        except OSError:
            pass  # taken already: all the better
        assert pick_port("127.0.0.1", None) > DEFAULT_PORT


def test_a_named_port_that_is_taken_is_an_error():
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        with pytest.raises(UserError, match=f"--port {port}"):
            pick_port("127.0.0.1", port)
