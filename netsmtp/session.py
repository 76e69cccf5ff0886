"""The SMTP session: one method per verb over a binary reader and writer."""

import logging
import time

from .address import AddressError, parse_path
from .envelope import Envelope
from .options import Options
from .policy import Policy
from .replies import REPLIES, SMTPError, format_reply, printable
from .spool import Spool, new_queue_id
from .states import PREDECESSORS, UNIMPLEMENTED, State, is_allowed
from .wire import DataProblem, HeaderSection, LineReader, LineTooLong

log = logging.getLogger("netsmtp")

# RFC 5321 section 4.5.3.1.4: 512 octets for a command line with its CRLF.
# MAIL may grow by each extension's parameters (RFC 1870 section 3: SIZE
# adds 26; BODY, SMTPUTF8 and AUTH= add theirs) and an AUTH line may hold a
# 12288-octet initial response (RFC 4954 section 4).
COMMAND_LINE_LIMIT = 512
LINE_LIMITS = {"MAIL": COMMAND_LINE_LIMIT + 600, "AUTH": 12288}
LONGEST_LINE = max(LINE_LIMITS.values())
MAX_BAD_COMMANDS = 20

HELP_LINES = (
    "Commands: HELO EHLO MAIL RCPT DATA RSET NOOP QUIT HELP VRFY EXPN",
    "See RFC 5321 and https://www.rfc-editor.org/rfc/rfc5321",
)


class ShuttingDown(Exception):
    """The server is stopping; an idle session says 421 and closes."""


