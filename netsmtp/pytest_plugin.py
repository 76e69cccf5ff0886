"""The pytest plugin: a real netsmtp server for the tests of an application that sends mail.

Registered through the `pytest11` entry point, so installing netsmtp makes
two fixtures available: `smtp_server`, a server with the defaults, and
`make_smtp_server(**options)`, a factory taking the keywords of
netsmtp.Options plus refuse_recipients=[...].  Each server listens on
127.0.0.1 and a free port, serves its sessions in threads, spools to a
temporary directory, and is stopped after the test.  It needs no network
beyond the loopback, and relays nothing: no queue runner ever reads its
spool.  This module is loaded by pytest only; netsmtp itself never imports it.
"""

import email
import email.policy
import os
import socket
import socketserver
import threading
import time

import pytest

from .envelope import Envelope
from .options import Options
from .replies import SMTPError
from .session import Session
from .spool import Spool
from .transport import SocketTransport

# A test server answers at once: no tarpit, no DNS lookup of the host's name.
TEST_DEFAULTS = {"listen": "127.0.0.1:0", "hostname": "localhost", "error_delay": 0,
                 "auth_fail_delay": 0}


class TestSession(Session):
    """A session that refuses the recipients it was told to."""

    def check_rcpt_to(self, address, params):
        if address.lower() in self.server.refused:
            raise SMTPError("550 5.1.1", address)
        return super().check_rcpt_to(address, params)


class TellingSpool(Spool):
    """A spool that calls arrived() after each commit, to wake wait_for()."""

    def __init__(self, path, arrived):
        super().__init__(path)
        self.arrived = arrived

    def create(self, envelope):
        return TellingWriter(super().create(envelope), self.arrived)


class TellingWriter:
    def __init__(self, writer, arrived):
        self.writer, self.arrived = writer, arrived

    def write(self, data):
        self.writer.write(data)

    def commit(self):
        self.writer.commit()
        self.arrived()

    def close(self):
        self.writer.close()


class _Handler(socketserver.StreamRequestHandler):
    def setup(self):
        self.request.settimeout(self.server.options.timeout)
        super().setup()

    def handle(self):
        server = self.server.owner
        transport = SocketTransport(self.request, server.options.timeout,
                                    server.options.tls_timeout)
        session = server.session_class(self.rfile, self.wfile, peer=self.client_address[0],
                                       options=server.options, spool=server.spool,
                                       transport=transport)
        session.server = server
        with self.server.live_lock:
            self.server.live[self.request] = transport  # stop() ends it (its socket, TLS or not)
        session.handle()
        transport.close()


class _ThreadingServer(socketserver.ThreadingTCPServer):
    """Keeps each session's thread and transport, so that stop() can end them all."""

    daemon_threads = True
    block_on_close = False  # stop() ends and joins the sessions itself, with a bound
    allow_reuse_address = True

    def __init__(self, *args):
        self.live_lock = threading.Lock()
        self.live = {}      # request socket -> itself, then its session's transport
        self.threads = {}   # request socket -> the thread serving it
        super().__init__(*args)

    def process_request(self, request, client_address):
        thread = threading.Thread(target=self.process_request_thread,
                                  args=(request, client_address), daemon=True,
                                  name="netsmtp-test-session")
        with self.live_lock:
            self.live[request], self.threads[request] = request, thread
        thread.start()

    def shutdown_request(self, request):
        with self.live_lock:
            self.live.pop(request, None)
            self.threads.pop(request, None)
        super().shutdown_request(request)

    def end_sessions(self, timeout):
        """Shut down every session's socket (a client still connected reads EOF) and
        wait for its thread, so no thread outlives the server."""
        with self.live_lock:
            ends, threads = list(self.live.values()), list(self.threads.values())
        for end in ends:
            try:
                getattr(end, "sock", end).shutdown(socket.SHUT_RDWR)
            except OSError:
                pass  # already closed by its session
        deadline = time.monotonic() + timeout
        for thread in threads:
            thread.join(max(0.0, deadline - time.monotonic()))


class SMTPTestServer:
    """A running netsmtp server: host, port, messages, wait_for(), clear(), stop().

    messages are the spooled messages, oldest first, each an
    email.message.EmailMessage with .envelope (sender, recipients, client).
    """

    session_class = TestSession

    def __init__(self, spool_path, refuse_recipients=(), **options):
        values = {**TEST_DEFAULTS, "spool": os.fspath(spool_path), **options}
        self.options = Options(**values)
        self.refused = {address.lower() for address in refuse_recipients}
        self.spool = TellingSpool(self.options.spool, self.arrived)
        self.spool.prepare()
        self._arrival = threading.Condition()
        self._server = _ThreadingServer(self.options.listen, _Handler)
        self._server.options = self.options
        self._server.owner = self
        self.host, self.port = self._server.server_address[:2]
        self._thread = threading.Thread(target=self._server.serve_forever,
                                        kwargs={"poll_interval": 0.05}, daemon=True,
                                        name="netsmtp-test-server")
        self._thread.start()

    def arrived(self):
        with self._arrival:
            self._arrival.notify_all()

    @property
    def messages(self):
        found = []
        for _queue_id, envelope in self.spool.envelopes():
            if isinstance(envelope, Envelope):
                with envelope.open() as f:
                    message = email.message_from_binary_file(f, policy=email.policy.default)
                message.envelope = envelope
                found.append(message)
        return found

    def wait_for(self, count, timeout=5):
        """The messages once at least count arrived; TimeoutError after timeout seconds."""
        deadline = time.monotonic() + timeout
        with self._arrival:
            while True:
                messages = self.messages
                if len(messages) >= count:
                    return messages
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError("%d message(s) arrived at %s:%d in %ss, not %d" % (
                        len(messages), self.host, self.port, timeout, count))
                self._arrival.wait(left)  # woken by each commit

    def clear(self):
        """Forget the messages received so far."""
        for queue_id in self.spool.queue_ids():
            for path in (self.spool.entry_path(queue_id), self.spool.state_path(queue_id)):
                try:
                    os.unlink(path)
                except FileNotFoundError:
                    pass

    def stop(self):
        self._server.shutdown()
        self._server.end_sessions(5)
        self._server.server_close()
        self._thread.join(5)

    def __repr__(self):
        return "<SMTPTestServer %s:%d>" % (self.host, self.port)


@pytest.fixture
def make_smtp_server(tmp_path_factory):
    """make_smtp_server(**options) -> a started SMTPTestServer, stopped after the test.

    options are the keywords of netsmtp.Options (tls_cert, auth_file,
    max_size, ...) and refuse_recipients=[addresses answered 550 5.1.1].
    """
    servers = []

    def make(**options):
        spool = options.pop("spool", None) or tmp_path_factory.mktemp("netsmtp-spool")
        servers.append(SMTPTestServer(spool, **options))
        return servers[-1]

    yield make
    for server in servers:
        server.stop()


@pytest.fixture
def smtp_server(make_smtp_server):
    """A netsmtp server on 127.0.0.1 and a free port, with a temporary spool."""
    return make_smtp_server()
