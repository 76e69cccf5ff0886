"""The loads: each runs once against a started peer and returns its figures.

smtp-source does the message loads (-d reuses connections, -s runs sessions
in parallel, -m counts the messages of all sessions together).  A small
Python client pipelines MAIL/RCPT/DATA for latency percentiles, and sends
the 100 MB message, so the receiving process can be measured while the
connection is still open.
"""

import resource
import socket
import subprocess
import sys
import time

from peers import DOMAIN, peak_rss_kb, process_tree, tool, tree_cpu_seconds

MESSAGE_SIZE = 2048


class LoadFailed(Exception):
    """The load generator reported an error; the figure is not valid."""


def smtp_source(port, messages, sessions, reuse, size=MESSAGE_SIZE):
    """Seconds for smtp-source to send messages over sessions parallel sessions."""
    args = [tool("smtp-source"), "-s", str(sessions), "-m", str(messages), "-l", str(size),
            "-f", "sender@client.test", "-t", "user@" + DOMAIN, "-M", "client.test"]
    if reuse:
        args.append("-d")
    started = time.perf_counter()
    result = subprocess.run(args + ["127.0.0.1:%d" % port], capture_output=True, text=True)
    elapsed = time.perf_counter() - started
    if result.returncode != 0 or "fatal" in result.stderr or "error" in result.stderr:
        raise LoadFailed(result.stderr.strip()[-300:] or "exit %d" % result.returncode)
    return elapsed


class Messages:
    """2 KB messages: reused connections (-d) or one message per connection.

    Besides msg/s, cpu_us: the user + system CPU of all the peer's
    processes (Postfix's smtpd, cleanup, qmgr and the rest included, until
    its queue is empty) divided by the messages.
    """

    unit = "msg/s"

    def __init__(self, name, sessions, reuse, messages):
        self.name, self.sessions, self.reuse, self.messages = name, sessions, reuse, messages

    def run(self, peer):
        # A rate needs fewer messages where each connection costs a process start.
        count = self.messages if self.reuse else max(
            self.sessions * 5, int(self.messages * peer.connection_share))
        try:
            before = tree_cpu_seconds(peer.root_pid)
            elapsed = smtp_source(peer.port, count, self.sessions, self.reuse)
            peer.settle()
            cpu = tree_cpu_seconds(peer.root_pid) - before
            stored = peer.stored()
            if stored is not None and stored != count:
                raise LoadFailed("%d messages stored, %d sent" % (stored, count))
        finally:
            peer.forget_messages()
        return {"value": count / elapsed, "cpu_us": 1e6 * cpu / count}


def reply(reader):
    """Read one reply; returns (code, last line)."""
    while True:
        line = reader.readline()
        if not line:
            raise LoadFailed("connection closed")
        if line[3:4] != b"-":
            return int(line[:3]), line


def expect(reader, code):
    got, line = reply(reader)
    if got != code:
        raise LoadFailed("expected %d, got %r" % (code, line[:200]))


class BigMessage:
    """One large message: wall time to 250 and the receiver's peak RSS."""

    unit = "s"

    def __init__(self, name, size):
        self.name, self.size = name, size

    def run(self, peer):
        line = b"x" * 998 + b"\r\n"   # RFC 5321 section 4.5.3.1.6: 1000 with CRLF
        chunk = line * 1024
        with socket.create_connection(("127.0.0.1", peer.port), timeout=600) as sock:
            reader = sock.makefile("rb")
            expect(reader, 220)
            sock.sendall(b"EHLO client.test\r\n")
            expect(reader, 250)
            sock.sendall(b"MAIL FROM:<sender@client.test> SIZE=%d\r\n" % self.size)
            expect(reader, 250)
            sock.sendall(b"RCPT TO:<user@%s>\r\n" % DOMAIN.encode())
            expect(reader, 250)
            sock.sendall(b"DATA\r\n")
            expect(reader, 354)
            started = time.perf_counter()
            sock.sendall(b"Subject: big\r\n\r\n")
            sent = 0
            while sent < self.size:
                sock.sendall(chunk)
                sent += len(chunk)
            sock.sendall(b".\r\n")
            expect(reader, 250)
            elapsed = time.perf_counter() - started
            # The session is still open, so its process is still there to measure.
            rss_kb, _ = peak_rss_kb(process_tree(peer.root_pid))
            sock.sendall(b"QUIT\r\n")
            reply(reader)
            reader.close()
        peer.forget_messages()
        return {"value": elapsed, "rss_mb": rss_kb / 1024}


class Pipelined:
    """One connection, MAIL, RCPT and DATA sent in one write (RFC 2920).

    Per-message latency from MAIL to the final 250, as p50 and p99, and the
    rate; a small Python client, as smtp-source does not pipeline.
    """

    unit = "msg/s"

    def __init__(self, name, messages):
        self.name, self.messages = name, messages

    def run(self, peer):
        body = b"Subject: pipelined\r\n\r\n" + (b"x" * 78 + b"\r\n") * 25 + b".\r\n"
        envelope = b"MAIL FROM:<sender@client.test>\r\nRCPT TO:<user@%s>\r\nDATA\r\n" % (
            DOMAIN.encode())
        latencies = []
        try:
            with socket.create_connection(("127.0.0.1", peer.port), timeout=60) as sock:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                reader = sock.makefile("rb")
                expect(reader, 220)
                sock.sendall(b"EHLO client.test\r\n")
                expect(reader, 250)
                started = time.perf_counter()
                for _ in range(self.messages):
                    sent = time.perf_counter()
                    sock.sendall(envelope)
                    for code in (250, 250, 354):
                        expect(reader, code)
                    sock.sendall(body)
                    expect(reader, 250)
                    latencies.append(time.perf_counter() - sent)
                elapsed = time.perf_counter() - started
                sock.sendall(b"QUIT\r\n")
                reply(reader)
                reader.close()
        finally:
            peer.forget_messages()
        latencies.sort()
        return {"value": self.messages / elapsed,
                "p50_ms": 1000 * latencies[len(latencies) // 2],
                "p99_ms": 1000 * latencies[int(len(latencies) * 0.99)]}


class StdinStartup:
    """netsmtp --stdin under tcpserver: connections/s and CPU per connection."""

    unit = "conn/s"

    def __init__(self, name, connections):
        self.name, self.connections = name, connections

    def run(self, peer):
        before = peer.children_cpu_seconds()
        elapsed = smtp_source(peer.port, self.connections, 1, reuse=False)
        time.sleep(0.2)  # let tcpserver reap the last session
        cpu = peer.children_cpu_seconds() - before
        return {"value": self.connections / elapsed,
                "cpu_ms": 1000 * cpu / self.connections}


def python_pass_floor(count):
    """`python3 -c pass` in a loop: runs/s and CPU per run, the start-up floor."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    for _ in range(count):
        subprocess.run([sys.executable, "-c", "pass"], check=True)
    elapsed = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return {"value": count / elapsed, "cpu_ms": 1000 * cpu / count}


def loads(quick):
    """The loads by name; quick mode sends far fewer messages."""
    n = 200 if quick else 4000
    one = 100 if quick else 1500
    return {load.name: load for load in (
        Messages("reused-1", 1, True, n),
        Messages("reused-10", 10, True, n),
        Messages("reused-50", 50, True, n),
        Messages("perconn-1", 1, False, one // 2),
        Messages("perconn-20", 20, False, one),
        Pipelined("pipelined-1", n // 4),
        BigMessage("big-100MB", (10 if quick else 100) * 1024 * 1024),
    )}
