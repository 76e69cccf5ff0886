"""netsmtp --lmtp (RFC 2033) and --listen unix:PATH, with swaks and Postfix's smtp-source -L.

Rows L1..L8 are the wire tests of the research (round2-features.md 3.1).
"""

import errno
import os
import socket
import stat
import subprocess
import sys
import threading

import pytest
from conftest import ROOT, Conversation, entries_of, make_options, need_tool, replies_of, wait_for

from netsmtp.lmtp_session import LMTPSession
from netsmtp.spool import Spool


@pytest.fixture
def lmtp(tmp_path):
    options = make_options(tmp_path, local_domains="local.test")
    spool = Spool(options.spool)
    spool.prepare()
    return Conversation(options, spool, session_class=LMTPSession, peer="127.0.0.1")


MAIL = [b"LHLO client.test", b"MAIL FROM:<a@x.test>"]
BODY = [b"DATA", b"Subject: lmtp\r\n\r\nhello\r\n."]


def test_helo_and_ehlo_get_500(lmtp):
    """L1: HELO and EHLO never get a positive reply: 500 5.5.1 each."""
    replies = lmtp([b"EHLO x", b"HELO x", b"MAIL FROM:<a@x.test>"])
    assert [code for code, _ in replies] == [220, 500, 500, 503]
    assert replies[0][1] == ["220 mx.test LMTP netsmtp ready"]
    assert replies[1][1][0].startswith("500 5.5.1 EHLO is not LMTP")


def test_lhlo_offers_the_lmtp_keywords(lmtp):
    """L2: PIPELINING and ENHANCEDSTATUSCODES (MUST), 8BITMIME (SHOULD), SIZE, CHUNKING."""
    [_, (code, lines)] = lmtp([b"LHLO client.test"])
    keywords = [line[4:].split(" ")[0] for line in lines[1:]]
    assert code == 250
    assert {"PIPELINING", "ENHANCEDSTATUSCODES", "8BITMIME", "SIZE", "CHUNKING"} <= set(keywords)


def test_data_without_a_successful_rcpt_is_503(lmtp):
    """L3: no successful RCPT, so DATA fails with 503."""
    codes = lmtp.codes(MAIL + [b"RCPT TO:<u@far.test>", b"DATA"])
    assert codes == [220, 250, 250, 550, 503]


def test_one_reply_per_successful_rcpt_duplicates_included(lmtp):
    """L4: u1, a refused one, u1 again: two replies after the dot, one spool entry."""
    replies = lmtp(MAIL + [b"RCPT TO:<u1@local.test>", b"RCPT TO:<x@far.test>",
                           b"RCPT TO:<u1@local.test>", *BODY, b"QUIT"])
    assert [code for code, _ in replies] == [220, 250, 250, 250, 550, 250, 354, 250, 250, 221]
    [(envelope, message)] = entries_of(lmtp.spool)
    assert envelope.recipients == ["u1@local.test"]
    assert envelope.protocol == "LMTP" and b"with LMTP" in message


def test_every_recipient_must_be_local_even_from_a_relay_network(lmtp):
    """An LMTP server delivers, never relays: 550 5.1.1 for a remote domain from 127.0.0.1."""
    replies = lmtp(MAIL + [b"RCPT TO:<x@far.test>"])
    assert replies[-1][1][0].startswith("550 5.1.1")


def test_a_refused_message_is_refused_once_per_recipient(lmtp):
    """A message refused after the dot (a bare LF) gets the refusal for each RCPT."""
    replies = lmtp(MAIL + [b"RCPT TO:<u1@local.test>", b"RCPT TO:<u2@local.test>",
                           b"DATA", b"Subject: x\r\n\r\nbare\nLF\r\n.", b"QUIT"])
    assert [code for code, _ in replies] == [220, 250, 250, 250, 250, 354, 554, 554, 221]
    assert entries_of(lmtp.spool) == []


def test_bdat_last_gets_one_reply_per_recipient(lmtp):
    """L6: a BDAT chunk gets one reply, BDAT LAST one per successful RCPT."""
    replies = lmtp(MAIL + [b"RCPT TO:<u1@local.test>", b"RCPT TO:<u2@local.test>",
                           b"BDAT 12\r\nSubject: x\r\n", b"BDAT 6 LAST\r\n\r\nHi\r\n", b"QUIT"])
    assert [code for code, _ in replies] == [220, 250, 250, 250, 250, 250, 250, 250, 221]
    [(envelope, message)] = entries_of(lmtp.spool)
    assert message.endswith(b"Subject: x\r\n\r\nHi\r\n")


class FullSpool(Spool):
    """A spool on a full disk: no entry can be started."""

    def create(self, envelope):
        raise OSError(errno.ENOSPC, "No space left on device")


