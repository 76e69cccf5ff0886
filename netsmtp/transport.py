"""What a session may ask of its connection beyond reading and writing.

A Session works over any binary reader and writer; a transport adds the two
things only a real connection can do: wait for input with a deadline (the
greeting pause that catches early talkers) and switch to TLS (RFC 3207).
Servers pass one as Session(..., transport=...); BytesIO tests pass none, so
their sessions neither pause nor offer STARTTLS.  open_stream() is the other
direction: the stream a session opens to a milter or a policy service.
"""

import os
import select
import socket

TIMEOUT_SLACK = 0.001  # seconds a socket's read bound may differ from the one asked for


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


class PipeTransport:
    """Pipes on fds (inetd handing over a pipe): they can wait, never do TLS."""

    can_tls = False

    def __init__(self, fd_in, fd_out, timeout):
        self.fd = fd_in
        self.reader = PipeReader(fd_in, timeout)
        self.writer = PipeWriter(fd_out, timeout)

    def files(self):
        return self.reader, self.writer

    def read_timeout(self, seconds):
        """Bound the next read to seconds (a deadline closer than the idle timeout)."""
        self.reader.timeout = seconds

    def readable(self, timeout):
        """True when input (or its end) arrives within timeout seconds."""
        ready, _, _ = select.select([self.fd], [], [], timeout)
        return bool(ready)

    def hung_up(self, timeout):
        """True when the client's end closes within timeout seconds, input pending or not."""
        return peer_gone(self.fd, timeout)

    def drain(self):
        pass

    def close(self):
        pass


def peer_gone(fd, timeout):
    """Wait up to timeout seconds for the other end of fd to close, without reading.

    POLLRDHUP (a socket's FIN) and POLLHUP (a reset, a pipe's last writer
    gone) are reported even behind unread input, which select() cannot see.
    """
    poller = select.poll()
    poller.register(fd, getattr(select, "POLLRDHUP", 0))
    events = poller.poll(max(0, timeout) * 1000)
    gone = getattr(select, "POLLRDHUP", 0) | select.POLLHUP | select.POLLERR | select.POLLNVAL
    return any(mask & gone for _, mask in events)


class SocketTransport:
    """A connected socket that can turn into TLS in place.

    files() gives the reader and writer of the socket as it is now; after
    start_tls() they are those of the TLS layer, and the old ones must not
    be used again: bytes they buffered were sent in plaintext.
    """

    can_tls = True

    def __init__(self, sock, timeout, tls_timeout):
        self.sock = sock
        self.timeout = timeout
        self.tls_timeout = tls_timeout

    def files(self):
        return self.sock.makefile("rb"), self.sock.makefile("wb")

    def read_timeout(self, seconds):
        """Bound the next read to seconds (a deadline closer than the idle timeout).

        Each settimeout() is an ioctl, and a session asks twice per command
        for nearly the same bound (the idle timeout, then the line's
        deadline microseconds less): a change under TIMEOUT_SLACK keeps the
        current one, so a read ends at most that late.
        """
        current = self.sock.gettimeout()
        if not current or abs(current - seconds) > TIMEOUT_SLACK:
            self.sock.settimeout(seconds)

    def readable(self, timeout):
        """True when input (or its end) arrives within timeout seconds."""
        pending = getattr(self.sock, "pending", None)
        if pending is not None and pending():
            return True
        ready, _, _ = select.select([self.sock], [], [], timeout)
        return bool(ready)

    def hung_up(self, timeout):
        """True when the client closes or resets within timeout seconds, input pending or not."""
        return peer_gone(self.sock.fileno(), timeout)

    def start_tls(self, context):
        """Run the server side of a TLS handshake, bounded by tls_timeout.

        Returns (rfile, wfile, facts) where facts is {"version", "cipher",
        "bits"}.  Raises OSError (ssl.SSLError, TimeoutError) on failure.
        """
        tls = context.wrap_socket(self.sock, server_side=True,
                                  do_handshake_on_connect=False)
        self.sock = tls
        tls.settimeout(self.tls_timeout)
        tls.do_handshake()
        tls.settimeout(self.timeout)
        cipher, _, bits = tls.cipher()
        rfile, wfile = self.files()
        return rfile, wfile, {"version": tls.version(), "cipher": cipher, "bits": bits}

    def drain(self):
        """Drop what the client sent unasked, so closing sends FIN, not RST.

        A reset could destroy the refusal before the client reads it.
        """
        try:
            self.sock.setblocking(False)
            for _ in range(16):
                if not self.sock.recv(65536):
                    break
        except (OSError, ValueError):
            pass
        finally:
            try:
                self.sock.settimeout(self.timeout)
            except OSError:
                pass

    def close(self):
        """Shut the connection down for both sides; never raises."""
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()


def open_stream(address, timeout):
    """A connected stream socket to ("inet", (host, port)) or ("unix", path); OSError if not."""
    kind, where = address
    if kind != "unix":
        return socket.create_connection(where, timeout=timeout)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        sock.connect(where)
    except OSError:
        sock.close()
        raise
    return sock
