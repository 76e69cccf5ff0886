"""--proxy-protocol in every server mode, against raw clients, swaks and a real HAProxy.

After the header the client is the header's source for everything: the
limits, the relay decision, HELO checks, the Received header and the logs
(which name the proxy too).  The header comes before the 220 and before an
implicit TLS handshake; nothing behind it is lost.
"""

import os
import socket
import struct
import subprocess
import sys

import pytest
from conftest import (ROOT, client_context, entries_of, free_port, need_tool, replies_of, spooled,
                      wait_for)
from test_server import Client

from netsmtp.proxy import V2_SIGNATURE
from netsmtp.spool import Spool

SERVERS = {"forking": ["--workers", "0"], "prefork": ["--workers", "2"]}
PROXY = ["--proxy-protocol", "--relay-networks", "127.0.0.0/8"]


def v1(source="192.0.2.7", port=40000):
    return ("PROXY TCP4 %s 127.0.0.1 %d 25\r\n" % (source, port)).encode()


def v2(source="192.0.2.7", port=40000, local=False):
    if local:
        return V2_SIGNATURE + b"\x20\x00\x00\x00"
    body = socket.inet_aton(source) + socket.inet_aton("127.0.0.1") + struct.pack("!HH", port, 25)
    return V2_SIGNATURE + b"\x21\x11" + struct.pack("!H", len(body)) + body


MESSAGE = (b"MAIL FROM:<a@client.test>\r\nRCPT TO:<u@mx.test>\r\nDATA\r\n"
           b"Subject: proxied\r\n\r\nhello\r\n.\r\n")


def everything(sock):
    sock.settimeout(15)
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data


@pytest.fixture(params=SERVERS.values(), ids=SERVERS.keys())
def server_flags(request):
    return request.param


@pytest.mark.parametrize("header", [v1(), v2()], ids=["v1", "v2"])
def test_header_source_is_the_client_for_everything(server_factory, server_flags, header):
    """P1/P7, P11: header and SMTP in one write; 220 and EHLO answered; the client
    192.0.2.7 may not relay although the proxy 127.0.0.1 may; its message's envelope
    and Received header say 192.0.2.7; the log names the proxy too."""
    server = server_factory(*server_flags, *PROXY)
    client = Client(server.port)
    client.send(header + b"EHLO c.test\r\n")
    assert client.reply()[0] == 220
    assert client.reply()[0] == 250
    client.send(b"MAIL FROM:<a@client.test>\r\nRCPT TO:<x@far.test>\r\nRSET\r\n")
    assert [client.reply()[0] for _ in range(3)] == [250, 550, 250]
    client.send(MESSAGE + b"QUIT\r\n")
    assert [client.reply()[0] for _ in range(5)] == [250, 250, 354, 250, 221]
    client.close()
    [(envelope, message)] = entries_of(server.spool)
    assert envelope.client == "192.0.2.7"
    assert message.startswith(b"Received: from c.test ([192.0.2.7])\r\n")
    wait_for(lambda: "192.0.2.7 via 127.0.0.1" in server.output(), what="the log line")
    assert "from proxy 127.0.0.1" in server.output()


@pytest.mark.parametrize("data", [b"EHLO c.test\r\n", b"PROXY TCP4 192.000.2.7 127.0.0.1 1 25\r\n",
                                  b"PROXY UNKNOWN\r\n", v2()[:12] + b"\x21\x31\x00\x00"],
                         ids=["smtp", "leading-zero", "unknown", "af-unix"])
def test_invalid_header_gets_at_most_one_421_and_a_log_line(server_factory, server_flags, data):
    """No 220 before a valid header: an invalid one gets one 421 4.3.0 line, then EOF."""
    server = server_factory(*server_flags, *PROXY)
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        sock.sendall(data)
        replies = replies_of(everything(sock))
    assert replies == [(421, [replies[0][1][0]])] and replies[0][1][0].startswith("421 4.3.0 ")
    wait_for(lambda: "invalid PROXY header" in server.output(), what="the log line")
    assert spooled(Spool(server.spool)) == []


def test_no_header_within_the_timeout_is_closed(server_factory):
    """P13: a client that sends nothing hears no 220, only the 421, after --proxy-timeout."""
    server = server_factory("--workers", "0", "--proxy-protocol", "--proxy-timeout", "0.3")
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        replies = replies_of(everything(sock))
    assert [code for code, _ in replies] == [421]
    wait_for(lambda: "within 0.3s" in server.output(), what="the log line")