def test_bdat_last_refused_before_the_message_is_refused_once_per_recipient(tmp_path):
    """A message in one BDAT LAST chunk that cannot be spooled at all still gets one
    reply per successful RCPT, or the client waits for replies that never come."""
    options = make_options(tmp_path, local_domains="local.test")
    spool = FullSpool(options.spool)
    spool.prepare()
    lmtp = Conversation(options, spool, session_class=LMTPSession, peer="127.0.0.1")
    replies = lmtp(MAIL + [b"RCPT TO:<u1@local.test>", b"RCPT TO:<u2@local.test>",
                           b"BDAT 6 LAST\r\n\r\nHi\r\n", b"NOOP", b"QUIT"])
    assert [code for code, _ in replies] == [220, 250, 250, 250, 250, 452, 452, 250, 221]
    # A DATA that cannot start is one reply to DATA itself (no 354, no message yet).
    replies = lmtp(MAIL + [b"RCPT TO:<u1@local.test>", b"RCPT TO:<u2@local.test>",
                           b"DATA", b"NOOP", b"QUIT"])
    assert [code for code, _ in replies] == [220, 250, 250, 250, 250, 452, 250, 221]


def test_lmtp_on_port_25_is_refused_at_start(tmp_path):
    """L7: RFC 2033 section 5, LMTP must not be used on port 25: exit 2."""
    result = subprocess.run([sys.executable, "-m", "netsmtp", "--lmtp", "--listen", "0.0.0.0:25",
                             "--spool", str(tmp_path / "spool")],
                            capture_output=True, text=True, cwd=ROOT, timeout=30)
    assert result.returncode == 2 and "port 25" in result.stderr


class UnixServer:
    """`python -m netsmtp --listen unix:PATH` with its log drained in a thread."""

    def __init__(self, path, *args, spool):
        self.path = str(path)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "netsmtp", "--listen", "unix:" + self.path, "--spool", spool,
             "--hostname", "mx.test", "--local-domains", "local.test", *args],
            cwd=ROOT, stderr=subprocess.PIPE, text=True)
        self.log = []
        self.reader = threading.Thread(target=self._drain, daemon=True)
        self.reader.start()
        wait_for(lambda: "listening on unix:" in self.output() or self.proc.poll() is not None,
                 what="the unix socket server")

    def _drain(self):
        for line in self.proc.stderr:
            self.log.append(line)

    def output(self):
        return "".join(self.log)

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
        code = self.proc.wait(20)
        self.reader.join(5)
        return code


@pytest.fixture
def unix_server(tmp_path):
    started = []

    def start(*args, path=None):
        server = UnixServer(path or tmp_path / "lmtp.sock", *args, spool=str(tmp_path / "spool"))
        started.append(server)
        return server
    yield start
    for server in started:
        server.stop()


def converse_unix(path, data):
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(15)
        sock.connect(str(path))
        sock.sendall(data)
        sock.shutdown(socket.SHUT_WR)
        received = b""
        while chunk := sock.recv(65536):
            received += chunk
    return replies_of(received)


SERVERS = {"forking": ["--workers", "0"], "prefork": ["--workers", "2"]}