class Session(Policy):
    """One SMTP session from greeting to QUIT over rfile and wfile.

    rfile needs read1() (a buffered binary reader: a socket's makefile("rb"),
    sys.stdin.buffer, io.BytesIO); wfile needs write() and flush().  peer is
    the client's IP address as text, or None for a local session.

    Methods that may be overridden:
        check_client, check_helo, check_mail_from, check_rcpt_to,
        check_message   the policy hooks, see netsmtp.policy.Policy
        extensions()    the EHLO keywords; may be extended
        received_header(envelope)  the trace header put on each message

    Methods that may be extended, do not override:
        handle()        run the session to its end
        reply(key, *args, lines=())  queue a reply from the reply table

    Class variables that may be overridden:
        replies         the reply table (a mapping like netsmtp.REPLIES)

    smtp_VERB(arg) is called for each command VERB whose predecessor state
    allows it (netsmtp.states.PREDECESSORS); arg is the text after the verb
    or None.  Add a verb by adding a method and a PREDECESSORS entry.
    """

    replies = REPLIES

    def __init__(self, rfile, wfile, peer=None, options=None, spool=None, **settings):
        self.options = options if options is not None else Options(**settings)
        self.wfile = wfile
        self.peer = peer
        self.spool = spool if spool is not None else Spool(self.options.spool)
        self.reader = LineReader(rfile, self.flush)
        self.state = State.CONNECTED
        self.helo = None
        self.esmtp = False
        self.tls = None
        self.auth_user = None
        self.envelope = None
        self.closing = False
        self.stopping = False
        self.idle = False
        self.bad_commands = 0
        self.messages = 0
        self._out = []
        self.tag = printable(peer or "local")

    # -- the connection loop ---------------------------------------------

    def handle(self):
        """Greet, serve commands until QUIT, EOF, timeout or shutdown."""
        log.info("%s: connect", self.tag)
        started = time.monotonic()
        try:
            try:
                self.check_client(self.peer)
            except SMTPError as refusal:
                log.info("%s: refused: %s", self.tag, refusal)
                self.reply(refusal.key, *refusal.args_)
                return
            self.reply("220", self.options.hostname)
            while not self.closing:
                self.handle_command()
                if self.stopping and self.state in (State.CONNECTED, State.READY):
                    raise ShuttingDown
        except ShuttingDown:
            self.reply("421 4.3.2", self.options.hostname)
        except TimeoutError:
            log.info("%s: timeout", self.tag)
            self.reply("421 4.4.2", self.options.hostname)
        except EOFError:
            if self.state not in (State.CONNECTED, State.READY):
                log.info("%s: lost connection in a transaction", self.tag)
        except OSError as exc:
            log.info("%s: connection error: %s", self.tag, exc)
        finally:
            self.idle = False
            try:
                self.flush()
            except OSError:
                pass
            log.info("%s: disconnect messages=%d seconds=%.3f", self.tag,
                     self.messages, time.monotonic() - started)

    def handle_command(self):
        """Read one command line, check its sequence and run its verb."""
        self.idle = self.state in (State.CONNECTED, State.READY)
        if self.idle and self.stopping:
            raise ShuttingDown
        try:
            line = self.reader.readline(LONGEST_LINE)
        except LineTooLong:
            line = None
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
            if b"\0" in text:
                raise SMTPError("501 5.5.2", "NUL byte in command")
            verb, _, arg = text.partition(b" ")
            verb = verb.decode("ascii", "replace").upper()
            method = getattr(self, "smtp_" + verb, None) if verb.isalpha() else None
            if len(line) > LINE_LIMITS.get(verb, COMMAND_LINE_LIMIT):
                raise SMTPError("500 5.5.0", LINE_LIMITS.get(verb, COMMAND_LINE_LIMIT))
            if method is None or verb not in PREDECESSORS:
                if verb in UNIMPLEMENTED:
                    raise SMTPError("502 5.5.1", verb)
                raise SMTPError("500 5.5.2")
            if not is_allowed(verb, self.state):
                raise SMTPError("503 5.5.1")
            try:
                arg = arg.decode("utf-8").strip(" ") or None
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

    def refuse(self, refusal):
        """Send a refusal's reply; too many of them close the session."""
        self.reply(refusal.key, *refusal.args_)
        if refusal.code >= 500:
            self.bad_commands += 1
            if self.bad_commands >= MAX_BAD_COMMANDS:
                log.info("%s: too many errors, closing", self.tag)
                self.reply("421 4.7.0", self.options.hostname, "too many errors")
                self.closing = True

    def reply(self, key, *args, lines=()):
        """Queue a reply; it is written when the session next waits for input."""
        self._out.append(format_reply(key, *args, lines=lines, replies=self.replies))

    def flush(self):
        """Write the queued replies in one write (RFC 2920 section 3.1)."""
        if self._out:
            data = b"".join(self._out)
            self._out.clear()
            self.wfile.write(data)
            self.wfile.flush()

    # -- session state -----------------------------------------------------

    def reset_transaction(self):
        """Forget the mail transaction; the one place a transaction ends."""
        self.envelope = None
        if self.state in (State.MAIL, State.RCPT):
            self.state = State.READY

    @property
    def protocol(self):
        """The "with" protocol of the Received header (RFC 3848)."""
        if not self.esmtp:
            return "SMTP"
        return "ESMTP" + ("S" if self.tls else "") + ("A" if self.auth_user else "")

    def extensions(self):
        """The EHLO keywords, in order (RFC 5321 section 4.1.1.1)."""
        return ["PIPELINING", "SIZE %d" % self.options.max_size, "8BITMIME",
                "SMTPUTF8", "ENHANCEDSTATUSCODES", "HELP"]

    def received_header(self, envelope):
        """The Received trace header (RFC 5321 section 4.4) as wire bytes."""
        client = "[%s]" % self.peer if self.peer else "local"
        lines = ["Received: from %s (%s)" % (printable(self.helo), printable(client)),
                 "\tby %s (netsmtp) with %s id %s" % (
                     self.options.hostname, self.protocol, envelope.id)]
        if len(envelope.recipients) == 1:
            lines.append("\tfor <%s>" % printable(envelope.recipients[0]))
        lines[-1] += ";"
        lines.append("\t" + time.strftime("%a, %d %b %Y %H:%M:%S %z"))
        return ("\r\n".join(lines) + "\r\n").encode("utf-8")

    # -- the verbs ----------------------------------------------------------

    def greet(self, arg, esmtp):
        if not arg:
            raise SMTPError("501 5.5.2", "EHLO hostname" if esmtp else "HELO hostname")
        name = arg.split(" ")[0]
        if not (name.isascii() and name.isprintable()):
            raise SMTPError("501 5.5.2", "hostname must be printable ASCII")
        self.check_helo(name)
        self.reset_transaction()
        self.helo, self.esmtp, self.state = name, esmtp, State.READY

    def smtp_HELO(self, arg):
        self.greet(arg, esmtp=False)
        self.reply("250", self.options.hostname, self.helo)

    def smtp_EHLO(self, arg):
        self.greet(arg, esmtp=True)
        self.reply("250", self.options.hostname, self.helo, lines=self.extensions())

    def smtp_MAIL(self, arg):
        if not arg or arg[:5].upper() != "FROM:":
            raise SMTPError("501 5.5.2", "MAIL FROM:<address>")
        try:
            address, params = parse_path(arg[5:])
        except AddressError:
            raise SMTPError("501 5.1.7") from None
        if address.lower() == "postmaster":
            raise SMTPError("501 5.1.7")
        params = self.mail_params(params)
        if not address.isascii() and "SMTPUTF8" not in params:
            raise SMTPError("553 5.6.7", address)
        if params.get("SIZE", 0) > self.options.max_size:
            raise SMTPError("552 5.3.4", self.options.max_size)
        self.check_mail_from(address, params)
        self.envelope = Envelope(sender=address, params=params, helo=self.helo,
                                 client=self.peer, tls=self.tls, auth=self.auth_user)
        self.state = State.MAIL
        self.reply("250 2.1.0", address)

    def mail_params(self, params):
        """Check MAIL parameters (RFC 1870, RFC 6152, RFC 6531); returns them typed."""
        if params and not self.esmtp:
            raise SMTPError("555 5.5.4", next(iter(params)))
        for key, value in params.items():
            if key == "SIZE":
                if value is True or not value.isdigit() or len(value) > 20:
                    raise SMTPError("501 5.5.4", key)
                params[key] = int(value)
            elif key == "BODY":
                if value is True or value.upper() not in ("7BIT", "8BITMIME"):
                    raise SMTPError("501 5.5.4", key)
                params[key] = value.upper()
            elif key == "SMTPUTF8":
                if value is not True:
                    raise SMTPError("501 5.5.4", key)
            else:
                raise SMTPError("555 5.5.4", key)
        return params

    def smtp_RCPT(self, arg):
        if not arg or arg[:3].upper() != "TO:":
            raise SMTPError("501 5.5.2", "RCPT TO:<address>")
        try:
            address, params = parse_path(arg[3:])
        except AddressError:
            raise SMTPError("501 5.1.3") from None
        if not address:
            raise SMTPError("501 5.1.3")
        if params:
            raise SMTPError("555 5.5.4", next(iter(params)))
        if not address.isascii() and "SMTPUTF8" not in self.envelope.params:
            raise SMTPError("553 5.6.7", address)
        if len(self.envelope.recipients) >= self.options.max_recipients:
            raise SMTPError("452 4.5.3")
        replacement = self.check_rcpt_to(address, params)
        for recipient in replacement if replacement is not None else [address]:
            if recipient not in self.envelope.recipients:
                self.envelope.recipients.append(recipient)
        if self.envelope.recipients:
            self.state = State.RCPT
        self.reply("250 2.1.5", address)

    def smtp_DATA(self, arg):
        if arg:
            raise SMTPError("501 5.5.2", "DATA takes no arguments")
        envelope = self.envelope
        envelope.id = new_queue_id()
        envelope.arrival = time.time()
        envelope.protocol = self.protocol
        writer = None
        try:
            writer = self.spool.create(envelope)
            writer.write(self.received_header(envelope))
        except OSError as exc:
            if writer is not None:
                writer.close()
            log.error("%s: spool: %s", self.tag, exc)
            self.reset_transaction()
            raise SMTPError("452 4.3.1") from None
        self.reply("354")
        try:
            self.receive(envelope, writer)
        finally:
            writer.close()
            self.reset_transaction()

    def receive(self, envelope, writer):
        """Stream the message into writer and reply; the spool write's caller."""
        header = HeaderSection()
        failed = []

        def write(chunk):
            if not failed:
                header.feed(chunk)
                try:
                    writer.write(chunk)
                except OSError as exc:
                    failed.append(exc)

        size, problem = self.reader.read_data(write, self.options.max_size)
        summary = "id=%s from=<%s> to=%s size=%d" % (
            envelope.id, printable(envelope.sender),
            ",".join("<%s>" % printable(r) for r in envelope.recipients), size)
        if problem is not None:
            log.info("%s: refused %s: %s", self.tag, summary, problem)
            if problem is DataProblem.TOO_BIG:
                raise SMTPError("552 5.3.4", self.options.max_size)
            raise SMTPError("554 5.6.0", problem)
        if failed:
            log.error("%s: spool write failed %s: %s", self.tag, summary, failed[0])
            raise SMTPError("452 4.3.1")
        try:
            self.check_message(envelope, header.headers())
        except SMTPError as refusal:
            log.info("%s: refused %s: %s", self.tag, summary, refusal)
            raise
        try:
            writer.commit()
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
        self.reply("214 2.0.0", "netsmtp", lines=HELP_LINES)

    def smtp_VRFY(self, arg):
        # RFC 5321 section 3.5.3: 252 when the address is not verified.
        if not arg:
            raise SMTPError("501 5.5.2", "VRFY address")
        self.reply("252 2.1.5", arg.strip("<>"))

    def smtp_EXPN(self, arg):
        # RFC 5321 section 7.3: list expansion may be disabled.
        raise SMTPError("502 5.5.1", "EXPN")

    def smtp_TURN(self, arg):
        # RFC 5321 section 4.1.1: TURN is obsolete and unsafe.
        raise SMTPError("502 5.5.1", "TURN")
