"""Shared fixtures: a socketless conversation, and real servers on port 0."""

import io
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time

import pytest

from netsmtp.envelope import Envelope
from netsmtp.options import Options
from netsmtp.session import Session
from netsmtp.spool import Spool

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IN_CI = os.environ.get("CI") == "true"


def need_tool(name):
    """Skip when a peer tool is missing locally; in CI a missing tool fails."""
    path = shutil.which(name) or next(
        (p for p in ("/usr/sbin/" + name, "/usr/lib/postfix/sbin/" + name) if os.path.exists(p)), None)
    if path is None:
        if IN_CI:
            pytest.fail("%s is not installed; .ci/run must install it" % name)
        pytest.skip("%s is not installed (apt-get install it to run this test)" % name)
    return path


def wait_for(predicate, timeout=15.0, what="condition"):
    """Poll a readiness condition (not a sleep standing in for one); returns its value."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError("timed out waiting for " + what)
        time.sleep(0.02)


def free_port():
    """A loopback port nothing listens on (for a peer that must be down, or xinetd)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def children(pid, state=None):
    """The pids whose parent is pid (and whose state letter is state), from /proc."""
    found = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open("/proc/%s/stat" % entry, "rb") as f:
                # Field 2 (comm) may hold spaces or ")": split after the last ")".
                fields = f.read().rsplit(b")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[1]) == pid and (state is None or fields[0] == state.encode()):
            found.add(int(entry))
    return found


def make_options(tmp_path, **overrides):
    # error_delay=0: the tarpit would only slow tests that are not about it.
    values = dict(spool=str(tmp_path / "spool"), hostname="mx.test",
                  local_domains="mx.test,example.test", error_delay=0)
    values.update(overrides)
    return Options(**values)


@pytest.fixture
def options(tmp_path):
    return make_options(tmp_path)


@pytest.fixture
def spool(options):
    spool = Spool(options.spool)
    spool.prepare()
    return spool


def replies_of(data):
    """Split server output into reply groups: [(code, [lines])]."""
    groups, current = [], []
    for line in data.decode("utf-8", "replace").split("\r\n")[:-1]:
        current.append(line)
        if len(line) < 4 or line[3] != "-":
            groups.append((int(line[:3]), current))
            current = []
    assert not current, "unterminated multi-line reply: %r" % current
    return groups


class Conversation:
    """Runs a Session over BytesIO: feed the client's bytes, get the replies."""

    def __init__(self, options, spool, session_class=Session, peer="192.0.2.1"):
        self.options, self.spool = options, spool
        self.session_class, self.peer = session_class, peer
        self.session = None

    def __call__(self, data, peer=None):
        if isinstance(data, (list, tuple)):
            data = b"".join(line if line.endswith(b"\n") else line + b"\r\n" for line in data)
        out = io.BytesIO()
        self.session = self.session_class(
            io.BytesIO(data), out, peer=self.peer if peer is None else peer,
            options=self.options, spool=self.spool)
        self.session.handle()
        return replies_of(out.getvalue())

    def codes(self, data, peer=None):
        return [code for code, _ in self(data, peer)]


@pytest.fixture
def converse(options, spool):
    """converse([b"EHLO x", ...]) -> [(code, lines)], greeting included."""
    return Conversation(options, spool)


def spooled(spool):
    """The entries of a spool directory, oldest first."""
    return sorted(f for f in os.listdir(spool.path) if f.endswith(".msg"))


def entries_of(spool):
    """[(envelope, message bytes)] of the spooled entries, oldest first; spool or its path."""
    spool = Spool(spool) if isinstance(spool, str) else spool
    found = []
    for name in spooled(spool):
        envelope = Envelope.thaw(os.path.join(spool.path, name))
        with envelope.open() as f:
            found.append((envelope, f.read()))
    return found


def only_entry(spool):
    """(envelope, message bytes) of the one spooled entry; fails unless there is exactly one."""
    entries = entries_of(spool)
    assert len(entries) == 1, [envelope.id for envelope, _ in entries]
    return entries[0]


def read_reply(source):
    """One whole (possibly multi-line) reply from a server: (code, [lines without CRLF]).

    source is a binary file (sock.makefile("rb")) or a socket.  A socket is read
    one octet at a time, so nothing after the reply is consumed: a TLS handshake
    may follow on it.  EOFError when the server closes first.
    """
    def socket_line():
        line = b""
        while not line.endswith(b"\n"):
            octet = source.recv(1)
            if not octet:
                break
            line += octet
        return line

    readline = source.readline if hasattr(source, "readline") else socket_line
    lines = []
    while True:
        line = readline()
        if not line:
            raise EOFError("server closed the connection")
        lines.append(line.decode("utf-8", "replace").rstrip("\r\n"))
        if line[3:4] != b"-":
            return int(lines[0][:3]), lines


class Recorded(Session):
    """Records each tarpit or AUTH pause instead of sleeping it."""

    pauses = ()  # an immutable default; each instance rebinds its own

    def pause(self, seconds):
        self.pauses = (*self.pauses, seconds)


class ServerProcess:
    """`python -m netsmtp` listening on 127.0.0.1:0, port read from its log.

    A thread drains the child's stderr from the start, so a chatty server
    never blocks on a full pipe, and it sets an event once the "listening on"
    line shows the port; the start waits on that event with a deadline, so a
    child that hangs without a word fails the test instead of hanging it.
    """

    START_TIMEOUT = 20.0
    command = (sys.executable, "-m", "netsmtp", "--listen", "127.0.0.1:0")

    def __init__(self, args, env=None):
        self.proc = subprocess.Popen([*self.command, *args], cwd=ROOT, stderr=subprocess.PIPE,
                                     text=True, env=env)
        self.log = []
        self.address = None
        self.listening = threading.Event()
        self.reader = threading.Thread(target=self._drain, daemon=True)
        self.reader.start()
        if not self.listening.wait(self.START_TIMEOUT) or self.address is None:
            self.proc.kill()
            self.proc.wait()
            self.reader.join(5)
            raise RuntimeError("server did not start within %ss: %s" % (
                self.START_TIMEOUT, self.output()))
        self.port = self.address[1]

    def _drain(self):
        for line in self.proc.stderr:
            self.log.append(line)
            found = self.address is None and re.search(r"listening on ([\d.]+):(\d+)", line)
            if found:
                self.address = (found.group(1), int(found.group(2)))
                self.listening.set()
        self.listening.set()  # the child closed stderr (it exited): stop waiting

    def stop(self, timeout=20):
        """SIGTERM the server and wait; returns its exit code."""
        if self.proc.poll() is None:
            self.proc.terminate()
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            code = self.proc.wait()
        self.reader.join(5)
        return code

    def output(self):
        return "".join(self.log)


@pytest.fixture
def server_factory(tmp_path):
    started = []

    def start(*args, spool=None, env=None):
        spool = spool or str(tmp_path / "spool")
        args = ["--spool", spool, "--hostname", "mx.test",
                "--local-domains", "mx.test,example.test", *args]
        server = ServerProcess(args, env=env)
        server.spool = spool
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


@pytest.fixture
def server(server_factory):
    """A netsmtp daemon (the default, prefork server) on a free port; .port, .spool, .stop()."""
    return server_factory()


@pytest.fixture
def tls_files(tmp_path):
    """A trustme test CA and a server certificate for mx.test: (ca, cert, key)."""
    import trustme
    ca = trustme.CA()
    issued = ca.issue_cert("mx.test", "127.0.0.1")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    issued.cert_chain_pems[0].write_to_path(str(cert))
    for pem in issued.cert_chain_pems[1:]:
        pem.write_to_path(str(cert), append=True)
    issued.private_key_pem.write_to_path(str(key))
    return ca, str(cert), str(key)


def client_context(ca):
    """A client SSLContext trusting only the test CA."""
    import ssl
    context = ssl.create_default_context()
    ca.configure_trust(context)
    return context