def test_source_outside_the_proxy_networks_is_closed(server_factory, server_flags):
    """P14: a header from an address not in --proxy-networks: closed without a word."""
    server = server_factory(*server_flags, "--proxy-protocol", "--proxy-networks", "192.0.2.0/24")
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        sock.sendall(v1() + b"EHLO c.test\r\n")
        assert everything(sock) == b""
    wait_for(lambda: "--proxy-networks only" in server.output(), what="the log line")


def test_local_health_check_uses_the_proxy_address_but_may_not_relay(server_factory):
    """P8: v2 LOCAL is greeted; the session is the proxy's (127.0.0.1, a relay
    network) yet it may not relay, while local domains still work."""
    server = server_factory("--workers", "0", *PROXY)
    client = Client(server.port)
    client.send(v2(local=True) + b"EHLO haproxy.test\r\n")
    assert [client.reply()[0] for _ in range(2)] == [220, 250]
    client.send(b"MAIL FROM:<a@client.test>\r\nRCPT TO:<x@far.test>\r\nRCPT TO:<u@mx.test>\r\n"
                b"QUIT\r\n")
    assert [client.reply()[0] for _ in range(4)] == [250, 550, 250, 221]
    client.close()
    wait_for(lambda: "PROXY v2 LOCAL" in server.output(), what="the log line")


def test_limits_count_the_client_not_the_proxy(server_factory, server_flags):
    """Admission after the header: with one session per client, two clients behind
    the same proxy both get in, and the second session of one of them is refused."""
    server = server_factory(*server_flags, "--proxy-protocol", "--relay-networks", "none",
                            "--max-sessions-per-client", "1")
    first = Client(server.port)
    first.send(v1("192.0.2.7"))
    assert first.reply()[0] == 220
    other = Client(server.port)
    other.send(v1("192.0.2.8"))
    assert other.reply()[0] == 220
    again = Client(server.port)
    again.send(v1("192.0.2.7", 40001))
    code, lines = again.reply()
    assert code == 421 and lines[0].startswith("421 4.7.0")
    for client in (first, other, again):
        client.close()


@pytest.mark.parametrize("helo, code", [("[192.0.2.7]", 250), ("[127.0.0.1]", 554)])
def test_helo_checks_see_the_client(server_factory, helo, code):
    """--helo-verify compares the HELO literal with the header's source, not the proxy."""
    server = server_factory("--workers", "0", *PROXY, "--helo-verify")
    client = Client(server.port)
    client.send(v2() + b"EHLO %s\r\n" % helo.encode())
    assert client.reply()[0] == 220
    assert client.reply()[0] == code
    client.close()


def test_header_comes_before_implicit_tls(server_factory, tls_files):
    """P12: the header, then the TLS handshake, then the 220 inside TLS."""
    ca, cert, key = tls_files
    server = server_factory("--workers", "0", *PROXY, "--tls-cert", cert, "--tls-key", key,
                            "--tls-on-connect")
    raw = socket.create_connection(("127.0.0.1", server.port), timeout=10)
    raw.sendall(v2())
    with client_context(ca).wrap_socket(raw, server_hostname="mx.test") as tls:
        reader = tls.makefile("rb")
        assert reader.readline().startswith(b"220 ")
        tls.sendall(b"EHLO c.test\r\nMAIL FROM:<a@c.test>\r\nRCPT TO:<x@far.test>\r\n")
        while reader.readline()[3:4] == b"-":
            pass
        assert reader.readline().startswith(b"250")
        assert reader.readline().startswith(b"550 5.7.1")


def stdin_session(tmp_path, data, fd0, env=None, args=()):
    """--stdin --proxy-protocol on a pipe or a TCP socket on fd 0; the client's bytes."""
    spool = str(tmp_path / "spool")
    argv = [sys.executable, "-m", "netsmtp", "--stdin", "--spool", spool, "--hostname",
            "mx.test", "--local-domains", "mx.test", *PROXY, *args]
    environ = {k: v for k, v in os.environ.items()
               if k not in ("TCPREMOTEIP", "REMOTE_HOST", "SOCAT_PEERADDR")}
    environ.update(env or {})
    if fd0 == "pipe":
        proc = subprocess.run(argv, input=data, capture_output=True, cwd=ROOT, timeout=30,
                              env=environ)
        return proc.stdout, proc.stderr.decode(), spool
    listener = socket.create_server(("127.0.0.1", 0))
    client = socket.create_connection(listener.getsockname())
    accepted, _ = listener.accept()
    listener.close()
    proc = subprocess.Popen(argv, stdin=accepted, stdout=accepted, stderr=subprocess.PIPE,
                            cwd=ROOT, env=environ)
    accepted.close()
    client.sendall(data)
    client.shutdown(socket.SHUT_WR)
    received = everything(client)
    client.close()
    stderr = proc.stderr.read().decode()
    proc.wait(30)
    return received, stderr, spool


