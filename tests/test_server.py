"""The daemon against real clients: smtplib, swaks and raw sockets on port 0.

Client-facing behaviour is checked under both servers (the ForkingTCPServer,
--workers 0, and the prefork pool); the SIGTERM tests pin the forking
server's (tests/test_prefork.py has the pool's).
"""

import os
import signal
import smtplib
import socket
import subprocess
import threading

import pytest

from conftest import children, entries_of, need_tool, read_reply, wait_for


class Client:
    """A raw SMTP client: send bytes, read whole replies."""

    def __init__(self, port):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.file = self.sock.makefile("rb")

    def send(self, data):
        self.sock.sendall(data)

    def reply(self):
        return read_reply(self.file)

    def close(self):
        self.file.close()
        self.sock.close()


SERVERS = {"forking": ["--workers", "0"], "prefork": ["--workers", "2"]}


@pytest.fixture(params=SERVERS.values(), ids=SERVERS.keys())
def server_flags(request):
    return request.param


@pytest.fixture
def server(server_factory, server_flags):
    return server_factory(*server_flags)


@pytest.fixture
def forking(server_factory):
    return server_factory(*SERVERS["forking"])


def test_smtplib_message_is_spooled_with_the_client_address(server):
    """smtplib's sendmail lands one entry whose client is the connection's address."""
    with smtplib.SMTP("127.0.0.1", server.port, timeout=10) as client:
        code, _ = client.ehlo("client.test")
        assert code == 250 and client.has_extn("pipelining") and client.has_extn("size")
        refused = client.sendmail("a@client.test", ["u@mx.test", "v@example.test"],
                                  b"Subject: live\r\n\r\nhello\r\n")
        assert refused == {}
    [(envelope, _)] = entries_of(server.spool)
    assert envelope.client == "127.0.0.1" and envelope.helo == "client.test"
    assert envelope.recipients == ["u@mx.test", "v@example.test"]
    assert server.stop() == 0
    assert "queued id=%s from=<a@client.test>" % envelope.id in server.output()


def test_smtplib_sees_relay_refusal_and_size_limit(server_factory, server_flags):
    """Refusals reach smtplib as its exceptions, with the table's codes."""
    server = server_factory("--max-size", "100", "--relay-networks", "none", *server_flags)
    with smtplib.SMTP("127.0.0.1", server.port, timeout=10) as client:
        with pytest.raises(smtplib.SMTPRecipientsRefused) as refused:
            client.sendmail("a@client.test", ["x@elsewhere.test"], b"x\r\n")
        assert refused.value.recipients["x@elsewhere.test"][0] == 550
        with pytest.raises(smtplib.SMTPSenderRefused) as big:
            client.sendmail("a@client.test", ["u@mx.test"], b"x" * 200 + b"\r\n")
        assert big.value.smtp_code == 552


def test_pipelined_commands_in_one_packet(server):
    """MAIL, RCPT, RCPT, DATA in one write get four replies in order (RFC 2920)."""
    client = Client(server.port)
    assert client.reply()[0] == 220
    client.send(b"EHLO c.test\r\n")
    assert client.reply()[0] == 250
    client.send(b"MAIL FROM:<a@c.test>\r\nRCPT TO:<u@mx.test>\r\n"
                b"RCPT TO:<x@elsewhere.test>\r\nDATA\r\n")
    assert [client.reply()[0] for _ in range(4)] == [250, 250, 250, 354]
    client.send(b"Subject: p\r\n\r\nbody\r\n.\r\nQUIT\r\n")
    assert [client.reply()[0] for _ in range(2)] == [250, 221]
    client.close()