@pytest.mark.parametrize("flags", SERVERS.values(), ids=SERVERS.keys())
def test_swaks_over_a_unix_socket(unix_server, tmp_path, flags):
    """L8: swaks --socket PATH --protocol LMTP delivers to both recipients, each
    answered after the dot; the socket file has the default mode 0660."""
    swaks = need_tool("swaks")
    server = unix_server("--lmtp", *flags)
    assert stat.S_IMODE(os.stat(server.path).st_mode) == 0o660
    result = subprocess.run([swaks, "--socket", server.path, "--protocol", "LMTP",
                             "--to", "u1@local.test,u2@local.test", "--from", "a@x.test"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    after_dot = result.stdout.split("<-  250 2.6.0")
    assert len(after_dot) == 3  # two replies after the dot, one per recipient
    [(envelope, _)] = entries_of(str(tmp_path / "spool"))
    assert envelope.recipients == ["u1@local.test", "u2@local.test"] and envelope.client is None


def test_smtp_source_lmtp_three_recipients_per_message(unix_server, tmp_path):
    """Postfix's LMTP client, smtp-source -L -r 3, sends 5 messages over the socket."""
    source = need_tool("smtp-source")
    server = unix_server("--lmtp")
    result = subprocess.run([source, "-L", "-m", "5", "-r", "3", "-f", "a@x.test",
                             "-t", "u@local.test", "unix:" + server.path],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    entries = entries_of(str(tmp_path / "spool"))
    assert len(entries) == 5
    assert all(len(envelope.recipients) == 3 for envelope, _ in entries)


def test_stale_socket_is_replaced_and_a_live_one_kept(unix_server, tmp_path):
    """A socket file nobody listens on is replaced at start; a live one is not taken:
    the second server exits 1 and the first keeps serving."""
    path = tmp_path / "smtp.sock"
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(path))
    stale.close()  # the file stays, with nobody behind it
    first = unix_server("--listen-mode", "0600", path=path)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    second = unix_server(path=path)
    assert second.proc.wait(20) == 1 and "already listening" in second.output()
    assert [code for code, _ in converse_unix(path, b"QUIT\r\n")] == [220, 221]
    assert first.proc.poll() is None


def test_a_file_that_is_not_a_socket_is_never_removed(unix_server, tmp_path):
    path = tmp_path / "precious"
    path.write_text("data")
    server = unix_server(path=path)
    assert server.proc.wait(20) == 1 and "not a socket" in server.output()
    assert path.read_text() == "data"


@pytest.mark.parametrize("flags", SERVERS.values(), ids=SERVERS.keys())
def test_unix_clients_are_local(unix_server, tmp_path, flags):
    """An SMTP client on a Unix socket has no address: local, so it may relay only when
    --relay-networks lists local."""
    relay = b"EHLO c.test\r\nMAIL FROM:<a@x.test>\r\nRCPT TO:<x@far.test>\r\nQUIT\r\n"
    server = unix_server(*flags)
    assert [code for code, _ in converse_unix(server.path, relay)] == [220, 250, 250, 550, 221]
    server.stop()
    server = unix_server(*flags, "--relay-networks", "local", path=tmp_path / "b.sock")
    assert [code for code, _ in converse_unix(server.path, relay)] == [220, 250, 250, 250, 221]


def test_lmtp_in_stdin_mode(tmp_path):
    """--stdin --lmtp: an LHLO session on a pipe, two replies after the dot."""
    data = (b"LHLO c.test\r\nMAIL FROM:<a@x.test>\r\nRCPT TO:<u1@local.test>\r\n"
            b"RCPT TO:<u2@local.test>\r\nDATA\r\nSubject: x\r\n\r\nhi\r\n.\r\nQUIT\r\n")
    result = subprocess.run([sys.executable, "-m", "netsmtp", "--stdin", "--lmtp", "--spool",
                             str(tmp_path / "spool"), "--hostname", "mx.test",
                             "--local-domains", "local.test"],
                            input=data, capture_output=True, cwd=ROOT, timeout=30)
    codes = [code for code, _ in replies_of(result.stdout)]
    assert codes == [220, 250, 250, 250, 250, 354, 250, 250, 221], result.stderr


def test_private_postfix_delivers_through_its_lmtp_transport(tmp_path):
    """A private Postfix whose transport map sends local.test to lmtp:unix:SOCKET:
    its lmtp(8) client says LHLO, pipelines, and gets one reply per recipient;
    both recipients are "sent" in its log and one entry holds them."""
    from postfix import PrivatePostfix
    need_tool("postfix")
    if os.geteuid() != 0:
        pytest.skip("a private Postfix needs root")
    spool = str(tmp_path / "spool")
    postfix = None
    server = None
    try:
        postfix = PrivatePostfix(hostname="client.test")
        path = os.path.join(postfix.dir, "netsmtp.sock")  # reachable by the postfix user
        server = UnixServer(path, "--lmtp", "--listen-mode", "0666", spool=spool)
        with open(os.path.join(postfix.config, "main.cf"), "a") as f:
            f.write("transport_maps = inline:{ local.test=lmtp:unix:%s }\n" % path)
        postfix.run("reload")
        message = b"Subject: via postfix\r\n\r\nhello\r\n"
        assert postfix.sendmail(["-f", "a@client.test", "u1@local.test", "u2@local.test"],
                                message) == 0
        wait_for(lambda: postfix.log().count("status=sent") >= 2, timeout=30,
                 what="Postfix's lmtp deliveries")
        assert "relay=" in postfix.log() and "netsmtp.sock" in postfix.log()
        [(envelope, body)] = entries_of(spool)
        assert sorted(envelope.recipients) == ["u1@local.test", "u2@local.test"]
        assert envelope.protocol == "LMTP" and body.endswith(b"hello\r\n")
    finally:
        if server is not None:
            server.stop()
        if postfix is not None:
            postfix.stop()


def test_netsmtp_send_lmtp_route_into_netsmtp_lmtp(unix_server, tmp_path):
    """netsmtp's own pair: netsmtp-send's lmtp route into netsmtp --lmtp on a Unix
    socket, in BDAT chunks (CHUNKING is offered); one recipient refused at RCPT
    (not local there) is bounced, the others are accepted with one reply each."""
    from smarthost import put, run_cli
    from test_send import bounces

    from netsmtp.queue_cli import send_main
    server = unix_server("--lmtp", "--log-level", "debug")
    outgoing = Spool(str(tmp_path / "outgoing"))
    outgoing.prepare()
    put(outgoing, recipients=["u1@local.test", "u2@local.test", "x@elsewhere.test"])
    assert run_cli(send_main, ["--hostname", "mx.test", "--lmtp-host", "unix:" + server.path,
                               "--routes", "*=lmtp", outgoing.path]) == 0
    [(envelope, _)] = entries_of(str(tmp_path / "spool"))
    assert envelope.recipients == ["u1@local.test", "u2@local.test"]
    [(_, report)] = bounces(outgoing)
    assert "550 5.1.1" in report.as_string()
    # netsmtp --lmtp offers CHUNKING, so the message went as BDAT, not DATA.
    wait_for(lambda: ": BDAT" in server.output(), what="BDAT in the server's log")
    assert ": DATA" not in server.output()
