"""STARTTLS (RFC 3207) and implicit TLS (RFC 8314) against real servers and clients."""

import os
import re
import smtplib
import socket
import ssl
import subprocess
import sys
import time

import pytest

from conftest import ROOT, client_context, need_tool, only_entry, read_reply, replies_of

SERVERS = {"fork": ["--workers", "0"], "prefork": ["--workers", "1"]}


def keywords(reply):
    """The EHLO keywords of a (code, lines) reply."""
    return [line[4:] for line in reply[1][1:]]


def tls_server(server_factory, tls_files, *args):
    _, cert, key = tls_files
    return server_factory("--tls-cert", cert, "--tls-key", key, *args)


@pytest.mark.parametrize("kind", SERVERS)
def test_starttls_with_smtplib(server_factory, tls_files, kind):
    """STARTTLS is offered before TLS only; after it the client says EHLO again and
    the Received header says ESMTPS with the protocol and cipher."""
    server = tls_server(server_factory, tls_files, *SERVERS[kind])
    with smtplib.SMTP("127.0.0.1", server.port, timeout=10) as client:
        client.ehlo("client.test")
        assert client.has_extn("starttls")
        assert client.starttls(context=client_context(tls_files[0]))[0] == 220
        client.ehlo("client.test")
        assert not client.has_extn("starttls")
        assert client.sock.version() in ("TLSv1.2", "TLSv1.3")
        client.sendmail("a@client.test", ["u@mx.test"], b"Subject: tls\r\n\r\nhi\r\n")
    assert server.stop() == 0
    header = only_entry(server.spool)[1].split(b"\r\n\r\n")[0].decode()
    assert " with ESMTPS id " in header
    assert re.search(r"\(using TLSv1\.[23] with cipher \S+ \(\d+ bits\)\)", header)


