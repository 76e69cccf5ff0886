"""The defences: admission limits, the tarpit, deadlines, early talkers, loops, HELO."""

import io
import logging
import os
import socket
import subprocess
import sys
import time

import pytest

from conftest import ROOT, Recorded, make_options, read_reply, replies_of, spooled, wait_for
from netsmtp.limits import Limits, SharedLimits, client_key, process_id
from netsmtp.session import Session

SERVERS = {"fork": ["--workers", "0"], "prefork": ["--workers", "2"]}
HELLO = [b"EHLO client.test"]
TRANSACTION = [b"MAIL FROM:<a@client.test>", b"RCPT TO:<u@mx.test>", b"DATA"]


def greeting_of(port):
    """Connect, return the greeting's code (None if closed unanswered); the socket stays open."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    try:
        return sock, read_reply(sock)[0]
    except EOFError:
        return sock, None


def greetings(port, count):
    socks, codes = [], []
    for _ in range(count):
        sock, code = greeting_of(port)
        socks.append(sock)
        codes.append(code)
    return socks, codes


# -- admission -------------------------------------------------------------------

def test_limits_count_rate_and_concurrency(tmp_path):
    """Limits: N per SECONDS per client and in total, and concurrent sessions, with
    slots given back by release() and rates cooling down with time."""
    now = [0.0]
    options = make_options(
        tmp_path, conn_rate_limit="2/10",
        conn_rate_total="3/10", max_sessions_per_client=5, max_sessions=10)
    limits = Limits(options, clock=lambda: now[0])
    assert limits.admit("192.0.2.1") is None
    assert limits.admit("192.0.2.1") is None
    assert "your address" in limits.admit("192.0.2.1")
    assert limits.admit("192.0.2.2") is None
    assert limits.admit("192.0.2.3") == "too many new sessions, slow down"
    now[0] = 10.5
    assert limits.admit("192.0.2.1") is None
    concurrent = Limits(make_options(tmp_path, max_sessions_per_client=1, max_sessions=2))
    assert concurrent.admit("192.0.2.1") is None
    assert concurrent.admit("192.0.2.1") == "too many sessions from your address"
    assert concurrent.admit("192.0.2.2") is None
    assert concurrent.admit("192.0.2.3") == "too many sessions"
    concurrent.release("192.0.2.1")
    assert concurrent.admit("192.0.2.3") is None


@pytest.mark.parametrize("peer,key", [
    ("192.0.2.1", "192.0.2.1"), ("2001:db8:1:2:aaaa::1", "2001:db8:1:2::/64"),
    ("::ffff:192.0.2.1", "192.0.2.1"), (None, "local"),
])
def test_client_key(peer, key):
    """Limits count IPv4 addresses, IPv6 /64s (one host's usual share) and local sessions."""
    assert client_key(peer) == key


def test_one_ipv6_slash_64_is_one_client(tmp_path):
    """Two addresses of one /64 share a per-client limit; another /64 does not."""
    limits = Limits(make_options(tmp_path, max_sessions_per_client=1))
    assert limits.admit("2001:db8:0:1::1") is None
    assert limits.admit("2001:db8:0:1::2") == "too many sessions from your address"
    assert limits.admit("2001:db8:0:2::1") is None


def test_shared_limits_forget_dead_processes(tmp_path):
    """SharedLimits keeps sessions by process id; a dead process's slot is freed."""
    options = make_options(tmp_path, max_sessions_per_client=1)
    child = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"],
                             stdin=subprocess.PIPE)
    state = SharedLimits(options).state
    state.update(lambda doc: doc["sessions"].update({process_id(child.pid): "192.0.2.1"}))
    assert SharedLimits(options).admit("192.0.2.1") == "too many sessions from your address"
    child.communicate(b"")
    assert SharedLimits(options).admit("192.0.2.1") is None


@pytest.mark.parametrize("kind", SERVERS)
def test_velocity_limit_refuses_a_burst(server_factory, kind):
    """--conn-rate-limit 3/60: a burst of 6 connections from one address gets three
    greetings and three 421 4.7.0 refusals."""
    server = server_factory("--conn-rate-limit", "3/60", *SERVERS[kind])
    socks, codes = greetings(server.port, 6)
    for sock in socks:
        sock.close()
    assert codes == [220] * 3 + [421] * 3
    server.stop()
    assert "connection refused: too many new sessions from your address" in server.output()


def test_total_rate_limit(server_factory):
    """--conn-rate-total 2/60 counts every client together."""
    server = server_factory("--conn-rate-total", "2/60", "--workers", "0")
    socks, codes = greetings(server.port, 3)
    assert codes == [220, 220, 421]
    for sock in socks:
        sock.close()


