"""The forking TCP server: one child process per connection."""

import contextlib
import logging
import os
import select
import signal
import socket
import socketserver

from .inetd import stop_on_signals
from .limits import Limits, refuse_connection
from .session import Session
from .transport import SocketTransport

log = logging.getLogger("netsmtp")


@contextlib.contextmanager
def stop_signals(server):
    """While the block runs, SIGTERM and SIGINT set server.stop_requested.

    Yields a file descriptor that becomes readable when a signal arrives, so
    a select() on it returns at once instead of at its next timeout.
    """
    wake_read, wake_write = os.pipe()
    os.set_blocking(wake_read, False)
    os.set_blocking(wake_write, False)
    previous = signal.set_wakeup_fd(wake_write)

    def stop(signum, frame):
        server.stop_requested = True
    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    try:
        yield wake_read
    finally:
        signal.set_wakeup_fd(previous)
        os.close(wake_read)
        os.close(wake_write)


class SessionHandler(socketserver.StreamRequestHandler):
    """Serve one accepted connection with the server's session class.

    Runs in a forked child or a prefork worker; server needs options, spool
    and session_class.
    """

    def setup(self):
        self.request.settimeout(self.server.options.timeout)
        self.request.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        super().setup()

    def handle(self):
        options = self.server.options
        transport = SocketTransport(self.request, options.timeout, options.tls_timeout)
        self.session = session = self.server.session_class(
            self.rfile, self.wfile, peer=self.client_address[0],
            options=options, spool=self.server.spool, transport=transport)
        stop_on_signals(session)
        # A stop that came before the session's handler was in place counts.
        if self.server.stop_requested:
            session.stopping = True
        session.handle()
        transport.close()  # after STARTTLS the runner's socket is no longer it


class ForkingServer(socketserver.ForkingTCPServer):
    """A ForkingTCPServer with explicit limits and a graceful stop.

    socketserver's defaults (a backlog of 5, 40 children) collapse under
    load; options.backlog and options.max_sessions set both.  SIGTERM or
    SIGINT stops accepting, passes SIGTERM on to the sessions (which finish
    their current message) and returns from serve() once all have ended.
    """

    allow_reuse_address = True

    def __init__(self, options, spool, session_class=Session):
        self.options = options
        self.spool = spool
        self.session_class = session_class
        self.request_queue_size = options.backlog
        # self.limits refuses the session over max_sessions with a 421;
        # socketserver would instead stop accepting at max_children.
        self.max_children = options.max_sessions + 1
        self.limits = Limits(options)
        self.sessions = {}  # child pid -> client address, for limits.release()
        self.stop_requested = False
        host, port = options.listen
        if ":" in host:
            self.address_family = socket.AF_INET6
        super().__init__((host, port), SessionHandler)

    def serve(self):
        """Accept connections until SIGTERM or SIGINT, then wait for the sessions."""
        with stop_signals(self) as wake:
            while not self.stop_requested:
                ready, _, _ = select.select([self.socket, wake], [], [], 1.0)
                if wake in ready:
                    os.read(wake, 512)
                if self.socket in ready and not self.stop_requested:
                    self.timeout = 0
                    self.handle_request()
                self.collect_children()
        children = list(self.active_children or ())
        for pid in children:
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        log.info("stopping: %d session(s) to finish", len(children))
        self.server_close()
        log.info("stopped")

    def process_request(self, request, client_address):
        """Admit the connection (netsmtp.limits) before a child is forked for it."""
        peer = client_address[0]
        reason = self.limits.admit(peer)
        if reason is not None:
            refuse_connection(request, self.options, reason)
            self.shutdown_request(request)
            return
        known = set(self.active_children or ())
        try:
            super().process_request(request, client_address)  # the child exits in it
        finally:
            started = set(self.active_children or ()) - known
            if started:
                self.sessions[started.pop()] = peer
            else:
                self.limits.release(peer)

    def collect_children(self, *, blocking=False):
        super().collect_children(blocking=blocking)
        for pid in set(self.sessions) - set(self.active_children or ()):
            self.limits.release(self.sessions.pop(pid))

    def finish_request(self, request, client_address):
        # In the child: it must not hold the listening socket, for once the
        # parent closes it on shutdown nobody would accept what queues there.
        self.socket.close()
        signal.set_wakeup_fd(-1)
        super().finish_request(request, client_address)

    def handle_error(self, request, client_address):
        log.exception("error serving %s", client_address)
