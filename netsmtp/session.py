"""The SMTP session: one method per verb over a binary reader and writer."""

import logging
import signal
import time

from . import dsn
from .address import AddressError, ParameterError, in_networks, parse_path
from .envelope import Envelope
from .options import Options
from .policy import Policy
from .replies import REPLIES, SMTPError, format_reply, printable
from .spool import Spool, new_queue_id
from .states import IDLE, PREDECESSORS, UNIMPLEMENTED, State
from .wire import TEXT_LINE_LIMIT, ChunkedText, DataProblem, LineReader, LineTooLong, MessageSink

log = logging.getLogger(__name__)

# RFC 5321 section 4.5.3.1.4: 512 octets for a command line with its CRLF.
# MAIL may grow by each extension's parameters (RFC 1870 section 3: SIZE
# adds 26; BODY, SMTPUTF8 and AUTH= add theirs) and an AUTH line may hold a
# 12288-octet initial response (RFC 4954 section 4).
COMMAND_LINE_LIMIT = 512
# RFC 3461 section 5.4: with DSN, MAIL and RCPT lines of at least 1036 octets.
LINE_LIMITS = {"MAIL": COMMAND_LINE_LIMIT + 600, "RCPT": COMMAND_LINE_LIMIT + 600, "AUTH": 12288}
LONGEST_LINE = max(LINE_LIMITS.values())
OUTPUT_LIMIT = 64 * 1024  # queued reply octets before they are written anyway
MAX_AUTH_DELAY = 30.0  # seconds; the AUTH delay of a client with failures stops growing here
PAUSE_READ_LIMIT = 64 * 1024  # octets a pause reads ahead while it watches for a hang-up
TEMPORARY_AUTH_FAILURE = "Temporary authentication failure"  # RFC 4954 section 6
# RFC 3030 section 2: "BDAT" SP chunk-size [SP "LAST"]; sizes as SIZE's 1*20DIGIT.
MAX_CHUNK_DIGITS = 20

HELP_REFERENCE = "See RFC 5321 and https://www.rfc-editor.org/rfc/rfc5321"


class ShuttingDown(Exception):
    """The server is stopping; an idle session says 421 and closes."""