@pytest.mark.parametrize("kind", SERVERS)
def test_concurrent_sessions_per_client(server_factory, kind):
    """--max-sessions-per-client 2: a third open session is refused, and once one
    closes a new one is let in (the loopback is no relay network here: those are exempt)."""
    server = server_factory("--max-sessions-per-client", "2", "--relay-networks", "none",
                            *SERVERS[kind])
    socks, codes = greetings(server.port, 3)
    assert codes == [220, 220, 421]
    socks[0].sendall(b"QUIT\r\n")
    assert socks[0].recv(4096).startswith(b"221")

    def admitted():
        sock, code = greeting_of(server.port)
        sock.close()
        return code == 220
    # The slot is freed when the server has reaped the session.
    assert wait_for(admitted, what="the freed slot")
    for sock in socks:
        sock.close()


def test_max_sessions_in_the_forking_server(server_factory):
    """--max-sessions 2: the forking server answers a third concurrent client with 421."""
    server = server_factory("--max-sessions", "2", "--workers", "0")
    socks, codes = greetings(server.port, 3)
    assert codes == [220, 220, 421]
    for sock in socks:
        sock.close()


def test_stdin_mode_shares_limits_through_the_spool(tmp_path):
    """In --stdin mode each process is a session; the rate limit holds across them."""
    env = dict(os.environ, TCPREMOTEIP="192.0.2.9")
    codes = []
    for _ in range(3):
        out = subprocess.run(
            [sys.executable, "-m", "netsmtp", "--stdin", "--spool", str(tmp_path / "spool"),
             "--hostname", "mx.test", "--conn-rate-limit", "2/60"],
            cwd=ROOT, input=b"QUIT\r\n", capture_output=True, env=env, timeout=30)
        codes.append(replies_of(out.stdout)[0][0])
    assert codes == [220, 220, 421]


# -- the tarpit and the session limits ---------------------------------------------

def conversation(tmp_path, lines, rfile=None, session_class=Session, **overrides):
    options = make_options(tmp_path, **overrides)
    out = io.BytesIO()
    data = b"".join(line + b"\r\n" for line in lines)
    session = session_class(rfile or io.BytesIO(data), out, peer="192.0.2.1", options=options)
    session.spool.prepare()
    session.handle()
    return [code for code, _ in replies_of(out.getvalue())], session


def test_bad_command_budget_is_an_option(tmp_path):
    """--max-bad-commands 4: the fourth refusal is followed by 421 and the end."""
    codes, _ = conversation(tmp_path, [b"FROB"] * 10, max_bad_commands=4)
    assert codes == [220, 500, 500, 500, 500, 421]


def test_tarpit_is_flat_after_the_soft_error_limit(tmp_path):
    """The defaults: ten refusals answered at once, then each waits --error-delay (1 s,
    no growth), the twentieth too, and it is followed by 421 4.7.0 and the end."""
    codes, session = conversation(tmp_path, [b"FROB"] * 30, session_class=Recorded,
                                  error_delay=1)
    assert codes == [220] + [500] * 20 + [421]
    assert session.pauses == (1,) * 10
    _, session = conversation(tmp_path, [b"FROB"] * 6, session_class=Recorded,
                              soft_error_limit=2, error_delay=0.5)
    assert session.pauses == (0.5,) * 4


def test_tarpit_really_waits(tmp_path):
    """The default pause() sleeps: a refusal past the soft limit takes at least its delay."""
    started = time.monotonic()
    conversation(tmp_path, [b"FROB"] * 2, soft_error_limit=1, error_delay=0.1)
    assert time.monotonic() - started >= 0.1


def test_max_messages_per_session(tmp_path):
    """--max-messages 2: the third MAIL gets 421 4.7.0 and the session ends."""
    message = [*TRANSACTION, b"Subject: x\r\n\r\nhi\r\n."]
    codes, session = conversation(tmp_path, [*HELLO, *message, *message, *message, b"NOOP"],
                                  max_messages=2)
    assert codes == [220, 250] + [250, 250, 354, 250] * 2 + [421]
    assert len(spooled(session.spool)) == 2


def test_max_recipients_per_session(tmp_path):
    """--max-session-recipients 3 counts across transactions: the fourth gets 452."""
    codes, _ = conversation(tmp_path, [*HELLO, b"MAIL FROM:<a@client.test>",
                                       b"RCPT TO:<u1@mx.test>", b"RCPT TO:<u2@mx.test>", b"RSET",
                                       b"MAIL FROM:<a@client.test>", b"RCPT TO:<u3@mx.test>",
                                       b"RCPT TO:<u4@mx.test>"], max_session_recipients=3)
    assert codes == [220, 250, 250, 250, 250, 250, 250, 250, 452]


class DripReader:
    """A client that sends step octets per read, pausing before each."""

    def __init__(self, data, pause, step=1):
        self.data, self.pause, self.step = data, pause, step

    def read1(self, size):
        time.sleep(self.pause)
        chunk, self.data = self.data[:self.step], self.data[self.step:]
        return chunk


def test_command_timeout_stops_a_dripping_client(tmp_path):
    """A command line that takes longer than --timeout in total ends with 421 4.4.2,
    even though every single read was quick."""
    codes, _ = conversation(tmp_path, [], rfile=DripReader(b"NOOP" + b" " * 100 + b"\r\n", 0.01),
                            timeout=0.3)
    assert codes == [220, 421]


