"""Stalling the pool: clients that make a session wait, then leave or trickle.

End to end against a real server with --max-sessions 2: a delay must never
outlive its client, and DATA has a deadline on every line.
"""

import base64
import select
import socket

import pytest

from conftest import wait_for
from netsmtp.auth import hash_password

# --workers 2: the pool may not outgrow the two sessions anyway.
SERVERS = {"fork": ["--workers", "0"], "prefork": ["--workers", "2"]}


def connect(port):
    return socket.create_connection(("127.0.0.1", port), timeout=10)


def lines_within(sock, count, seconds):
    """Up to count reply lines that arrive within seconds of each other."""
    data = b""
    while data.count(b"\r\n") < count:
        ready, _, _ = select.select([sock], [], [], seconds)
        if not ready:
            break
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    return data.split(b"\r\n")[:-1]


def until(sock, prefix, seconds):
    """Reply lines up to the first that starts with prefix (none arriving for seconds: [])."""
    lines = []
    while not (lines and lines[-1].startswith(prefix)):
        more = lines_within(sock, 1, seconds)
        if not more:
            return []
        lines += more
    return lines


def greeted_within_a_second(port):
    sock = connect(port)
    try:
        return lines_within(sock, 1, 1.0)[:1] == [b"220 mx.test ESMTP netsmtp ready"]
    finally:
        sock.close()


@pytest.mark.parametrize("lines", [20, 20000], ids=["20-lines", "140-KB"])
@pytest.mark.parametrize("server_mode", SERVERS)
def test_junk_clients_that_hang_up_free_the_pool(server_factory, server_mode, lines):
    """Two clients pipeline junk lines (the tarpit's prey), read what is answered at
    once and hang up: a third client is greeted within a second.  That holds also when
    they send more than a pause reads ahead, so their end waits behind unread input."""
    server = server_factory("--max-sessions", "2", *SERVERS[server_mode])
    for _ in range(2):
        sock = connect(server.port)
        assert lines_within(sock, 1, 10)
        sock.sendall(b"XYZZY\r\n" * lines)
        assert len(lines_within(sock, 10, 3)) >= 3  # the free refusals
        sock.close()
    assert greeted_within_a_second(server.port)


@pytest.mark.parametrize("server_mode", SERVERS)
def test_abandoned_auth_guesses_free_the_pool(server_factory, server_mode, tmp_path):
    """Two clients each send a wrong password and hang up while the server makes them
    wait (--auth-fail-delay 5): a third client is greeted within a second."""
    users = tmp_path / "users"
    users.write_text("alice:%s\n" % hash_password("right"))
    server = server_factory("--max-sessions", "2", "--auth-file", str(users),
                            "--auth-plaintext", "--auth-fail-delay", "5",
                            *SERVERS[server_mode])
    guess = base64.b64encode(b"\0alice\0wrong")
    for number in range(1, 3):
        sock = connect(server.port)
        assert lines_within(sock, 1, 10)
        sock.sendall(b"EHLO guesser.test\r\nAUTH PLAIN " + guess + b"\r\n")
        wait_for(lambda number=number: "(failure %d, delay" % number in server.output(),
                 what="the server to hold the guess")
        sock.close()
    assert greeted_within_a_second(server.port)


@pytest.mark.parametrize("server_mode", SERVERS)
def test_trickled_data_is_cut_off_at_the_line_deadline(server_factory, server_mode):
    """--timeout 1: a client that sends message text a byte at a time, each well within
    the timeout but no line within it, gets 421 4.4.2 and is closed, long before
    --session-timeout; meanwhile its slot was the only one it held."""
    server = server_factory("--max-sessions", "2", "--timeout", "1",
                            "--session-timeout", "300", *SERVERS[server_mode])
    sock = connect(server.port)
    assert lines_within(sock, 1, 10)
    sock.sendall(b"EHLO slow.test\r\nMAIL FROM:<a@slow.test>\r\nRCPT TO:<u@mx.test>\r\nDATA\r\n")
    assert until(sock, b"354 ", 10)
    reply = b""
    for _ in range(100):  # 100 x 0.2 s: 20 s, far below the session timeout
        try:
            sock.send(b"x")
        except OSError:
            break
        ready, _, _ = select.select([sock], [], [], 0.2)
        if ready:
            reply = sock.recv(4096)
            break
    assert reply == b"421 4.4.2 mx.test idle for too long, closing connection\r\n"
    assert sock.recv(4096) == b""
    sock.close()


def test_second_auth_of_a_client_waits_for_none(server_factory, tmp_path):
    """While one session of a client is inside an AUTH LOGIN exchange (waiting for the
    client's password), an AUTH from another session of the same client gets 454 4.7.0;
    once the first is over, AUTH works again."""
    users = tmp_path / "users"
    users.write_text("alice:%s\n" % hash_password("right"))
    server = server_factory("--auth-file", str(users), "--auth-plaintext")
    first = connect(server.port)
    assert lines_within(first, 1, 10)
    first.sendall(b"EHLO one.test\r\nAUTH LOGIN\r\n")
    assert until(first, b"334 ", 10)[-1] == b"334 VXNlcm5hbWU6"
    second = connect(server.port)
    assert lines_within(second, 1, 10)
    second.sendall(b"EHLO two.test\r\nAUTH PLAIN " + base64.b64encode(b"\0alice\0right")
                   + b"\r\n")
    assert until(second, b"454 ", 10)[-1] == b"454 4.7.0 Temporary authentication failure"
    first.sendall(base64.b64encode(b"alice") + b"\r\n" + base64.b64encode(b"right") + b"\r\n")
    assert lines_within(first, 2, 10)[-1] == b"235 2.7.0 Authentication successful"
    second.sendall(b"AUTH PLAIN " + base64.b64encode(b"\0alice\0right") + b"\r\n")
    assert lines_within(second, 1, 10) == [b"235 2.7.0 Authentication successful"]
    first.close()
    second.close()


def test_trickled_bdat_chunk_is_cut_off_too(server_factory):
    """A BDAT chunk trickled a byte at a time gets DATA's deadline: 421 4.4.2 once a
    line's worth (1000 octets) has not come within --timeout."""
    server = server_factory("--timeout", "1", "--session-timeout", "300")
    sock = connect(server.port)
    assert lines_within(sock, 1, 10)
    sock.sendall(b"EHLO slow.test\r\nMAIL FROM:<a@slow.test>\r\nRCPT TO:<u@mx.test>\r\n")
    assert until(sock, b"250 2.1.5", 10)
    sock.sendall(b"BDAT 100000 LAST\r\n")
    reply = b""
    for _ in range(100):
        try:
            sock.send(b"x")
        except OSError:
            break
        ready, _, _ = select.select([sock], [], [], 0.2)
        if ready:
            reply = sock.recv(4096)
            break
    assert reply == b"421 4.4.2 mx.test idle for too long, closing connection\r\n"
    sock.close()