class Session(Policy):
    """One SMTP session from greeting to QUIT over rfile and wfile.

    rfile needs read1() (a buffered binary reader: a socket's makefile("rb"),
    sys.stdin.buffer, io.BytesIO); wfile needs write() and flush().  peer is
    the client's IP address as text, or None for a local session.  transport
    (netsmtp.transport) lets the session wait for input before its greeting
    and switch to TLS; without one it does neither and offers no STARTTLS.
    proxy is the netsmtp.proxy.ProxyHeader the connection began with under
    --proxy-protocol (peer is then its source), or None.

    Methods that may be overridden:
        check_client, check_helo, check_mail_from, check_rcpt_to,
        check_message   the policy hooks, see netsmtp.policy.Policy
        resolve_recipient(address)  what a local recipient comes to: the
                        recipient table, the Maildir check, verification
        tls_context()   the ssl.SSLContext for STARTTLS and implicit TLS
        authenticate(user, password)  True when the credentials are good
        extensions()    the EHLO keywords; may be extended
        received_header(envelope)  the trace header put on each message

    Methods that may be extended, do not override:
        handle()        run the session to its end
        reply(key, *args, lines=())  queue a reply from the reply table

    Class variables that may be overridden:
        replies         the reply table (a mapping like netsmtp.REPLIES)
        predecessors    verb -> the states it may follow (read-only mapping,
                        default netsmtp.states.PREDECESSORS)

    Verbs: smtp_VERB(arg) is called for each command VERB that has a row in
    predecessors holding the current state; arg is the text after the verb
    or None.  Add a verb with a method and a row in the subclass's own table,
    leaving Session's alone:
        predecessors = {**Session.predecessors, "XFOO": frozenset({State.READY})}
    Known verbs without a method (EXPN, TURN, ETRN, ...: states.UNIMPLEMENTED)
    get 502 5.5.1; after a 554 greeting every verb but QUIT gets 503 5.5.1.

    AUTH mechanisms: auth_NAME(initial) is the SASL mechanism NAME ("-" is
    spelt "_"); EHLO offers every one a subclass defines, in definition order.
    initial is the client's initial response or None; the method gets further
    responses from sasl_response(), and returns (user, password) or raises
    SMTPError.  Add a mechanism by adding one method.
    """

    replies = REPLIES
    predecessors = PREDECESSORS

    def __init__(self, rfile, wfile, peer=None, options=None, spool=None,
                 transport=None, proxy=None, **settings):
        self.options = options if options is not None else Options(**settings)
        self.wfile = wfile
        self.peer = peer
        self.proxy = proxy
        self.spool = spool if spool is not None else Spool(
            self.options.spool, fsync_directory=self.options.spool_fsync_directory)
        self.transport = transport
        self.reader = LineReader(rfile, self.before_read)
        self.session_deadline = None
        self.command_deadline = None
        self.recipients_total = 0
        self.passwords = None
        self.state = State.CONNECTED
        self.helo = None
        self.esmtp = False
        self.tls = None
        self.auth_user = None
        self.auth_mechanism = None
        self.envelope = None
        self.chunks = None  # the message of a BDAT transaction: (MessageSink, ChunkedText)
        self.closing = False
        self.stopping = False
        self.idle = False
        self.bad_commands = 0
        self.messages = 0
        self._out = []
        self._out_size = 0
        self.tag = printable(peer or "local")
        if proxy is not None:  # the logs name the proxy too
            self.tag += " via " + printable(proxy.via or "local")
        self.filters = None
        if self.options.policy_services or self.options.milters:
            from .filters import Filters  # policy services and milters
            self.filters = Filters(self)

    # -- the connection loop ---------------------------------------------

    def stop_on_signals(self):
        """Make SIGTERM and SIGINT stop this session gracefully.

        An idle session (no transaction) is interrupted at once and says
        421; a session in a transaction finishes its current message first.
        """
        signal.signal(signal.SIGTERM, self.stop_gracefully)
        signal.signal(signal.SIGINT, self.stop_gracefully)

    def stop_gracefully(self, signum=None, frame=None):
        """The server is stopping: from a signal handler, this process's or its own.

        A session waiting for a command (idle) ends at once with a 421; any
        other finishes what it is doing and its message first.
        """
        self.stopping = True
        if self.idle:
            raise ShuttingDown

    def handle(self):
        """Greet, serve commands until QUIT, EOF, timeout or shutdown."""
        log.debug("%s: connect", self.tag)
        started = time.monotonic()
        self.session_deadline = started + self.options.session_timeout
        try:
            if self.options.tls_on_connect and not self.tls_on_connect():
                return
            if not self.welcome():
                return
            while not self.closing:
                self.handle_command()
                if self.stopping and self.state in IDLE:
                    raise ShuttingDown
        except ShuttingDown:
            self.reply("421 4.3.2", self.options.hostname)
        except TimeoutError:
            log.info("%s: timeout", self.tag)
            self.reply("421 4.4.2", self.options.hostname)
        except EOFError:
            if self.state not in IDLE:
                log.info("%s: lost connection in a transaction", self.tag)
        except OSError as exc:
            log.info("%s: connection error: %s", self.tag, exc)
        except Exception:
            # A bug outside any one command (a hook before the greeting, say):
            # the client hears a temporary failure, never the exception.
            log.exception("%s: internal error", self.tag)
            self.reply("421 4.3.0", self.options.hostname)
        finally:
            self.idle = False
            self.drop_chunks()
            if self.filters is not None:
                self.filters.close()
            try:
                self.flush()
            except OSError:
                pass
            # The one line per connection; transactions log their own.
            log.info("%s: disconnect helo=%s messages=%d errors=%d seconds=%.3f",
                     self.tag, printable(self.helo), self.messages, self.bad_commands,
                     time.monotonic() - started)

    def welcome(self):
        """Say 220, or refuse the client; False when the session is over.

        A 554 from check_client does not hang up: RFC 5321 section 3.1 has
        the client QUIT, and every other command gets 503 meanwhile (the
        REFUSED state).  Any other refusal, and an early talker, is closed.
        """
        try:
            self.check_client(self.peer)
            if self.filters is not None:
                self.filters.connect()
        except SMTPError as refusal:
            log.info("%s: refused: %s", self.tag, refusal)
            self.reply(refusal.key, *refusal.args_, lines=refusal.lines, replies=refusal.replies)
            self.state = State.REFUSED
            return refusal.code == 554
        try:
            self.greet_pause()
        except SMTPError as refusal:
            log.info("%s: refused: %s", self.tag, refusal)
            self.reply(refusal.key, *refusal.args_, lines=refusal.lines, replies=refusal.replies)
            return False
        self.reply("220", self.options.hostname)
        return True

    def handle_command(self):
        """Read one command line, check its sequence and run its verb."""
        self.idle = self.state in IDLE
        if self.idle and self.stopping:
            raise ShuttingDown
        try:
            line = self.read_line(LONGEST_LINE)
        finally:
            self.idle = False
        verb = self.dispatch(line)
        if verb:
            log.debug("%s: %s", self.tag, verb)

    def dispatch(self, line):
        """Run one command line; every outcome is a reply.  Returns the verb."""
        try:
            if line is None:
                raise SMTPError("500 5.5.0", COMMAND_LINE_LIMIT)
            text = line[:-2] if line.endswith(b"\r\n") else line.rstrip(b"\n")
            verb, _, arg = text.partition(b" ")
            verb = verb.decode("ascii", "replace").upper()
            # A NUL in a BDAT line is for chunk_size to refuse (5.5.4 and close).
            if b"\0" in text and verb != "BDAT":
                raise SMTPError("501 5.5.2", "NUL byte in command")
            method = getattr(self, "smtp_" + verb, None) if verb.isalpha() else None
            if len(line) > LINE_LIMITS.get(verb, COMMAND_LINE_LIMIT):
                raise SMTPError("500 5.5.0", LINE_LIMITS.get(verb, COMMAND_LINE_LIMIT))
            allowed = self.predecessors.get(verb) if method is not None else None
            if allowed is None:
                if self.state is State.REFUSED:
                    raise SMTPError("503 5.5.1")  # RFC 5321 section 3.1: QUIT only
                if verb in UNIMPLEMENTED:
                    raise SMTPError("502 5.5.1", verb)
                raise SMTPError("500 5.5.2")
            if self.state not in allowed:
                if verb == "BDAT":
                    # RFC 3030 section 2: read and drop its octets, so the
                    # next command is read as a command.
                    size, _ = self.chunk_size(arg.decode("ascii", "replace").strip(" "))
                    self.read_chunk(size, lambda piece: None)
                raise SMTPError("503 5.5.1")
            try:
                # A BDAT line is ASCII or malformed (501 5.5.4 and close, never 5.5.2).
                arg = (arg.decode("ascii", "replace") if verb == "BDAT"
                       else arg.decode("utf-8")).strip(" ") or None
            except UnicodeDecodeError:
                raise SMTPError("501 5.5.2", "invalid UTF-8") from None
            method(arg)
            return verb
        except SMTPError as refusal:
            self.refuse(refusal)
        except (EOFError, TimeoutError, ConnectionError, ShuttingDown):
            raise
        except Exception:
            log.exception("%s: internal error", self.tag)
            self.reset_transaction()
            self.reply("451 4.3.0")
        return None

    def read_line(self, limit):
        """One line read within options.timeout, or None when it is over limit octets."""
        self.command_deadline = time.monotonic() + self.options.timeout
        try:
            return self.reader.readline(limit)
        except LineTooLong:
            return None
        finally:
            self.command_deadline = None

    def refuse(self, refusal):
        """Send a refusal's reply; past the soft limit each waits, too many close the session."""
        log.info("%s: refused: %s", self.tag, refusal)
        if refusal.code >= 500:
            self.bad_commands += 1
            if self.bad_commands > self.options.soft_error_limit:
                # The tarpit, flat as Postfix's smtpd_error_sleep_time: past the
                # soft limit each refusal waits error_delay, never more (the
                # last one, at max_bad_commands, too).
                self.pause(self.options.error_delay)
            limit = self.options.max_bad_commands
            if limit and self.bad_commands >= limit:
                log.info("%s: too many errors, closing", self.tag)
                self.reply(refusal.key, *refusal.args_, lines=refusal.lines, replies=refusal.replies)
                self.reply("421 4.7.0", self.options.hostname, "too many errors")
                self.closing = True
                return
        self.reply(refusal.key, *refusal.args_, lines=refusal.lines, replies=refusal.replies)

    def pause(self, seconds):
        """Wait before answering (tarpit, AUTH delay); end the session if the client leaves.

        The wait watches the connection: what the client sends meanwhile is
        read ahead into the reader (up to PAUSE_READ_LIMIT octets; past that
        the transport's hung_up() sees the end behind the unread input), and
        its end raises EOFError at once, so no worker sleeps for a client
        that has hung up.  Without a transport (BytesIO tests) it just sleeps.
        """
        if seconds <= 0:
            return
        self.flush()  # what was answered before goes out now; the next answer waits
        deadline = time.monotonic() + seconds
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            hung_up = getattr(self.transport, "hung_up", None)
            if len(self.reader.buf) > PAUSE_READ_LIMIT and hung_up is not None:
                # Read ahead enough: watch for the client's end behind its input.
                if hung_up(remaining):
                    raise EOFError("connection closed by client")
                continue
            if self.transport is None or len(self.reader.buf) > PAUSE_READ_LIMIT:
                time.sleep(remaining)
                return
            if self.transport.readable(remaining):
                self.limit_read(self.options.timeout)
                self.reader.fill(wait=False)  # EOFError when the client has closed

    def limit_read(self, seconds):
        """Bound the next read (a transport of one's own may not offer it)."""
        limit = getattr(self.transport, "read_timeout", None)
        if limit is not None:
            limit(seconds)

    def before_read(self):
        """Flush the replies before waiting for input, within the deadlines.

        options.timeout bounds each read (the socket's timeout) and also a
        whole command line, so a byte every few minutes keeps no session
        alive; options.session_timeout bounds the whole session.  A stop
        signal never cuts the flush short: that could lose the 250 of a
        message already spooled, and the client would send it again.
        """
        idle, self.idle = self.idle, False
        self.limit_read(self.options.timeout)  # writes get the full time
        try:
            self.flush()
        finally:
            self.idle = idle
        if idle and self.stopping:
            raise ShuttingDown
        now = time.monotonic()
        if self.session_deadline is not None and now > self.session_deadline:
            raise TimeoutError("session lasted over %ss" % self.options.session_timeout)
        if self.command_deadline is not None and now > self.command_deadline:
            raise TimeoutError("line took over %ss" % self.options.timeout)
        # The read itself ends at the nearest deadline, not a whole idle
        # timeout after it.
        deadlines = [d for d in (self.session_deadline, self.command_deadline) if d]
        self.limit_read(max(0.001, min([self.options.timeout] + [d - now for d in deadlines])))

    def reply(self, key, *args, lines=(), replies=None):
        """Queue a reply; it is written when the session next waits for input.

        replies is the table to format it from (self.replies unless a
        refusal brings its own: netsmtp.replies.FilterReply).  Past
        OUTPUT_LIMIT octets the queue is written at once, so a client that
        pipelines thousands of EHLOs cannot make it grow without bound.
        """
        self._out.append(format_reply(key, *args, lines=lines, replies=replies or self.replies))
        self._out_size += len(self._out[-1])
        if self._out_size > OUTPUT_LIMIT:
            self.flush()

    def flush(self):
        """Write the queued replies in one write (RFC 2920 section 3.1)."""
        if self._out:
            data = b"".join(self._out)
            self._out.clear()
            self._out_size = 0
            self.wfile.write(data)
            self.wfile.flush()

    # -- session state -----------------------------------------------------

    def reset_transaction(self):
        """Forget the mail transaction; the one place a transaction ends."""
        if self.filters is not None:
            self.filters.abort()  # milters hear of a transaction ended before its end
        self.envelope = None
        self.drop_chunks()
        if self.state in (State.MAIL, State.RCPT, State.CHUNKING):
            self.state = State.READY

    def drop_chunks(self):
        """Throw away the chunks of an unfinished BDAT message, spool file and all."""
        chunks, self.chunks = self.chunks, None
        if chunks is not None:
            chunks[0].writer.close()

    @property
    def protocol(self):
        """The "with" protocol of the Received header (RFC 3848)."""
        if not self.esmtp:
            return "SMTP"
        return "ESMTP" + ("S" if self.tls else "") + ("A" if self.auth_user else "")

    def extensions(self):
        """The EHLO keywords, in order (RFC 5321 section 4.1.1.1)."""
        keywords = ["PIPELINING", "SIZE %d" % self.options.max_size, "8BITMIME",
                    "SMTPUTF8", "ENHANCEDSTATUSCODES", "CHUNKING", "HELP"]
        if self.dsn_available():
            keywords.insert(-1, "DSN")
        if self.tls:
            # RFC 8689 section 2: only inside TLS, never a plaintext promise.
            keywords.insert(-1, "REQUIRETLS")
        if self.tls_available():
            keywords.append("STARTTLS")
        if self.may_offer_auth():
            keywords.append("AUTH " + " ".join(self.auth_mechanisms()))
        return keywords

    def received_header(self, envelope):
        """The Received trace header (RFC 5321 section 4.4) as wire bytes."""
        client = "local"
        if self.peer:
            # RFC 5321 section 4.1.3: an IPv6 address literal says "IPv6:".
            client = "[%s%s]" % ("IPv6:" if ":" in self.peer else "", self.peer)
        lines = ["Received: from %s (%s)" % (printable(self.helo), printable(client))]
        if self.tls:
            # As Postfix writes it; RFC 8314 asks for the TLS facts in the trace.
            lines.append("\t(using %(version)s with cipher %(cipher)s (%(bits)s bits))"
                         % self.tls)
        lines += ["\tby %s (netsmtp) with %s id %s" % (
                     self.options.hostname, self.protocol, envelope.id)]
        if len(envelope.recipients) == 1:
            lines.append("\tfor <%s>" % printable(envelope.recipients[0]))
        lines[-1] += ";"
        lines.append("\t" + time.strftime("%a, %d %b %Y %H:%M:%S %z"))
        return ("\r\n".join(lines) + "\r\n").encode("utf-8")

    # -- TLS (RFC 3207, RFC 8314) and AUTH (RFC 4954) -------------------------

    def tls_available(self):
        """True when STARTTLS may be offered now: configured, possible, not done."""
        return bool(self.options.tls_cert and not self.tls
                    and getattr(self.transport, "can_tls", False))

    def tls_context(self):
        """The server's ssl.SSLContext; reloaded when the certificate changes."""
        from .tls import server_context
        return server_context(self.options.tls_cert, self.options.tls_key)

    def start_tls(self, context=None):
        """Handshake on the transport and forget the plaintext session.

        RFC 3207 section 4.2: the client must EHLO again, and nothing
        learnt before the handshake counts; the caller has already thrown
        away what the client pipelined behind STARTTLS (CVE-2011-0411,
        CVE-2024-34083).  A failed handshake closes the connection, since
        the stream is in an unknown state.  Returns True on success.
        """
        try:
            context = context or self.tls_context()
            rfile, wfile, facts = self.transport.start_tls(context)
        except Exception as exc:  # ssl.SSLError, OSError, TLSConfigError
            log.warning("%s: TLS handshake failed: %s", self.tag, printable(exc))
            self._out.clear()
            self._out_size = 0
            self.closing = True
            return False
        self.reader = LineReader(rfile, self.before_read)
        self.wfile = wfile
        self.tls = facts
        self.reset_transaction()
        self.helo, self.esmtp, self.state = None, False, State.CONNECTED
        self.auth_user = None  # a plaintext AUTH may have been injected
        log.info("%s: TLS %s %s", self.tag, facts["version"], facts["cipher"])
        return True

    def tls_on_connect(self):
        """Implicit TLS (RFC 8314 section 3.3): handshake before the greeting."""
        if not self.tls_available():
            log.error("%s: --tls-on-connect needs --tls-cert and a socket", self.tag)
            return False
        return self.start_tls()

    def greet_pause(self):
        """Early-talker check: a client must wait for the 220 (RFC 5321 section 4.3.1)."""
        pause = self.options.greet_pause
        if pause and self.transport is not None and self.transport.readable(pause):
            self.transport.drain()
            raise SMTPError("554 5.7.1", "talking before the greeting")

    def may_offer_auth(self):
        """True when AUTH may be offered now: configured, over TLS or allowed without."""
        return bool(self.options.auth_file and self.auth_user is None
                    and (self.tls or self.options.auth_plaintext))

    def authenticate(self, user, password):
        """True when password is user's, by default from options.auth_file."""
        from .auth import PasswordFile
        if self.passwords is None:
            self.passwords = PasswordFile(self.options.auth_file)
        return self.passwords.check(user, password)

    def auth_mechanisms(self):
        """The SASL mechanism names of the auth_NAME methods, base classes' first."""
        names = {}
        for cls in reversed(type(self).__mro__):
            for attribute in vars(cls):
                name = attribute[5:]
                # SASL names are upper case (RFC 4422 section 3.1): auth_mechanisms is not one.
                if attribute.startswith("auth_") and name.isupper() and callable(
                        getattr(self, attribute)):
                    names[name.replace("_", "-")] = None
        return list(names)

    def sasl_response(self, initial, challenge):
        """The client's decoded answer: initial, or its reply to a 334 challenge.

        The reply is read within options.timeout, like a command line; "*"
        cancels the exchange with 501 (RFC 4954 section 4).
        """
        import base64
        from .auth import decode_base64
        if initial is None:
            self.reply("334", base64.b64encode(challenge.encode()).decode())
            line = self.read_line(LINE_LIMITS["AUTH"])
            if line is None:
                raise SMTPError("500 5.5.0", LINE_LIMITS["AUTH"])
            initial = line.decode("ascii", "replace").strip()
        if initial == "*":
            raise SMTPError("501 5.7.0")
        try:
            return decode_base64(initial)
        except ValueError:
            raise SMTPError("501 5.5.2", "invalid base64") from None

    def fail_auth(self, mechanism, user):
        """Count a failure of this client and user, wait the delay, then refuse with 535."""
        from .limits import FailureLog
        try:
            failures = FailureLog(self.options.spool).record(self.peer, user)
        except OSError as exc:
            log.error("%s: AUTH %s for %s refused: cannot record the failure: %s",
                      self.tag, mechanism, printable(user), printable(exc))
            raise SMTPError("454 4.7.0", TEMPORARY_AUTH_FAILURE) from None
        delay = self.auth_delay(failures)
        log.warning("%s: AUTH %s failed for %s (failure %d, delay %.1fs)",
                    self.tag, mechanism, printable(user), failures, delay)
        self.pause(delay)
        raise SMTPError("535 5.7.8")

    def auth_delay(self, failures):
        """Seconds an AUTH answer waits for a client or user with failures."""
        return min(MAX_AUTH_DELAY, self.options.auth_fail_delay * failures)

    def auth_exchange(self, name, mechanism, initial):
        """Run one AUTH exchange to its answer; returns the user, or raises SMTPError.

        The client runs one exchange at a time across all sessions (454 4.7.0
        otherwise, a LOGIN waiting for the client included).  For a client or
        user with failures of the last hour every answer waits, a success's
        too, so hanging up early teaches a guesser nothing.  A failure log
        that cannot be written refuses AUTH (454 4.7.0): never fail open.
        """
        from .limits import AuthInProgress, FailureLog
        guard = AuthInProgress(self.options.spool, self.peer)
        try:
            held = guard.acquire()
        except OSError as exc:
            log.error("%s: AUTH refused: %s", self.tag, printable(exc))
            raise SMTPError("454 4.7.0", TEMPORARY_AUTH_FAILURE) from None
        if not held:
            log.warning("%s: AUTH refused: another AUTH of this client is in progress", self.tag)
            raise SMTPError("454 4.7.0", TEMPORARY_AUTH_FAILURE)
        try:
            user, password = mechanism(initial)
            try:
                failures = FailureLog(self.options.spool).recent(self.peer, user)
            except OSError as exc:
                log.error("%s: AUTH %s for %s refused: failure log: %s",
                          self.tag, name, printable(user), printable(exc))
                raise SMTPError("454 4.7.0", TEMPORARY_AUTH_FAILURE) from None
            if not self.authenticate(user, password):
                self.fail_auth(name, user)
            if failures:
                self.pause(self.auth_delay(failures))
            return user
        finally:
            guard.release()

    # -- the verbs ----------------------------------------------------------

    def greet(self, arg, esmtp):
        if not arg:
            raise SMTPError("501 5.5.2", "EHLO hostname" if esmtp else "HELO hostname")
        name = arg.split(" ")[0]
        if not (name.isascii() and name.isprintable()):
            raise SMTPError("501 5.5.2", "hostname must be printable ASCII")
        self.check_helo(name)
        if self.filters is not None:
            self.filters.helo(name)
        self.reset_transaction()
        self.helo, self.esmtp, self.state = name, esmtp, State.READY

    def smtp_HELO(self, arg):
        self.greet(arg, esmtp=False)
        self.reply("250", self.options.hostname, self.helo)

    def smtp_EHLO(self, arg):
        self.greet(arg, esmtp=True)
        self.reply("250", self.options.hostname, self.helo, lines=self.extensions())

    def smtp_MAIL(self, arg):
        limit = self.options.max_messages
        if limit and self.messages >= limit:
            log.info("%s: refused: %d messages in one session", self.tag, self.messages)
            self.reply("421 4.7.0", self.options.hostname, "too many messages")
            self.closing = True
            return
        if self.options.require_tls and not self.tls:
            raise SMTPError("530 5.7.0", "a STARTTLS command")
        if self.options.require_auth and self.auth_user is None:
            raise SMTPError("530 5.7.0", "an AUTH command")
        if not arg or arg[:5].upper() != "FROM:":
            raise SMTPError("501 5.5.2", "MAIL FROM:<address>")
        try:
            address, params = parse_path(arg[5:])
        except ParameterError as exc:
            raise SMTPError("501 5.5.4", exc.key) from None
        except AddressError:
            raise SMTPError("501 5.1.7") from None
        if address.lower() == "postmaster":
            raise SMTPError("501 5.1.7")
        params = self.mail_params(params)
        if not address.isascii() and "SMTPUTF8" not in params:
            raise SMTPError("553 5.6.7", address)
        if params.get("SIZE", 0) > self.options.max_size:
            raise SMTPError("552 5.3.4", self.options.max_size)
        self.check_free_space(params.get("SIZE", 0))
        self.check_mail_from(address, params)
        if self.filters is not None:
            self.filters.mail(address, params)
        self.envelope = Envelope(sender=address, params=params, helo=self.helo,
                                 client=self.peer, tls=self.tls, auth=self.auth_user)
        self.state = State.MAIL
        self.reply("250 2.1.0", address)

    def check_free_space(self, size):
        """452 4.3.1 while the spool keeps less than options.spool_min_free free.

        So the disk never fills mid-message: a SIZE= larger than the free
        space less that reserve is refused too (RFC 1870 section 6.1).
        """
        reserve = self.options.spool_min_free
        if not hasattr(self.spool, "free_space"):  # a stand-in such as --sink's
            return
        try:
            free = self.spool.free_space()
        except OSError as exc:
            log.error("%s: spool: %s", self.tag, exc)
            raise SMTPError("452 4.3.1") from None
        if free < reserve or size > free - reserve:
            log.warning("%s: refused MAIL: %d octets free in the spool, %d kept in reserve, "
                        "SIZE=%d", self.tag, free, reserve, size)
            raise SMTPError("452 4.3.1")

    def mail_params(self, params):
        """Check MAIL parameters (RFC 1870, RFC 6152, RFC 6531); returns them typed."""
        if params and not self.esmtp:
            raise SMTPError("555 5.5.4", next(iter(params)))
        for key, value in params.items():
            if key == "SIZE":
                # RFC 1870 section 3: 1*20DIGIT, ASCII digits only.
                if value is True or not (value.isascii() and value.isdigit()) or len(value) > 20:
                    raise SMTPError("501 5.5.4", key)
                params[key] = int(value)
            elif key == "BODY":
                if value is True or value.upper() not in ("7BIT", "8BITMIME"):
                    raise SMTPError("501 5.5.4", key)
                params[key] = value.upper()
            elif key == "SMTPUTF8":
                if value is not True:
                    raise SMTPError("501 5.5.4", key)
            elif key == "AUTH":
                # RFC 4954 section 5: an xtext mailbox or <>; a client that
                # has not authenticated is treated as if it gave <>.
                if value is True:
                    raise SMTPError("501 5.5.4", key)
                params[key] = value if self.auth_user is not None else "<>"
            elif key == "REQUIRETLS" and self.tls:
                # RFC 8689 section 2: no value; refused (555) outside TLS.
                if value is not True:
                    raise SMTPError("501 5.5.4", key)
            elif key in ("RET", "ENVID") and self.dsn_available():
                try:
                    params[key] = dsn.check_ret(value) if key == "RET" else dsn.check_envid(value)
                except dsn.DSNError:
                    raise SMTPError("501 5.5.4", key) from None
            else:
                raise SMTPError("555 5.5.4", key)
        return params

    def dsn_available(self):
        """True when DSN (RFC 3461) is offered to this client: after EHLO, within dsn_networks."""
        networks = self.options.dsn_networks
        return self.esmtp and (networks is None or in_networks(self.peer, networks))

    def rcpt_params(self, params):
        """Check RCPT parameters (NOTIFY, ORCPT of RFC 3461); returns the DSN request.

        The request is {"notify": [...], "orcpt": "type;xtext"} with only
        the keys given, values as checked (NOTIFY upper-cased, ORCPT verbatim).
        """
        request = {}
        for key, value in params.items():
            if key not in ("NOTIFY", "ORCPT") or not self.dsn_available():
                raise SMTPError("555 5.5.4", key)
            try:
                if key == "NOTIFY":
                    request["notify"] = list(dsn.check_notify(value))
                else:
                    request["orcpt"] = dsn.check_orcpt(value, "SMTPUTF8" in self.envelope.params)
            except dsn.DSNError:
                raise SMTPError("501 5.5.4", key) from None
        return request

    def smtp_RCPT(self, arg):
        if not arg or arg[:3].upper() != "TO:":
            raise SMTPError("501 5.5.2", "RCPT TO:<address>")
        try:
            address, params = parse_path(arg[3:])
        except ParameterError as exc:
            raise SMTPError("501 5.5.4", exc.key) from None
        except AddressError:
            raise SMTPError("501 5.1.3") from None
        if not address:
            raise SMTPError("501 5.1.3")
        request = self.rcpt_params(params)
        if not address.isascii() and "SMTPUTF8" not in self.envelope.params:
            raise SMTPError("553 5.6.7", address)
        if len(self.envelope.recipients) >= self.options.max_recipients:
            raise SMTPError("452 4.5.3")
        limit = self.options.max_session_recipients
        if limit and self.recipients_total >= limit:
            raise SMTPError("452 4.5.3")
        replacement = self.valid_replacement(address, self.check_rcpt_to(address, params))
        targets = len(set(replacement or [address]) - set(self.envelope.recipients))
        if len(self.envelope.recipients) + targets > self.options.max_recipients:
            raise SMTPError("452 4.5.3")  # alias targets count: the envelope stays bounded
        if self.filters is not None:  # after the relay check, so no filter grants relaying
            self.filters.rcpt(address, params)
        self.envelope.add_recipients(address, replacement, request)
        if self.envelope.recipients:
            self.state = State.RCPT
        self.recipients_total += 1
        self.reply("250 2.1.5", address)

    def valid_replacement(self, address, replacement):
        """check_rcpt_to's replacement addresses, each checked like a RCPT argument.

        An alias file or an override could hand back anything; a CR or LF
        there would become a command to the smarthost (security review 2,
        I3).  A bad one is the server's fault: 451 4.3.0, and a log line.
        """
        if replacement is None:
            return None
        checked = []
        for recipient in replacement:
            try:
                valid = isinstance(recipient, str) and parse_path("<%s>" % recipient) == (
                    recipient, {}) and recipient != ""
            except AddressError:
                valid = False
            if not valid or not recipient.isascii() and "SMTPUTF8" not in self.envelope.params:
                log.error("%s: check_rcpt_to(<%s>) returned a bad address %s", self.tag,
                          printable(address), printable(repr(recipient)))
                raise SMTPError("451 4.3.0")
            checked.append(recipient)
        return checked

    def smtp_DATA(self, arg):
        if arg:
            raise SMTPError("501 5.5.2", "DATA takes no arguments")
        sink = self.start_message()
        try:  # from here on, whatever happens, close() drops an unfinished entry
            self.reply("354")
            # Each line of text within options.timeout of the last, as a command line.
            self.line_arrived()
            try:
                size, problem = self.reader.read_data(sink.write, self.options.max_size,
                                                      self.line_arrived)
            finally:
                self.command_deadline = None
            self.end_message(sink, size, problem)
        finally:
            sink.writer.close()
            self.reset_transaction()

    def line_arrived(self):
        self.command_deadline = time.monotonic() + self.options.timeout

    def smtp_BDAT(self, arg):
        """A chunk of the message (RFC 3030); the LAST one ends it as DATA's dot does."""
        size, last = self.chunk_size(arg)
        if size == 0 and not last:
            raise SMTPError("504 5.5.4 bdat")
        framed = False
        try:
            if self.chunks is None:
                try:
                    sink = self.start_message()
                except SMTPError:
                    self.read_chunk(size, lambda piece: None)
                    framed = True
                    raise
                self.chunks = sink, ChunkedText(sink.write, self.options.max_size)
                self.state = State.CHUNKING
            sink, text = self.chunks
            self.read_chunk(size, text.feed)
            framed = True
        finally:
            if not framed:  # lost in mid-chunk: the next octets cannot be told apart
                self.closing = True
                self.reset_transaction()
        if not last:
            self.reply("250 2.0.0 chunk", size)
            return
        self.chunks = None
        try:
            self.end_message(sink, text.size, text.end())
        finally:
            sink.writer.close()
            self.reset_transaction()

    def read_chunk(self, size, write):
        """Read a BDAT chunk with DATA's deadline: a line's worth within options.timeout."""
        arrived = [0]

        def feed(piece):
            before, arrived[0] = arrived[0], arrived[0] + len(piece)
            if arrived[0] // TEXT_LINE_LIMIT != before // TEXT_LINE_LIMIT:
                self.line_arrived()
            write(piece)
        self.line_arrived()
        try:
            self.reader.read_exact(size, feed)
        finally:
            self.command_deadline = None

    def chunk_size(self, arg):
        """BDAT's (size, last); a line that cannot be framed is refused and closes.

        Without a size the octets that follow cannot be told from commands,
        so the session ends (as Postfix does) rather than guess.
        """
        words = (arg or "").split(" ")
        size = words[0]
        if not (size.isascii() and size.isdigit()) or len(size) > MAX_CHUNK_DIGITS or \
                len(words) > 2 or (len(words) == 2 and words[1].upper() != "LAST"):
            self.closing = True
            raise SMTPError("501 5.5.4", "BDAT chunk size")
        return int(size), len(words) == 2

    def start_message(self):
        """Give the envelope its id and open its spool entry; returns a MessageSink."""
        envelope = self.envelope
        envelope.id = new_queue_id()
        envelope.arrival = time.time()
        envelope.protocol = self.protocol
        try:
            writer = self.spool.create(envelope)
        except OSError as exc:
            log.error("%s: spool: %s", self.tag, exc)
            self.reset_transaction()
            raise SMTPError("452 4.3.1") from None
        try:
            writer.write(self.received_header(envelope))
        except OSError as exc:
            writer.close()
            log.error("%s: spool: %s", self.tag, exc)
            self.reset_transaction()
            raise SMTPError("452 4.3.1") from None
        except BaseException:
            writer.close()
            raise
        if self.filters is not None:  # the filters see the message before it is committed
            writer = self.filters.wrap(writer, envelope)
        return MessageSink(writer)

    def end_message(self, sink, size, problem):
        """Check a message read to its end, commit it and reply; the spool write's caller."""
        envelope = self.envelope
        summary = "id=%s from=<%s> to=%s size=%d" % (
            envelope.id, printable(envelope.sender),
            ",".join("<%s>" % printable(r) for r in envelope.recipients), size)
        if problem is not None:
            log.info("%s: refused %s: %s", self.tag, summary, problem)
            if problem is DataProblem.TOO_BIG:
                raise SMTPError("552 5.3.4", self.options.max_size)
            raise SMTPError("554 5.6.0", problem)
        if sink.error is not None:
            log.error("%s: spool write failed %s: %s", self.tag, summary, sink.error)
            raise SMTPError("452 4.3.1")
        if sink.header.overflow:
            log.info("%s: refused %s: header section too large", self.tag, summary)
            raise SMTPError("554 5.6.0", "header section too large")
        try:
            self.check_message(envelope, sink.header.headers())
        except SMTPError as refusal:
            log.info("%s: refused %s: %s", self.tag, summary, refusal)
            raise
        try:
            sink.writer.commit()
        except OSError as exc:
            log.error("%s: spool commit failed %s: %s", self.tag, summary, exc)
            raise SMTPError("452 4.3.1") from None
        self.messages += 1
        log.info("%s: queued %s", self.tag, summary)
        self.reply("250 2.6.0", envelope.id)

    def smtp_RSET(self, arg):
        self.reset_transaction()
        self.reply("250 2.0.0")

    def smtp_NOOP(self, arg):
        self.reply("250 2.0.0")

    def smtp_QUIT(self, arg):
        self.reply("221 2.0.0", self.options.hostname)
        self.closing = True

    def smtp_HELP(self, arg):
        verbs = [verb for verb in self.predecessors if hasattr(self, "smtp_" + verb)]
        self.reply("214 2.0.0", "netsmtp", lines=("Commands: " + " ".join(verbs), HELP_REFERENCE))

    def smtp_VRFY(self, arg):
        # RFC 5321 section 3.5.3: 252 when the address is not verified.
        if not arg:
            raise SMTPError("501 5.5.2", "VRFY address")
        self.reply("252 2.1.5", arg.strip("<>"))

    def smtp_STARTTLS(self, arg):
        if arg:
            raise SMTPError("501 5.5.2", "STARTTLS takes no arguments")
        if self.tls or not self.esmtp:
            raise SMTPError("503 5.5.1")  # RFC 3207 section 4.2: once, after EHLO
        if not self.tls_available():
            raise SMTPError("502 5.5.1", "STARTTLS")
        try:
            context = self.tls_context()
        except Exception as exc:  # TLSConfigError, OSError
            # RFC 3207 section 4: say 454 while the client may still go on.
            log.error("%s: STARTTLS: %s", self.tag, printable(exc))
            raise SMTPError("454 4.7.0", "TLS not available") from None
        self.reply("220 2.0.0")
        self.flush()
        self.reader.discard()
        self.start_tls(context)

    def smtp_AUTH(self, arg):
        if not self.options.auth_file:
            raise SMTPError("502 5.5.1", "AUTH")
        if self.auth_user is not None or not self.esmtp:
            raise SMTPError("503 5.5.1")  # RFC 4954 section 4: once, after EHLO
        if not (self.tls or self.options.auth_plaintext):
            raise SMTPError("538 5.7.11")
        name, _, initial = (arg or "").partition(" ")
        name = name.upper()
        if not name:
            raise SMTPError("501 5.5.2", "AUTH mechanism")
        # Only the offered names reach getattr: the client cannot name any other method.
        if name not in self.auth_mechanisms():
            raise SMTPError("504 5.5.4", name)
        mechanism = getattr(self, "auth_" + name.replace("-", "_"))
        user = self.auth_exchange(name, mechanism, initial.strip() or None)
        self.auth_user, self.auth_mechanism = user, name
        log.info("%s: AUTH %s as %s", self.tag, name, printable(user))
        self.reply("235 2.7.0")

    def auth_PLAIN(self, initial):
        """RFC 4616 section 2: authzid NUL authcid NUL passwd."""
        from .auth import decode_plain
        try:
            authzid, user, password = decode_plain(self.sasl_response(initial, ""))
        except ValueError:
            raise SMTPError("501 5.5.2", "malformed PLAIN response") from None
        if authzid and authzid != user:
            self.fail_auth("PLAIN", user)
        return user, password

    def auth_LOGIN(self, initial):
        """draft-murchison-sasl-login: Username:, then Password:."""
        try:
            user = self.sasl_response(initial, "Username:").decode("utf-8")
            password = self.sasl_response(None, "Password:").decode("utf-8")
        except UnicodeDecodeError:
            raise SMTPError("501 5.5.2", "invalid UTF-8") from None
        return user, password
