"""One session on stdin/stdout, for inetd, xinetd, tcpserver, stunnel, socat and systemd.

The superserver starts a process per connection, so start-up is the price
of every message: this module imports nothing a plain session does not use.
"""

from .connection import Connection, serve
from .limits import SharedLimits, stdin_limits_configured
from .session import Session


def serve_stdin(options, spool, session_class=Session):
    """Serve one session on fd 0/1 (netsmtp.connection finds the client address).

    Each process is one session, so the counts of the limits live in the
    spool; they are used only when a limit was set explicitly.
    """
    connection = Connection.from_stdin(options)
    admission = []
    if stdin_limits_configured(options):
        admission.append(SharedLimits(options))
    serve(connection, options, spool, session_class, admission)
