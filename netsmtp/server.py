"""The forking TCP server: one child process per connection."""

import contextlib
import logging
import os
import select
import signal
import socketserver

from . import recipients
from .connection import Connection, Refuser, peer_of, serve
from .listener import open_listener
from .limits import GRACE, SessionTable, SharedLimits, rates_configured
from .session import Session

log = logging.getLogger(__name__)

DEFAULT_SLOTS = 4096  # sessions at once when --max-sessions is 0 (no cap)


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
        # A slot per child; twice max_sessions, so children still exiting
        # after their session do not hold up new ones (the table counts
        # only running sessions).  With no free slot the connection is
        # refused with a 421 at once; socketserver would block in waitpid()
        # at max_children instead, with connections piling up in the backlog.
        slots = 2 * options.max_sessions or DEFAULT_SLOTS
        self.max_children = slots + 1
        self.table = SessionTable(options, slots, grace=GRACE)
        self.free_slots = list(range(slots - 1, -1, -1))
        self.slot_of = {}  # child pid -> its slot in self.table
        self.admission = [self.table]
        if rates_configured(options):
            self.admission.append(SharedLimits(options, sessions=False))
        self.stop_requested = False
        # The socket comes from netsmtp.listener, which also makes Unix sockets.
        super().__init__(None, socketserver.BaseRequestHandler, bind_and_activate=False)
        self.socket.close()
        self.socket = open_listener(options.listen, options.backlog, options.listen_mode)
        self.server_address = self.socket.getsockname()
        self.refuser = Refuser(options, self.socket)

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
        """Fork a child for the connection in a free slot, or refuse it with a 421."""
        self.collect_children()
        if not self.free_slots:
            self.refuser.refuse(request, "too many sessions")
            return
        slot = self.free_slots.pop()
        self.table.use(slot)
        recipients.refresh(self.options)  # the child starts from the parent's table
        known = set(self.active_children or ())
        try:
            super().process_request(request, client_address)  # the child exits in it
        finally:
            started = set(self.active_children or ()) - known
            if started:
                self.slot_of[started.pop()] = slot
            else:
                self.free_slots.append(slot)

    def collect_children(self, *, blocking=False):
        super().collect_children(blocking=blocking)
        self.refuser.reap()
        for pid in set(self.slot_of) - set(self.active_children or ()):
            slot = self.slot_of.pop(pid)
            self.table.clear(slot)
            self.free_slots.append(slot)

    def finish_request(self, request, client_address):
        """In the child: serve the connection (netsmtp.connection)."""
        # It must not hold the listening socket, for once the parent closes
        # it on shutdown nobody would accept what queues there.
        self.socket.close()
        signal.set_wakeup_fd(-1)
        connection = Connection.from_socket(request, self.options, peer=peer_of(client_address))
        serve(connection, self.options, self.spool, self.session_class, self.admission,
              stop_requested=lambda: self.stop_requested)

    def handle_error(self, request, client_address):
        log.exception("error serving %s", client_address)
