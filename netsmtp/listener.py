"""The daemon's listening socket: TCP, or a Unix socket for local clients.

A Unix socket (--listen unix:PATH) is how mail stores and MTAs on the same
host usually reach an LMTP server (Postfix's lmtp:unix:, Dovecot's own
sockets); its clients have no address and are "local".  The socket file is
created with --listen-mode before anyone can connect, and a stale one left
by a server that died is replaced; a live one is never taken over.
"""

import errno
import os
import socket
import stat

from .options import UnixPath


class ListenError(OSError):
    """The listening socket cannot be made; the text says why."""


def describe(address):
    """ "127.0.0.1:2525", "[::1]:25" or "unix:PATH" for logs and errors."""
    if isinstance(address, UnixPath):
        return "unix:%s" % address
    host, port = address[:2]
    return ("[%s]:%d" if ":" in host else "%s:%d") % (host, port)


def open_listener(address, backlog, mode=0o660):
    """A listening socket on address ((host, port) or a UnixPath); raises OSError."""
    if not isinstance(address, UnixPath):
        host, port = address
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        return socket.create_server((host, port), family=family, backlog=backlog)
    remove_stale(address)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(address)
        # Before listen(): nobody can connect while the mode is still the umask's.
        os.chmod(address, mode)
        sock.listen(backlog)
    except BaseException:
        sock.close()
        raise
    return sock


def remove_stale(path):
    """Remove a socket file nobody listens on; refuse a live socket or any other file."""
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(info.st_mode):
        raise ListenError(errno.EEXIST, "%s exists and is not a socket" % path)
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(1.0)
    try:
        probe.connect(path)
    except (ConnectionRefusedError, FileNotFoundError):
        os.unlink(path)  # stale: its server is gone
        return
    except OSError:
        pass
    finally:
        probe.close()
    raise ListenError(errno.EADDRINUSE, "%s: a server is already listening there" % path)
