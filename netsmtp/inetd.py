"""One session on stdin/stdout, for inetd, xinetd, tcpserver and systemd.

The superserver starts a process per connection, so start-up is the price
of every message: this module imports nothing a plain session does not use.
"""

import os
import select
import signal
import socket
import stat

from .limits import SharedLimits, limits_configured, refusal
from .session import Session, ShuttingDown
from .transport import PipeTransport, SocketTransport


def stop_on_signals(session):
    """Make SIGTERM and SIGINT stop session gracefully.

    An idle session (no transaction) is interrupted at once and says 421; a
    session in a transaction finishes its current message first.
    """
    def stop(signum, frame):
        session.stopping = True
        if session.idle:
            raise ShuttingDown
    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)


class PipeReader:
    """read1() on a pipe with an idle timeout, as a socket timeout gives."""

    def __init__(self, fd, timeout):
        self.fd = fd
        self.timeout = timeout

    def read1(self, size):
        ready, _, _ = select.select([self.fd], [], [], self.timeout)
        if not ready:
            raise TimeoutError("idle timeout")
        return os.read(self.fd, size)


class PipeWriter:
    """write() to a pipe with a timeout, so a client that stops reading ends the session."""

    def __init__(self, fd, timeout):
        self.fd = fd
        self.timeout = timeout

    def write(self, data):
        # A pipe select() calls writable has room for PIPE_BUF octets, so
        # writes of at most that much never block.
        view = memoryview(data)
        while view:
            _, ready, _ = select.select([], [self.fd], [], self.timeout)
            if not ready:
                raise TimeoutError("write timeout")
            view = view[os.write(self.fd, view[:select.PIPE_BUF]):]

    def flush(self):
        pass


def stdin_is_socket():
    return stat.S_ISSOCK(os.fstat(0).st_mode)


def serve_stdin(options, spool, session_class=Session):
    """Serve one session on fd 0/1, as inetd, xinetd or systemd hand it over.

    The client address comes from the socket on fd 0, else from the
    superserver's environment (TCPREMOTEIP from tcpserver, REMOTE_HOST from
    xinetd), else the session is local.
    """
    if stdin_is_socket():
        sock = socket.socket(fileno=os.dup(0))
        sock.settimeout(options.timeout)
        peer = None
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            peer = sock.getpeername()[0]
        transport = SocketTransport(sock, options.timeout, options.tls_timeout)
        rfile, wfile = transport.files()
    else:
        peer = os.environ.get("TCPREMOTEIP") or os.environ.get("REMOTE_HOST") or None
        transport = PipeTransport(0)
        rfile, wfile = PipeReader(0, options.timeout), PipeWriter(1, options.timeout)
    limits = None
    if limits_configured(options):
        # Each inetd process is one session: the counts live in the spool.
        limits = SharedLimits(options)
        reason = limits.admit(peer)
        if reason is not None:
            if not options.tls_on_connect:
                wfile.write(refusal(options, reason))
                wfile.flush()
            transport.close()
            return
    session = session_class(rfile, wfile, peer=peer, options=options, spool=spool,
                            transport=transport)
    stop_on_signals(session)
    try:
        session.handle()
    finally:
        if limits is not None:
            limits.release(peer)
        transport.close()