def test_swaks_starttls(server_factory, tls_files):
    """swaks sends a message over STARTTLS."""
    swaks = need_tool("swaks")
    server = tls_server(server_factory, tls_files)
    result = subprocess.run(
        [swaks, "--server", "127.0.0.1:%d" % server.port, "--tls", "--ehlo", "client.test",
         "--from", "a@client.test", "--to", "u@mx.test", "--timeout", "10"],
        capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "<-  220 2.0.0 Ready to start TLS" in result.stdout
    assert "<~  250 2.6.0" in result.stdout
    assert b"with ESMTPS" in only_entry(server.spool)[1]


def test_pipelined_plaintext_is_never_executed_inside_tls(server_factory, tls_files):
    """STARTTLS\\r\\nRSET\\r\\n in one write: RSET is thrown away (CVE-2011-0411), so the
    first reply inside TLS answers the client's EHLO."""
    server = tls_server(server_factory, tls_files)
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as raw:
        assert read_reply(raw)[1][0].startswith("220 ")
        raw.sendall(b"EHLO client.test\r\n")
        assert "STARTTLS" in keywords(read_reply(raw))
        raw.sendall(b"STARTTLS\r\nRSET\r\nMAIL FROM:<evil@client.test>\r\n")
        assert read_reply(raw) == (220, ["220 2.0.0 Ready to start TLS"])
        with client_context(tls_files[0]).wrap_socket(raw, server_hostname="mx.test") as tls:
            tls.sendall(b"EHLO client.test\r\nQUIT\r\n")
            data = b""
            while chunk := tls.recv(4096):
                data += chunk
    replies = replies_of(data)
    assert [code for code, _ in replies] == [250, 221]
    assert replies[0][1][0] == "250-mx.test greets client.test"


def test_starttls_sequence(server_factory, tls_files):
    """STARTTLS before EHLO and a second STARTTLS get 503; an argument gets 501."""
    server = tls_server(server_factory, tls_files)
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as raw:
        read_reply(raw)
        raw.sendall(b"STARTTLS\r\n")
        assert read_reply(raw)[1][0].startswith("503 5.5.1")
        raw.sendall(b"EHLO client.test\r\n")
        read_reply(raw)
        raw.sendall(b"STARTTLS now\r\n")
        assert read_reply(raw)[1][0].startswith("501 5.5.2")
        raw.sendall(b"STARTTLS\r\n")
        assert read_reply(raw)[1][0].startswith("220 2.0.0")
        with client_context(tls_files[0]).wrap_socket(raw, server_hostname="mx.test") as tls:
            tls.sendall(b"EHLO client.test\r\n")
            assert "STARTTLS" not in keywords(read_reply(tls))
            tls.sendall(b"STARTTLS\r\n")
            assert read_reply(tls)[1][0].startswith("503 5.5.1")


def after_starttls(port):
    """A plain connection that said EHLO and STARTTLS and got 220: the handshake is next."""
    raw = socket.create_connection(("127.0.0.1", port), timeout=10)
    read_reply(raw)
    raw.sendall(b"EHLO client.test\r\n")
    read_reply(raw)
    raw.sendall(b"STARTTLS\r\n")
    assert read_reply(raw)[1][0].startswith("220 2.0.0")
    return raw


def test_failed_handshake_is_logged_and_closes(server_factory, tls_files):
    """Plaintext where a ClientHello belongs: the handshake fails, is logged, and
    the connection is closed without another reply."""
    server = tls_server(server_factory, tls_files)
    with after_starttls(server.port) as raw:
        raw.sendall(b"HELO not-a-client-hello\r\n" * 4)
        rest = b""
        try:
            while chunk := raw.recv(4096):
                rest += chunk
        except ConnectionResetError:
            pass
    assert not re.search(rb"^\d{3} ", rest), rest
    server.stop()
    assert "TLS handshake failed" in server.output()


def test_handshake_timeout(server_factory, tls_files):
    """A client that says STARTTLS and then nothing is dropped after --tls-timeout."""
    server = tls_server(server_factory, tls_files, "--tls-timeout", "0.5")
    with after_starttls(server.port) as raw:
        # Closed before the client's own 10 s socket timeout, with nothing sent.
        assert raw.recv(4096) == b""
    server.stop()
    assert "TLS handshake failed" in server.output()


def test_tls_on_connect(server_factory, tls_files):
    """--tls-on-connect: TLS from the first byte (port 465 style), no STARTTLS offered."""
    server = tls_server(server_factory, tls_files, "--tls-on-connect")
    with smtplib.SMTP_SSL("127.0.0.1", server.port, timeout=10,
                          context=client_context(tls_files[0])) as client:
        client.ehlo("client.test")
        assert not client.has_extn("starttls")
        client.sendmail("a@client.test", ["u@mx.test"], b"Subject: 465\r\n\r\nhi\r\n")
    assert b"with ESMTPS" in only_entry(server.spool)[1]


def test_tls_on_connect_needs_a_certificate(tmp_path):
    """--tls-on-connect without --tls-cert is a usage error (exit 2)."""
    result = subprocess.run([sys.executable, "-m", "netsmtp", "--tls-on-connect",
                             "--spool", str(tmp_path / "s")], cwd=ROOT,
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 2 and "--tls-cert" in result.stderr


def test_unreadable_certificate_fails_at_start(tmp_path):
    """A missing certificate stops the daemon at start with exit code 1."""
    result = subprocess.run([sys.executable, "-m", "netsmtp", "--listen", "127.0.0.1:0",
                             "--tls-cert", str(tmp_path / "missing.pem"),
                             "--spool", str(tmp_path / "s")], cwd=ROOT,
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 1 and "missing.pem" in result.stderr


def test_require_tls_refuses_mail_in_plaintext(server_factory, tls_files):
    """--require-tls: MAIL before STARTTLS gets 530 5.7.0; after it, mail flows."""
    server = tls_server(server_factory, tls_files, "--require-tls")
    with smtplib.SMTP("127.0.0.1", server.port, timeout=10) as client:
        client.ehlo("client.test")
        assert client.mail("a@client.test") == (530, b"5.7.0 Must issue a STARTTLS command first")
        client.starttls(context=client_context(tls_files[0]))
        client.sendmail("a@client.test", ["u@mx.test"], b"Subject: x\r\n\r\nhi\r\n")


def test_certificate_is_reloaded_without_restart(server_factory, tls_files, tmp_path):
    """A renewed certificate file is used by the next session, without a restart."""
    ca, cert, key = tls_files
    server = tls_server(server_factory, tls_files)

    def served_names():
        context = client_context(ca)
        context.check_hostname = False  # the names are what this test reads
        with smtplib.SMTP("127.0.0.1", server.port, timeout=10) as client:
            client.starttls(context=context)
            peer = client.sock.getpeercert()
            return [value for kind, value in peer["subjectAltName"] if kind == "DNS"]

    assert served_names() == ["mx.test"]
    renewed = ca.issue_cert("mx2.test")
    renewed.private_key_pem.write_to_path(key)
    renewed.cert_chain_pems[0].write_to_path(cert)
    later = time.time() + 5
    os.utime(cert, (later, later))
    os.utime(key, (later, later))
    assert served_names() == ["mx2.test"]


def test_certificate_that_no_longer_loads_is_454(server_factory, tls_files):
    """A certificate broken after start: STARTTLS gets 454 4.7.0 before any 220
    (RFC 3207 section 4), and the session goes on in plaintext."""
    _, cert, _ = tls_files
    server = tls_server(server_factory, tls_files)
    with open(cert, "w") as f:
        f.write("not a certificate\n")
    later = time.time() + 5
    os.utime(cert, (later, later))
    with smtplib.SMTP("127.0.0.1", server.port, timeout=10) as client:
        client.ehlo("client.test")
        assert client.docmd("STARTTLS") == (454, b"4.7.0 TLS not available")
        assert client.noop()[0] == 250
    server.stop()
    assert "cannot load" in server.output()


def test_starttls_not_offered_without_transport(converse, tmp_path, tls_files):
    """Over BytesIO (no transport) STARTTLS is neither offered nor accepted."""
    _, cert, key = tls_files
    converse.options = converse.options.replace(tls_cert=cert, tls_key=key)
    replies = converse([b"EHLO client.test", b"STARTTLS"])
    assert "250-STARTTLS" not in replies[1][1]
    assert replies[2] == (502, ["502 5.5.1 STARTTLS not implemented"])


def test_require_tls_over_bytesio(converse):
    """MAIL before TLS with --require-tls: 530 5.7.0, and the session goes on."""
    converse.options = converse.options.replace(require_tls=True)
    assert converse.codes([b"EHLO c.test", b"MAIL FROM:<a@c.test>", b"NOOP"]) == [220, 250, 530, 250]


# -- stdin mode: STARTTLS needs fd 0 to be a socket ------------------------------

def stdin_session(tmp_path, sock, *args):
    """netsmtp --stdin with sock as fds 0 and 1, as inetd hands a connection over."""
    return subprocess.Popen(
        [sys.executable, "-m", "netsmtp", "--stdin", "--spool", str(tmp_path / "spool"),
         "--hostname", "mx.test", "--local-domains", "mx.test", *args],
        cwd=ROOT, stdin=sock, stdout=sock, stderr=subprocess.DEVNULL)


def test_stdin_socket_offers_starttls(tmp_path, tls_files):
    """With a socket on fd 0 (inetd, systemd) STARTTLS is offered and works."""
    ca, cert, key = tls_files
    ours, theirs = socket.socketpair()
    proc = stdin_session(tmp_path, theirs, "--tls-cert", cert, "--tls-key", key)
    theirs.close()
    with ours:
        ours.settimeout(10)
        assert read_reply(ours)[1][0].startswith("220 ")
        ours.sendall(b"EHLO client.test\r\n")
        assert "250 STARTTLS" in read_reply(ours)[1]
        ours.sendall(b"STARTTLS\r\n")
        assert read_reply(ours)[1][0].startswith("220 2.0.0")
        with client_context(ca).wrap_socket(ours, server_hostname="mx.test") as tls:
            tls.sendall(b"EHLO client.test\r\n")
            assert "STARTTLS" not in keywords(read_reply(tls))
            tls.sendall(b"QUIT\r\n")
            assert read_reply(tls)[1][0].startswith("221 ")
    assert proc.wait(10) == 0


def test_stdin_pipe_does_not_offer_starttls(tmp_path, tls_files):
    """With a pipe on fd 0 STARTTLS is not offered, and ssl is never imported."""
    _, cert, key = tls_files
    out = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "netsmtp", "--stdin",
         "--spool", str(tmp_path / "spool"), "--hostname", "mx.test",
         "--tls-cert", cert, "--tls-key", key],
        cwd=ROOT, input=b"EHLO client.test\r\nSTARTTLS\r\nQUIT\r\n",
        capture_output=True, timeout=30)
    codes = [code for code, _ in replies_of(out.stdout)]
    assert codes == [220, 250, 502, 221]
    assert b"STARTTLS\r\n" not in out.stdout.split(b"\r\n502")[0]
    assert not re.search(rb"\| +_?ssl\n", out.stderr)


def test_stdin_mode_without_tls_never_imports_ssl(tmp_path):
    """A plain --stdin session loads no ssl module (start-up is every session's price)."""
    out = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "netsmtp", "--stdin",
         "--spool", str(tmp_path / "spool"), "--hostname", "mx.test"],
        cwd=ROOT, input=b"EHLO client.test\r\nQUIT\r\n", capture_output=True, timeout=30)
    assert replies_of(out.stdout)[-1][0] == 221
    assert b"netsmtp.session" in out.stderr
    assert not re.search(rb"\| +_?ssl\n", out.stderr)


def test_protocol_is_tls12_at_least(tls_files):
    """The server context refuses TLS 1.1 and older (RFC 8996)."""
    from netsmtp.tls import server_context
    context = server_context(tls_files[1], tls_files[2])
    assert context.minimum_version >= ssl.TLSVersion.TLSv1_2