def entries(spool):
    return [envelope for envelope, _ in entries_of(spool)]


@pytest.mark.parametrize("fd0", ["pipe", "socket"])
def test_stdin_mode_reads_exactly_the_header(tmp_path, fd0):
    """Under --stdin (a pipe named by TCPREMOTEIP, or a TCP socket on fd 0) the
    header's source is the client and the SMTP right behind the header is intact."""
    env = {"TCPREMOTEIP": "127.0.0.1"} if fd0 == "pipe" else {}
    data = v1() + b"EHLO c.test\r\n" + MESSAGE + b"QUIT\r\n"
    out, stderr, spool = stdin_session(tmp_path, data, fd0, env)
    assert [code for code, _ in replies_of(out)] == [220, 250, 250, 250, 354, 250, 221], stderr
    [envelope] = entries(spool)
    assert envelope.client == "192.0.2.7"


def test_stdin_mode_pipe_without_an_address_is_not_a_trusted_proxy(tmp_path):
    """A pipe with no address is "local", which is in --proxy-networks only when listed,
    so a front end that hides the real peer cannot have its clients forge addresses."""
    out, stderr, _ = stdin_session(tmp_path, v1("127.0.0.1") + b"EHLO c.test\r\n", "pipe")
    assert out == b"" and "--proxy-networks only" in stderr
    out, stderr, _ = stdin_session(tmp_path, v1() + b"EHLO c.test\r\nQUIT\r\n", "pipe",
                                   args=["--proxy-networks", "local"])
    assert [code for code, _ in replies_of(out)] == [220, 250, 221], stderr


