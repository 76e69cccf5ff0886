"""The shared test helpers: they fail rather than hang, and read what the server wrote."""

import io
import socket
import sys

import pytest

from conftest import ServerProcess, read_reply


class Silent(ServerProcess):
    """A "server" that never prints its listening line and never exits by itself."""

    START_TIMEOUT = 0.5
    command = (sys.executable, "-c", "import time; time.sleep(120)")


def test_server_start_gives_up_on_a_silent_child():
    """A child that prints nothing fails the start after START_TIMEOUT, and is killed."""
    with pytest.raises(RuntimeError, match="did not start within 0.5s"):
        Silent([])


def test_read_reply_from_a_file_and_a_socket():
    """read_reply takes a multi-line reply from a file or a socket, leaving what follows."""
    data = b"250-mx.test greets c.test\r\n250 HELP\r\n220 next\r\n"
    assert read_reply(io.BytesIO(data)) == (250, ["250-mx.test greets c.test", "250 HELP"])
    ours, theirs = socket.socketpair()
    with ours, theirs:
        theirs.sendall(data)
        assert read_reply(ours)[0] == 250
        assert ours.recv(100) == b"220 next\r\n"
        theirs.close()
        with pytest.raises(EOFError):
            read_reply(ours)