def test_concurrent_sessions(server_factory, server_flags):
    """Twenty clients at once are all served (children forked and reaped)."""
    server = server_factory("--max-sessions", "30", *server_flags)
    errors = []

    def send(i):
        try:
            with smtplib.SMTP("127.0.0.1", server.port, timeout=20) as client:
                client.sendmail("a@c.test", ["u%d@mx.test" % i], b"Subject: %d\r\n\r\nx\r\n" % i)
        except Exception as exc:  # collected and asserted below
            errors.append(exc)
    threads = [threading.Thread(target=send, args=(i,)) for i in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and len(entries_of(server.spool)) == 20

    wait_for(lambda: not children(server.proc.pid, state="Z"), what="children to be reaped")


def test_idle_timeout(server_factory, server_flags):
    """A silent client gets 421 4.4.2 after --timeout seconds."""
    server = server_factory("--timeout", "0.5", *server_flags)
    client = Client(server.port)
    assert client.reply()[0] == 220
    # The client's own 10 s socket timeout is the bound: a 421 4.4.2 can only be the timeout.
    code, lines = client.reply()
    assert code == 421 and lines[0].startswith("421 4.4.2")
    client.close()


def test_sigterm_finishes_the_message_in_progress(forking):
    """SIGTERM mid-DATA: the message completes with 250, then 421, and the server exits 0."""
    client = Client(forking.port)
    client.reply()
    client.send(b"EHLO c.test\r\nMAIL FROM:<a@c.test>\r\nRCPT TO:<u@mx.test>\r\nDATA\r\n")
    assert [client.reply()[0] for _ in range(4)] == [250, 250, 250, 354]
    client.send(b"Subject: in flight\r\n\r\nfirst half\r\n")
    forking.proc.send_signal(signal.SIGTERM)
    # The log line follows the SIGTERM passed on to the child: from here the
    # child knows, and its signal is handled before it reads what comes next.
    wait_for(lambda: "stopping: 1 session" in forking.output(), what="the stop to begin")
    client.send(b"second half\r\n.\r\n")
    assert client.reply()[0] == 250
    code, lines = client.reply()
    assert code == 421 and lines[0].startswith("421 4.3.2")
    client.close()
    # Its own exit after the one SIGTERM: stop() would send a second, which could land
    # while the interpreter is finalising and turn the exit code into -15.
    assert forking.proc.wait(15) == 0
    assert len(entries_of(forking.spool)) == 1


def test_sigterm_closes_idle_sessions_and_stops_accepting(forking):
    """An idle session gets 421 4.3.2 at once; the port stops accepting; exit 0."""
    client = Client(forking.port)
    client.reply()
    client.send(b"EHLO c.test\r\n")
    client.reply()
    forking.proc.send_signal(signal.SIGTERM)
    code, lines = client.reply()
    assert code == 421 and lines[0].startswith("421 4.3.2")
    assert forking.proc.wait(15) == 0
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", forking.port), timeout=2)


def test_swaks_full_session(server):
    """swaks, a real SMTP test client, completes a session with a body and headers."""
    swaks = need_tool("swaks")
    result = subprocess.run(
        [swaks, "--server", "127.0.0.1", "--port", str(server.port), "--helo", "swaks.test",
         "--from", "a@client.test", "--to", "u@mx.test", "--header", "Subject: from swaks",
         "--body", "line one\n.leading dot\n"],
        capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "<-  250 2.6.0" in result.stdout
    [(envelope, _)] = entries_of(server.spool)
    path = os.path.join(server.spool, envelope.id + ".msg")
    message = open(path, "rb").read()
    assert b"Subject: from swaks" in message and b"\r\n.leading dot\r\n" in message


@pytest.mark.parametrize("reuse", [True, False], ids=["reused", "per-message"])
def test_smtp_source_load(server, reuse):
    """Postfix's smtp-source, 5 parallel sessions, 40 messages: all 40 spooled."""
    source = need_tool("smtp-source")
    args = [source, "-s", "5", "-m", "40", "-l", "2048", "-M", "source.test",
            "-f", "a@source.test", "-t", "u@mx.test", *(["-d"] if reuse else []),
            "127.0.0.1:%d" % server.port]
    result = subprocess.run(args, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert len(entries_of(server.spool)) == 40