def test_swaks_sends_a_v2_header(server_factory, server_flags):
    """swaks --proxy-version 2 --proxy-source: the message's client is the proxied source."""
    swaks = need_tool("swaks")
    server = server_factory(*server_flags, *PROXY)
    result = subprocess.run(
        [swaks, "--server", "127.0.0.1:%d" % server.port, "--to", "u@mx.test",
         "--from", "a@client.test", "--proxy-version", "2", "--proxy-family", "AF_INET",
         "--proxy-source", "198.51.100.9", "--proxy-source-port", "40000",
         "--proxy-dest", "127.0.0.1", "--proxy-dest-port", "25"],
        capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    [envelope] = entries(server.spool)
    assert envelope.client == "198.51.100.9"


def test_swaks_v1_header_for_a_relay_attempt(server_factory):
    """swaks --proxy-version 1 from a client outside the relay networks: 550 5.7.1."""
    swaks = need_tool("swaks")
    server = server_factory("--workers", "0", *PROXY)
    result = subprocess.run(
        [swaks, "--server", "127.0.0.1:%d" % server.port, "--to", "x@far.test",
         "--from", "a@client.test", "--proxy-version", "1", "--proxy-family", "TCP4",
         "--proxy-source", "203.0.113.5", "--proxy-source-port", "40000",
         "--proxy-dest", "127.0.0.1", "--proxy-dest-port", "25"],
        capture_output=True, text=True, timeout=60)
    assert "550 5.7.1" in result.stdout, result.stdout + result.stderr
    assert spooled(Spool(server.spool)) == []


HAPROXY_CONFIG = """\
global
    log stderr format raw daemon
defaults
    mode tcp
    log global
    timeout connect 5s
    timeout client 1m
    timeout server 1m
frontend fe_v1
    bind 127.0.0.1:%(v1)d
    default_backend be_v1
backend be_v1
    server ns 127.0.0.1:%(netsmtp)d send-proxy
frontend fe_v2
    bind 127.0.0.1:%(v2)d
    default_backend be_v2
backend be_v2
    server ns 127.0.0.1:%(netsmtp)d send-proxy-v2 proxy-v2-options crc32c check inter 200ms
frontend fe_tls
    bind 127.0.0.1:%(tls)d ssl crt %(pem)s
    default_backend be_tls
backend be_tls
    server ns 127.0.0.1:%(netsmtp)d send-proxy-v2-ssl-cn proxy-v2-options crc32c
"""


@pytest.fixture
def haproxy(tmp_path, tls_files):
    """A real HAProxy in front of a netsmtp: v1, v2 (CRC32C, health checks) and TLS offload."""
    path = need_tool("haproxy")
    _, cert, key = tls_files
    pem = tmp_path / "haproxy.pem"
    pem.write_text(open(cert).read() + open(key).read())
    ports = {"v1": free_port(), "v2": free_port(), "tls": free_port()}

    def start(netsmtp_port):
        config = tmp_path / "haproxy.cfg"
        config.write_text(HAPROXY_CONFIG % {**ports, "netsmtp": netsmtp_port, "pem": pem})
        proc = subprocess.Popen([path, "-f", str(config), "-db"], stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        started.append(proc)

        def up():
            try:
                socket.create_connection(("127.0.0.1", ports["tls"]), 1).close()
                return True
            except OSError:
                return proc.poll() is not None
        wait_for(up, what="haproxy")
        assert proc.poll() is None, "haproxy did not start"
        return ports
    started = []
    yield start
    for proc in started:
        proc.terminate()
        proc.wait(10)


def swaks_via(port, *args, bind="127.0.0.2", to="u@mx.test"):
    swaks = need_tool("swaks")
    return subprocess.run([swaks, "--server", "127.0.0.1:%d" % port, "-li", bind, "--to", to,
                           "--from", "a@client.test", *args],
                          capture_output=True, text=True, timeout=60)


def test_haproxy_send_proxy_v1_and_v2(server_factory, haproxy):
    """HAProxy's send-proxy and send-proxy-v2 (with CRC32C): swaks bound to
    127.0.0.2 is the client in the envelope and the log; HAProxy's v2 health checks
    (LOCAL) are greeted and logged."""
    server = server_factory("--workers", "2", *PROXY, "--relay-networks", "127.0.0.1/32")
    ports = haproxy(server.port)
    for port in (ports["v1"], ports["v2"]):
        result = swaks_via(port)
        assert result.returncode == 0, result.stdout + result.stderr
    assert [e.client for e in entries(server.spool)] == ["127.0.0.2", "127.0.0.2"]
    # 127.0.0.2 is no relay network, though HAProxy's own 127.0.0.1 is.
    assert "550 5.7.1" in swaks_via(ports["v2"], to="x@far.test").stdout
    wait_for(lambda: "PROXY v2 LOCAL" in server.output(), what="a health check")
    assert "127.0.0.2 via 127.0.0.1" in server.output()


def test_haproxy_tls_facts_are_logged_never_trusted(server_factory, haproxy, tls_files):
    """TLS offloaded at HAProxy: its SSL TLV is shown in the log, but the session
    is not TLS, so --require-tls still refuses MAIL with 530."""
    ca, _, _ = tls_files
    server = server_factory("--workers", "0", *PROXY, "--require-tls")
    ports = haproxy(server.port)
    raw = socket.create_connection(("127.0.0.1", ports["tls"]), timeout=10)
    with client_context(ca).wrap_socket(raw, server_hostname="mx.test") as tls:
        reader = tls.makefile("rb")
        assert reader.readline().startswith(b"220 ")
        tls.sendall(b"EHLO c.test\r\nMAIL FROM:<a@client.test>\r\n")
        while reader.readline()[3:4] == b"-":
            pass
        assert reader.readline().startswith(b"530 5.7.0")
    wait_for(lambda: "TLS at the proxy: TLSv1.3" in server.output(), what="the TLS log line")


def test_auth_failures_count_against_the_client(server_factory, tmp_path):
    """A failed AUTH behind the proxy is counted for the header's source, 192.0.2.7,
    not for the proxy 127.0.0.1 that all clients share."""
    import base64

    from netsmtp.auth import hash_password
    from netsmtp.limits import FailureLog
    users = tmp_path / "users"
    users.write_text("alice:%s\n" % hash_password("right"))
    server = server_factory("--workers", "0", *PROXY, "--auth-file", str(users),
                            "--auth-plaintext", "--auth-fail-delay", "0")
    client = Client(server.port)
    client.send(v2() + b"EHLO c.test\r\nAUTH PLAIN " + base64.b64encode(b"\0alice\0wrong")
                + b"\r\n")
    assert [client.reply()[0] for _ in range(3)] == [220, 250, 535]
    client.close()
    failures = FailureLog(server.spool)
    assert failures.recent("192.0.2.7") == 1
    assert failures.recent("127.0.0.1") == 0
