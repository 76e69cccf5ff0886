"""One path from an accepted connection to a finished session, for every server.

The forking server, the prefork workers and --stdin differ only in how a
connection arrives.  From there on they share this module: socket setup,
the client's address and where it came from, admission, the session
(implicit TLS included) with its signal handlers, release and close.  A
defence written here holds in every server mode.
"""

import logging
import os
import signal
import socket
import stat

from .address import ip_of
from .limits import refusal, refuse_connection
from .replies import format_reply, printable
from .transport import PipeTransport, SocketTransport

log = logging.getLogger(__name__)

# Where --stdin finds the client address when fd 0 is no TCP socket, in this
# order: tcpserver, xinetd and stunnel, socat.
ADDRESS_VARIABLES = ("TCPREMOTEIP", "REMOTE_HOST", "SOCAT_PEERADDR")
REFUSAL_HANDSHAKE = 0.5  # seconds an implicit-TLS client gets to take its 421
REFUSERS = 16  # implicit-TLS refusals of an accepting process handshaking at once
REFUSER_LIFETIME = 2  # seconds after which such a refusal's child is gone (SIGALRM)


class Connection:
    """A client connection as a session needs it.

    transport waits and does TLS (netsmtp.transport); rfile and wfile are
    its reader and writer; peer is the client's IP address as text, or None
    when it is unknown (a "local" session); source says where peer came
    from ("socket", an ADDRESS_VARIABLES name, or "unknown").
    """

    def __init__(self, transport, rfile, wfile, peer, source):
        self.transport = transport
        self.rfile, self.wfile = rfile, wfile
        self.peer, self.source = peer, source
        self.proxy = None  # the netsmtp.proxy.ProxyHeader the connection began with

    @classmethod
    def from_socket(cls, sock, options, peer=None):
        """A connected socket: a TCP one gives its peer, unless peer is given."""
        sock.settimeout(options.timeout)
        source = "unknown"
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                if peer is None:
                    peer = sock.getpeername()[0]
            except OSError:  # the client is already gone
                pass
        if peer is not None:
            source = "socket"
        transport = SocketTransport(sock, options.timeout, options.tls_timeout)
        rfile, wfile = transport.files()
        return cls(transport, rfile, wfile, peer, source)

    @classmethod
    def from_stdin(cls, options, environ=None):
        """fd 0/1 as inetd, xinetd, tcpserver, stunnel, socat or systemd hand them over.

        The client address comes from fd 0 when it is a TCP socket, else
        from the first of ADDRESS_VARIABLES that holds an IP address, also
        when fd 0 is an AF_UNIX socketpair (socat EXEC:, stunnel exec =).
        """
        environ = os.environ if environ is None else environ
        if stat.S_ISSOCK(os.fstat(0).st_mode):
            connection = cls.from_socket(socket.socket(fileno=os.dup(0)), options)
        else:
            transport = PipeTransport(0, 1, options.timeout)
            connection = cls(transport, *transport.files(), None, "unknown")
        if connection.peer is None:
            connection.peer, connection.source = address_from(environ)
        if connection.peer is None:
            log.warning("local: no client address on fd 0 or in %s; a local session, "
                        "which may relay only if --relay-networks lists local",
                        "/".join(ADDRESS_VARIABLES))
        else:
            log.info("%s: client address from %s", printable(connection.peer),
                     connection.source)
        return connection

    def take_proxy_header(self, options):
        """--proxy-protocol: read the PROXY header; its source becomes the client.

        Only a proxy in options.proxy_networks may send one; any other
        source is closed unanswered.  The header is read off the socket (or
        fd 0) before anything else, so nothing of the SMTP or TLS behind it
        is consumed; an invalid one gets at most one 421 4.3.0 line (none
        under implicit TLS, where the client expects a handshake).  A v2
        LOCAL header (a health check) keeps the connection's own address and
        marks the session so that it may not relay.  Returns False when the
        connection must be closed.
        """
        from .address import in_networks
        from .proxy import ProxyError, read_header
        via = self.peer
        tag = printable(via or "local")
        if not in_networks(via, options.proxy_networks):
            log.warning("%s: PROXY header expected from --proxy-networks only; closed", tag)
            return False
        sock = getattr(self.transport, "sock", None)
        try:
            header = read_header(sock if sock is not None else self.transport.fd,
                                 options.proxy_timeout)
        except ProxyError as exc:
            log.warning("%s: invalid PROXY header, closed: %s", tag, printable(exc))
            if not options.tls_on_connect:
                self.send_now(format_reply("421 4.3.0", options.hostname))
            self.transport.drain()  # so the close is a FIN that lets the 421 be read
            return False
        header.via = via
        self.proxy = header
        if not header.local:
            self.peer, self.source = header.source[0], "PROXY v%d" % header.version
        log.info("%s: %s (from proxy %s)", printable(self.peer or "local"),
                 printable(header.describe()), tag)
        return True

    def send_now(self, data):
        """Write data without ever blocking the server for long; errors are ignored."""
        sock = getattr(self.transport, "sock", None)
        try:
            if sock is not None:
                sock.setblocking(False)
                sock.send(data)
            else:
                self.wfile.write(data)
                self.wfile.flush()
        except OSError:
            pass

    def close(self):
        self.transport.close()