def test_session_timeout(tmp_path):
    """--session-timeout bounds the whole session, however busy it is."""
    reader = DripReader(b"NOOP\r\n" * 200, 0.02, step=6)
    codes, _ = conversation(tmp_path, [], rfile=reader, session_timeout=0.3)
    # However fast or slow the machine, the 421 comes before the client's 200 NOOPs are done.
    assert codes[0] == 220 and codes[-1] == 421 and set(codes[1:-1]) <= {250}
    assert len(codes) < 202


def test_early_talker_is_refused(server_factory):
    """--greet-pause: a client speaking before the 220 gets 554 and is disconnected;
    a patient one is greeted."""
    server = server_factory("--greet-pause", "0.5")
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(b"EHLO spammer.test\r\n")
        data = b""
        while chunk := sock.recv(4096):
            data += chunk
    assert data == b"554 5.7.1 Access denied: talking before the greeting\r\n"
    started = time.monotonic()
    sock, code = greeting_of(server.port)
    sock.close()
    assert code == 220 and time.monotonic() - started >= 0.4
    server.stop()
    assert "refused: 554 5.7.1" in server.output()


# -- message checks ------------------------------------------------------------------

def send(tmp_path, message, **overrides):
    codes, session = conversation(tmp_path, [*HELLO, *TRANSACTION, message + b"\r\n."], **overrides)
    return codes[-1], session


def test_mail_loop_is_554_5_4_6(tmp_path):
    """A message that already carries 100 Received fields is a loop: 554 5.4.6; 99 pass."""
    received = b"Received: from a by b; Mon, 1 Jan 2024 00:00:00 +0000\r\n"
    assert send(tmp_path, received * 99 + b"Subject: x\r\n\r\nhi")[0] == 250
    code, session = send(tmp_path, received * 100 + b"Subject: x\r\n\r\nhi")
    assert code == 554 and len(spooled(session.spool)) == 1


def test_header_checks(tmp_path):
    """A broken header section, too many fields or an oversized field get 554 5.6.0;
    a message without any header section is taken as all body."""
    assert send(tmp_path, b"Subject: x\r\nnot a header\r\n\r\nbody")[0] == 554
    assert send(tmp_path, b"Subject: x\r\n" + b"X-A: 1\r\n" * 1000 + b"\r\nbody")[0] == 554
    assert send(tmp_path, b"Subject: x\r\nX-Long: " + b"a\r\n b" * 40000 + b"\r\n\r\nbody")[0] == 554
    assert send(tmp_path, b"Subject : obsolete but fine\r\n\r\nbody")[0] == 250
    assert send(tmp_path, b"just a body line\r\nanother")[0] == 250


# -- HELO checks -------------------------------------------------------------------

@pytest.mark.parametrize("name,peer,code", [
    ("[192.0.2.1]", "192.0.2.1", 250),
    ("[192.0.2.2]", "192.0.2.1", 554),
    ("[IPv6:2001:db8::1]", "2001:db8::1", 250),
    ("localhost", "127.0.0.1", 250),
    ("localhost", "192.0.2.1", 554),
    ("no-such-host.invalid", "192.0.2.1", 554),
    ("partner.test", "192.0.2.1", 250),
    ("a..b", "192.0.2.1", 554),
    ("a" * 64 + ".test", "192.0.2.1", 554),
])
def test_helo_verify(tmp_path, name, peer, code):
    """--helo-verify: an allowed name, the client's address literal, or a name that
    resolves to the client passes; anything else gets 554 5.7.1, also a name the
    resolver cannot even encode (an empty or 64-octet label), not a 451."""
    options = make_options(tmp_path, helo_verify=True, helo_allowed="partner.test")
    out = io.BytesIO()
    Session(io.BytesIO(b"HELO %s\r\n" % name.encode()), out, peer=peer, options=options).handle()
    assert replies_of(out.getvalue())[1][0] == code


def test_helo_verify_when_dns_fails_for_now(tmp_path, monkeypatch):
    """A temporary resolver failure is 450 4.7.1, so the client tries again later."""
    def unavailable(*args, **kwargs):
        raise socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")
    monkeypatch.setattr(socket, "getaddrinfo", unavailable)
    options = make_options(tmp_path, helo_verify=True)
    out = io.BytesIO()
    Session(io.BytesIO(b"HELO mx.partner.test\r\n"), out, peer="192.0.2.1", options=options).handle()
    assert replies_of(out.getvalue())[1] == (450, ["450 4.7.1 cannot resolve the HELO name now"])


def test_helo_checks_are_off_by_default(converse):
    """Without --helo-verify any printable name is accepted."""
    assert converse.codes([b"HELO no-such-host.invalid"]) == [220, 250]


def test_every_refusal_is_logged(converse, caplog):
    """A refused command leaves a log line with its reason, escaped."""
    caplog.set_level(logging.INFO, logger="netsmtp")
    converse([*HELLO, b"MAIL FROM:<bad\x01address>"])
    assert "refused: 501 5.1.7" in caplog.text and "\x01" not in caplog.text
