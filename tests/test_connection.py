"""The one connection path: session caps in every server mode, and what they cost."""

import os
import select
import socket
import subprocess
import sys

import pytest

from conftest import ROOT, replies_of

SERVERS = {"fork": ["--workers", "0"], "prefork": ["--workers", "4"]}


def first_line_within(sock, seconds):
    """The first reply line the server sends within seconds, or b"" when none came."""
    data = b""
    while not data.endswith(b"\r\n"):
        ready, _, _ = select.select([sock], [], [], seconds)
        if not ready:
            return data
        chunk = sock.recv(4096)
        if not chunk:
            break
        data += chunk
    return data


def open_sessions(port, count):
    """count connections, each greeted with 220 before the next is opened."""
    socks = []
    for _ in range(count):
        sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        assert first_line_within(sock, 10).startswith(b"220 "), "not greeted"
        socks.append(sock)
    return socks


@pytest.mark.parametrize("server_mode", SERVERS)
def test_over_the_cap_is_told_421_within_a_second(server_factory, server_mode):
    """--max-sessions 2 (with 4 prefork workers): while two sessions run, each further
    connection gets 421 4.7.0 <hostname> within one second and is closed; none is left
    waiting in the listen backlog."""
    server = server_factory("--max-sessions", "2", *SERVERS[server_mode])
    held = open_sessions(server.port, 2)
    extra = [socket.create_connection(("127.0.0.1", server.port), timeout=10)
             for _ in range(3)]
    for sock in extra:
        line = first_line_within(sock, 1.0)
        assert line == b"421 4.7.0 mx.test too many sessions, closing connection\r\n"
        assert sock.recv(4096) == b""
        sock.close()
    for sock in held:
        sock.close()


def test_prefork_never_runs_more_sessions_than_the_cap(server_factory):
    """--max-sessions 3 --workers 4: the fourth concurrent client is refused, not served."""
    server = server_factory("--max-sessions", "3", "--workers", "4")
    held = open_sessions(server.port, 3)
    fourth = socket.create_connection(("127.0.0.1", server.port), timeout=10)
    assert first_line_within(fourth, 1.0).startswith(b"421 4.7.0 mx.test ")
    for sock in held + [fourth]:
        sock.close()


@pytest.mark.parametrize("server_mode", SERVERS)
def test_per_client_cap_is_half_of_max_sessions_by_default(server_factory, server_mode):
    """--max-sessions 4 and no --max-sessions-per-client: one client outside the relay
    networks holds at most 2 sessions."""
    server = server_factory("--max-sessions", "4", "--relay-networks", "none",
                            *SERVERS[server_mode])
    held = open_sessions(server.port, 2)
    third = socket.create_connection(("127.0.0.1", server.port), timeout=10)
    assert first_line_within(third, 1.0) == (
        b"421 4.7.0 mx.test too many sessions from your address, closing connection\r\n")
    for sock in held + [third]:
        sock.close()


@pytest.mark.parametrize("args", [["--max-sessions", "4"],
                                  ["--max-sessions", "4", "--relay-networks", "none",
                                   "--max-sessions-per-client", "0"]],
                         ids=["relay-network-exempt", "zero-is-off"])
def test_per_client_cap_exemptions(server_factory, args):
    """The relay networks (the loopback by default) are exempt from the per-client cap,
    and 0 turns it off: one client then opens as many sessions as --max-sessions."""
    server = server_factory(*args, "--workers", "2")
    held = open_sessions(server.port, 4)
    fifth = socket.create_connection(("127.0.0.1", server.port), timeout=10)
    assert first_line_within(fifth, 1.0).startswith(b"421 4.7.0 mx.test too many sessions,")
    for sock in held + [fifth]:
        sock.close()


def test_plain_stdin_session_touches_no_shared_file(tmp_path):
    """Under --stdin the per-client cap applies only when set: a plain session writes
    no limits file; an explicit --max-sessions-per-client does."""
    spool = tmp_path / "spool"
    command = [sys.executable, "-m", "netsmtp", "--stdin", "--spool", str(spool),
               "--hostname", "mx.test"]
    env = {**os.environ, "TCPREMOTEIP": "192.0.2.9"}
    result = subprocess.run(command, input=b"QUIT\r\n", capture_output=True, cwd=ROOT,
                            env=env, timeout=30)
    assert [code for code, _ in replies_of(result.stdout)] == [220, 221]
    assert not (spool / "locks" / "limits.json").exists()
    subprocess.run(command + ["--max-sessions-per-client", "1"], input=b"QUIT\r\n",
                   capture_output=True, cwd=ROOT, env=env, timeout=30, check=True)
    assert (spool / "locks" / "limits.json").exists()


@pytest.mark.parametrize("mode", [["--workers", "0"], []], ids=["forked-child", "prefork-master"])
def test_over_the_cap_with_implicit_tls(server_factory, tls_files, mode):
    """--tls-on-connect: a client over the cap is refused inside TLS, as an implicit-TLS
    client expects (RFC 8314): a handshake, then 421 4.7.0.  That holds for a refusal
    by the session's own process and by the prefork master (every worker busy), which
    must not wait for a handshake itself."""
    import ssl

    from conftest import client_context
    ca, cert, key = tls_files
    server = server_factory("--tls-cert", cert, "--tls-key", key, "--tls-on-connect",
                            "--max-sessions", "1", *mode)
    context = client_context(ca)
    first = context.wrap_socket(socket.create_connection(("127.0.0.1", server.port),
                                                         timeout=10), server_hostname="mx.test")
    assert first.recv(4096).startswith(b"220 ")
    second = socket.create_connection(("127.0.0.1", server.port), timeout=10)
    second = context.wrap_socket(second, server_hostname="mx.test")
    assert second.recv(4096) == b"421 4.7.0 mx.test too many sessions, closing connection\r\n"
    for sock in (first, second):
        try:
            sock.close()
        except ssl.SSLError:
            pass