def peer_of(client_address):
    """The client IP address of accept()'s address; None for a Unix socket's ("local")."""
    if isinstance(client_address, tuple) and client_address:
        return client_address[0]
    return None


def refuse(connection, options, data):
    """Send a refusal before any session; with implicit TLS, inside a quick handshake.

    The client of an implicit-TLS port (RFC 8314) expects a handshake
    first; it gets one, bounded by REFUSAL_HANDSHAKE seconds, so the 421
    still arrives within a second.
    """
    if not options.tls_on_connect:
        connection.send_now(data)
        return
    transport = connection.transport
    if not getattr(transport, "can_tls", False):
        return
    try:
        from .tls import server_context
        transport.tls_timeout = min(transport.tls_timeout, REFUSAL_HANDSHAKE)
        _, wfile, _ = transport.start_tls(server_context(options.tls_cert, options.tls_key))
        wfile.write(data)
        wfile.flush()
    except Exception as exc:  # ssl.SSLError, OSError, TLSConfigError: the client is gone
        log.debug("%s: refusal not delivered: %s", printable(connection.peer or "local"),
                  printable(exc))


class Refuser:
    """The over-cap refusals of an accepting process (prefork master, forking parent).

    That process must never block.  A plain 421 is one non-blocking send;
    under implicit TLS the client expects a handshake first, so a child of
    its own does it (refuse(), at most REFUSAL_HANDSHAKE seconds, and gone
    after REFUSER_LIFETIME whatever happens).  While REFUSERS such children
    are at work, more connections are closed unanswered: a flood cannot
    make the process fork without bound.
    """

    def __init__(self, options, listener):
        self.options, self.listener = options, listener
        self.pids = set()

    def refuse(self, sock, reason):
        """Send sock its 421 4.7.0 for reason (or have a child send it) and close it here."""
        try:
            if self.options.tls_on_connect:
                self.refuse_in_child(sock, reason)
            else:
                refuse_connection(sock, self.options, reason)
                sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        finally:
            sock.close()

    def refuse_in_child(self, sock, reason):
        self.reap()
        if len(self.pids) >= REFUSERS:
            log.debug("%d implicit-TLS refusals at work: closed unanswered", len(self.pids))
            return
        pid = os.fork()
        if pid:
            self.pids.add(pid)
            return
        code = 1
        try:
            signal.set_wakeup_fd(-1)
            for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGCHLD, signal.SIGALRM):
                signal.signal(signum, signal.SIG_DFL)
            signal.alarm(REFUSER_LIFETIME)
            self.listener.close()
            refuse(Connection.from_socket(sock, self.options), self.options,
                   refusal(self.options, reason))
            code = 0
        finally:
            os._exit(code)

    def reap(self):
        """Forget the refusals' children that ended (another waitpid() may have taken them)."""
        for pid in list(self.pids):
            try:
                done, _ = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                done = pid
            if done:
                self.pids.discard(pid)


def address_from(environ):
    """(address, variable) from the first ADDRESS_VARIABLES holding an IP address."""
    for name in ADDRESS_VARIABLES:
        value = environ.get(name, "").strip()
        if not value:
            continue
        address = value[1:-1] if value.startswith("[") and value.endswith("]") else value
        if ip_of(address) is not None:
            return address, name
        log.warning("ignoring %s=%s: not an IP address", name, printable(value))
    return None, "unknown"


def serve(connection, options, spool, session_class, admission=(), stop_requested=None,
          signals_to=None):
    """Admit the connection, run its session to the end, release and close.

    admission is a sequence of gates with admit(peer) -> None or a reason
    and release(peer) (netsmtp.limits); a refusal is one 421 4.7.0 line.
    stop_requested() is asked once the session's own signal handlers are
    in place, so a stop that came just before is not lost.  signals_to, when
    given, is called with the session instead of installing its handlers:
    a caller whose handlers stay in place for every connection (the prefork
    worker) passes its stop signals on to session.stop_gracefully() itself,
    which spares two handler swaps per connection.  Returns the
    Session, or None when the connection was refused; never raises for the
    client's sake, and never shows the client an exception.
    """
    admitted, session, peer = [], None, connection.peer
    try:
        if options.proxy_protocol:
            if not connection.take_proxy_header(options):
                return None
            peer = connection.peer  # so the limits count the client, not the proxy
        for gate in admission:
            reason = gate.admit(peer)
            if reason is not None:
                refuse(connection, options, refusal(options, reason))
                return None
            admitted.append(gate)
        # proxy= only when there is one, so subclasses of older signatures still work.
        extra = {"proxy": connection.proxy} if connection.proxy is not None else {}
        session = session_class(connection.rfile, connection.wfile, peer=peer,
                                options=options, spool=spool,
                                transport=connection.transport, **extra)
        if signals_to is None:
            session.stop_on_signals()
        else:
            signals_to(session)
        if stop_requested is not None and stop_requested():
            session.stopping = True
        session.handle()
        return session
    except Exception:
        log.exception("%s: internal error serving the connection", printable(peer or "local"))
        if session is None:
            refuse(connection, options, format_reply("421 4.3.0", options.hostname))
        return session
    finally:
        for gate in reversed(admitted):
            try:
                gate.release(peer)
            except Exception:
                log.exception("%s: cannot release the session's admission",
                              printable(peer or "local"))
        connection.close()
