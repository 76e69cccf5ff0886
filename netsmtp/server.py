"""The forking TCP server: one child process per connection."""

import logging
import os
import select
import signal
import socket
import socketserver

from .inetd import stop_on_signals
from .session import Session

log = logging.getLogger("netsmtp")


class SessionHandler(socketserver.StreamRequestHandler):
    """Serve one accepted connection with the server's session class (in a child)."""

    def setup(self):
        # The child must not hold the listening socket: once the parent
        # closes it on shutdown, nobody would accept what queues there.
        self.server.socket.close()
        signal.set_wakeup_fd(-1)
        self.request.settimeout(self.server.options.timeout)
        self.request.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        super().setup()

    def handle(self):
        session = self.server.session_class(
            self.rfile, self.wfile, peer=self.client_address[0],
            options=self.server.options, spool=self.server.spool)
        stop_on_signals(session)
        session.handle()


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
        self.max_children = options.max_sessions
        self.stop_requested = False
        host, port = options.listen
        if ":" in host:
            self.address_family = socket.AF_INET6
        super().__init__((host, port), SessionHandler)

    def serve(self):
        """Accept connections until SIGTERM or SIGINT, then wait for the sessions."""
        wake_read, wake_write = os.pipe()
        os.set_blocking(wake_read, False)
        os.set_blocking(wake_write, False)
        previous = signal.set_wakeup_fd(wake_write)

        def stop(signum, frame):
            self.stop_requested = True
        signal.signal(signal.SIGTERM, stop)
        signal.signal(signal.SIGINT, stop)
        try:
            while not self.stop_requested:
                ready, _, _ = select.select([self.socket, wake_read], [], [], 1.0)
                if wake_read in ready:
                    os.read(wake_read, 512)
                if self.socket in ready and not self.stop_requested:
                    self.timeout = 0
                    self.handle_request()
                self.collect_children()
        finally:
            signal.set_wakeup_fd(previous)
            os.close(wake_read)
            os.close(wake_write)
        log.info("stopping: %d session(s) to finish", len(self.active_children or ()))
        for pid in list(self.active_children or ()):
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        self.server_close()
        log.info("stopped")

    def handle_error(self, request, client_address):
        log.exception("error serving %s", client_address)
