"""Forwarding to a smarthost with smtplib, one recipient outcome at a time.

The connection is kept open for the whole queue run and reused message
after message.  The message is streamed from the spool file, so memory
stays bounded whatever the size: in BDAT chunks to a smarthost that offers
CHUNKING (RFC 3030), else as DATA with dot-stuffing (RFC 5321 section
4.5.2).
"""

import logging
import smtplib
import ssl
import time

from . import dsn
from .delivery import Delivery, Result
from .replies import printable

log = logging.getLogger(__name__)

CHUNK = 64 * 1024
BDAT_CHUNK = 1024 * 1024  # octets per BDAT chunk: one reply per MiB, memory bounded
MAX_REPLY_LINES = 100  # lines of one reply from the smarthost


class BoundedSMTP(smtplib.SMTP):
    """smtplib.SMTP whose every wait ends at one deadline, with bounded replies.

    smtplib bounds each read by its timeout but not a reply trickled a
    byte at a time, nor the number of its continuation lines; a delivery
    attempt (smarthost_deadline) and a probe (verify_timeout) must end in
    time whatever the server does.  Each wait is also at most timeout.
    """

    deadline = None  # time.monotonic() by which the probe must be done

    def remaining(self):
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("deadline passed")
        return min(left, self.timeout) if self.timeout else left

    def _get_socket(self, host, port, timeout):
        return super()._get_socket(host, port, self.remaining())

    def send(self, s):
        if self.sock:
            self.sock.settimeout(self.remaining())
        super().send(s)

    def getreply(self):
        lines = []
        while len(lines) < MAX_REPLY_LINES:
            line = self.read_line()
            lines.append(line[4:].strip(b" \t\r\n"))
            code = line[:3]
            if not (code.isdigit() and len(code) == 3):
                return -1, b"\n".join(lines)  # garbage: the caller hangs up
            if line[3:4] != b"-":
                return int(code), b"\n".join(lines)
        self.close()
        raise smtplib.SMTPResponseException(-1, b"reply over %d lines" % MAX_REPLY_LINES)

    def read_line(self):
        """One reply line, read straight from the socket within the deadline."""
        if getattr(self, "_buffered_sock", None) is not self.sock:
            # A new socket (after STARTTLS): nothing read before it counts.
            self._buffer, self._buffered_sock = bytearray(), self.sock
        while True:
            end = self._buffer.find(b"\n")
            if end >= 0:
                line = bytes(self._buffer[:end + 1])
                del self._buffer[:end + 1]
                return line
            if len(self._buffer) > smtplib._MAXLINE:
                self.close()
                raise smtplib.SMTPResponseException(500, b"Line too long.")
            try:
                self.sock.settimeout(self.remaining())
                data = self.sock.recv(4096)
            except OSError as exc:
                self.close()
                raise smtplib.SMTPServerDisconnected("connection lost: %s" % exc) from None
            if not data:
                self.close()
                raise smtplib.SMTPServerDisconnected("connection closed")
            self._buffer += data


class SmarthostUnusable(Exception):
    """The smarthost cannot take mail in this run; carries the Result to defer with.

    tls_failed is set when the reason is TLS (no STARTTLS under
    smarthost_tls = required, or a handshake that failed or could not
    verify the certificate): a REQUIRETLS message then fails at once.
    """

    def __init__(self, result, tls_failed=False):
        super().__init__(str(result))
        self.result = result
        self.tls_failed = tls_failed


class SmarthostDelivery(Delivery):
    """Relays to options.smarthost.

    STARTTLS follows options.smarthost_tls: "off" never, "opportunistic"
    when offered, "required" or defer.  Certificates are always verified
    (the system CAs, or options.smarthost_ca).  AUTH is used when a user is
    configured, and only over TLS unless smarthost_auth_plaintext is set.
    A smarthost that cannot be reached, or refuses TLS or AUTH, defers all
    mail for the rest of the run without being tried again.

    Methods that may be extended:
        connect()       an smtplib.SMTP after EHLO, STARTTLS and AUTH
        new_smtp()      the unconnected smtplib.SMTP that connect() uses
    """

    name = "smarthost"

    def __init__(self, options):
        super().__init__(options)
        self.smtp = None
        self.unusable = None
        self.data_started = False
        self.where = "%s:%d" % options.smarthost if options.smarthost else None

    def describe(self):
        return "smarthost %s" % (self.where or "(none configured)")

    def deliver(self, envelope, recipients):
        if self.options.smarthost is None:
            return dict.fromkeys(recipients, Result(451, "4.3.5 no smarthost configured"))
        # One attempt of one message, connection and retry included, ends in time.
        self.deadline = time.monotonic() + self.options.smarthost_deadline
        if self.smtp is not None:
            self.smtp.deadline = self.deadline
        for attempt in (1, 2):
            reused = self.smtp is not None
            results = {}
            self.data_started = False
            try:
                if self.unusable is not None:
                    raise self.unusable
                if self.smtp is None:
                    self.smtp = self.connect()
                self.transaction(self.smtp, envelope, recipients, results)
                return results
            except SmarthostUnusable as exc:
                self.unusable = exc
                if exc.tls_failed and envelope.params.get("REQUIRETLS"):
                    # RFC 8689 section 4.2.1: never in plaintext, and bounced
                    # now: the smarthost will not change within the retries.
                    return dict.fromkeys(recipients, Result(550, "5.7.10 REQUIRETLS: %s" % (
                        exc.result.text.split(" ", 1)[1],)))
                return dict.fromkeys(recipients, exc.result)
            except (OSError, smtplib.SMTPException) as exc:
                self.drop()
                if reused and not results and not self.data_started and attempt == 1:
                    continue  # the kept connection went stale; one fresh try
                error = Result(451, "4.4.2 smarthost %s: %s" % (
                    self.where, printable(exc) or type(exc).__name__))
                log.warning("%s: %s", envelope.id, error)
                return {r: results.get(r, error) for r in recipients}

    deadline = None  # time.monotonic() by which the current attempt must be done

    def new_smtp(self):
        """An unconnected BoundedSMTP, bound to the current attempt's deadline."""
        smtp = BoundedSMTP(local_hostname=self.options.hostname,
                           timeout=self.options.smarthost_timeout)
        smtp.deadline = self.deadline
        return smtp

    def connect(self):
        host, port = self.options.smarthost
        where = self.where
        smtp = self.new_smtp()
        smtp._host = host  # smtplib checks the certificate against it (set by __init__ only)
        try:
            code, greeting = smtp.connect(host, port)
            if code != 220:
                smtp.close()
                raise smtplib.SMTPConnectError(code, greeting)
        except (OSError, smtplib.SMTPException) as exc:
            raise SmarthostUnusable(Result(451, "4.4.1 smarthost %s unreachable: %s" % (
                where, printable(exc) or type(exc).__name__))) from None
        try:
            smtp.ehlo()
            mode = self.options.smarthost_tls
            if mode != "off" and smtp.has_extn("starttls"):
                context = ssl.create_default_context(cafile=self.options.smarthost_ca)
                try:
                    smtp.starttls(context=context)
                except ssl.SSLError as exc:
                    raise SmarthostUnusable(Result(451, "4.7.5 smarthost %s TLS failed: %s" % (
                        where, printable(exc))), tls_failed=True) from None
                smtp.ehlo()
            elif mode == "required":
                raise SmarthostUnusable(Result(451, "4.7.10 smarthost %s does not offer "
                                               "STARTTLS (smarthost_tls = required)" % where),
                                        tls_failed=True)
            if self.options.smarthost_user:
                self.login(smtp, where)
        except BaseException:
            smtp.close()
            raise
        log.info("connected to smarthost %s%s", where, " with TLS" if smtp.sock and
                 isinstance(smtp.sock, ssl.SSLSocket) else "")
        return smtp

    def login(self, smtp, where):
        """AUTH (RFC 4954), never in the clear unless explicitly allowed."""
        if not isinstance(smtp.sock, ssl.SSLSocket) and not self.options.smarthost_auth_plaintext:
            raise SmarthostUnusable(Result(451, "4.7.11 refusing AUTH to smarthost %s "
                                           "without TLS (smarthost_auth_plaintext)" % where))
        password = ""
        if self.options.smarthost_password_file:
            try:
                with open(self.options.smarthost_password_file, encoding="utf-8") as f:
                    password = f.readline().rstrip("\r\n")
            except OSError as exc:
                raise SmarthostUnusable(Result(451, "4.7.0 cannot read the smarthost "
                                               "password file: %s" % exc.strerror)) from None
        try:
            smtp.login(self.options.smarthost_user, password)
        except smtplib.SMTPException as exc:
            code = getattr(exc, "smtp_code", 0)
            text = _text(getattr(exc, "smtp_error", b"")) or str(exc)
            raise SmarthostUnusable(Result(451, "4.7.8 smarthost %s refused AUTH: %s %s" % (
                where, code or "", text))) from None

    def transaction(self, smtp, envelope, recipients, results):
        """One MAIL..DATA for recipients, filling results as replies come.

        Only final outcomes go into results: a 5xx RCPT at once, accepted
        recipients when DATA is answered; on a lost connection the rest are
        deferred by the caller.
        """
        params = envelope.params
        mail_options = []
        if params.get("REQUIRETLS"):
            # RFC 8689 section 4.2.1: TLS with a verified certificate (the
            # context always verifies) and REQUIRETLS after it, or a bounce.
            if not isinstance(smtp.sock, ssl.SSLSocket):
                results.update(dict.fromkeys(recipients, Result(
                    550, "5.7.10 REQUIRETLS: smarthost %s offers no TLS" % self.where)))
                return
            if not smtp.has_extn("requiretls"):
                results.update(dict.fromkeys(recipients, Result(
                    550, "5.7.30 REQUIRETLS support required: smarthost %s does not offer it"
                    % self.where)))
                return
            mail_options.append("REQUIRETLS")
        if smtp.has_extn("size"):
            mail_options.append("SIZE=%d" % envelope.size)
        if params.get("BODY") == "8BITMIME":
            if not smtp.has_extn("8bitmime"):
                # RFC 6152 section 3: no 8-bit relaying to a 7-bit server.
                results.update(dict.fromkeys(recipients, Result(
                    554, "5.6.3 smarthost does not support 8BITMIME")))
                return
            mail_options.append("BODY=8BITMIME")
        smtp.command_encoding = "ascii"
        if params.get("SMTPUTF8"):
            if not smtp.has_extn("smtputf8"):
                # RFC 6531 section 3.2: the message cannot be relayed as is.
                results.update(dict.fromkeys(recipients, Result(
                    553, "5.6.7 smarthost does not support SMTPUTF8")))
                return
            mail_options.append("SMTPUTF8")
            smtp.command_encoding = "utf-8"
        # RFC 3461 section 5.2.1: the DSN request goes on unchanged to a
        # server that offers DSN (ORCPT added when absent), else not at all.
        self.relays_dsn = smtp.has_extn("dsn")
        rcpt_options = dict.fromkeys(recipients, "")
        if self.relays_dsn:
            for key in ("RET", "ENVID"):
                if key in params:
                    mail_options.append("%s=%s" % (key, params[key]))
            for recipient in recipients:
                record = envelope.status.get(recipient)
                notify = record.notify if record is not None else None
                orcpt = record.orcpt if record is not None and record.orcpt else \
                    dsn.orcpt_for(recipient)
                rcpt_options[recipient] = ("" if notify is None else " NOTIFY=" + ",".join(notify)) \
                    + " ORCPT=" + orcpt
        mail = "MAIL FROM:<%s>%s\r\n" % (envelope.sender, "".join(" " + o for o in mail_options))
        rcpts = ["RCPT TO:<%s>%s\r\n" % (r, rcpt_options[r]) for r in recipients]
        # RFC 3030: with CHUNKING the message goes in BDAT chunks, not DATA.
        chunking = smtp.has_extn("chunking")
        data = [] if chunking else ["DATA\r\n"]
        if smtp.has_extn("pipelining"):
            # RFC 2920 section 3.1: MAIL, the RCPTs and DATA in one group.
            smtp.send("".join([mail, *rcpts, *data]))
            replies = [self.reply_of(smtp) for _ in range(len(rcpts) + 1 + len(data))]
        else:
            replies = [self.command(smtp, mail)]
            if 200 <= replies[0].code < 300:
                replies += [self.command(smtp, rcpt) for rcpt in rcpts]
            if data and any(200 <= reply.code < 300 for reply in replies[1:]):
                replies.append(self.command(smtp, "DATA\r\n"))
        mail_reply, rcpt_replies, data_reply = replies[0], replies[1:len(rcpts) + 1], (
            replies[len(rcpts) + 1] if len(replies) == len(rcpts) + 2 else None)
        accepted = []
        for recipient, reply in zip(recipients, rcpt_replies, strict=False):
            if not 200 <= mail_reply.code < 300:
                results[recipient] = mail_reply
            elif 200 <= reply.code < 300:
                accepted.append(recipient)
            else:
                results[recipient] = reply
        if not 200 <= mail_reply.code < 300:
            results.update(dict.fromkeys(recipients, mail_reply))
        if data_reply is not None and data_reply.code == 354 and not accepted:
            # RFC 2920 section 3.1: DATA accepted with no recipient; end it empty.
            smtp.send(b".\r\n")
            smtp.getreply()
        if not accepted:
            self.reset(smtp)
            return
        if chunking:
            self.data_started = True
            with envelope.open() as message:
                reply = send_chunks(smtp, message, self.reply_of) or self.reply_of(smtp)
            if not 200 <= reply.code < 300:
                self.reset(smtp)
            results.update(dict.fromkeys(accepted, reply))
            return
        if data_reply.code != 354:
            if data_reply.code < 400:
                data_reply = Result(451, "4.5.0 unexpected reply to DATA: %s" % (data_reply,))
            results.update(dict.fromkeys(accepted, data_reply))
            self.reset(smtp)
            return
        self.data_started = True
        with envelope.open() as message:
            send_data(smtp, message)
        reply = self.reply_of(smtp)
        results.update(dict.fromkeys(accepted, reply))

    def command(self, smtp, line):
        smtp.send(line)
        return self.reply_of(smtp)

    def reply_of(self, smtp):
        """The smarthost's next reply as a Result that names it (a report's Remote-MTA)."""
        return _reply(smtp.getreply())._replace(remote=self.options.smarthost[0])

    def reset(self, smtp):
        smtp.rset()

    def drop(self):
        if self.smtp is not None:
            hang_up(self.smtp, polite=False)
            self.smtp = None

    def close(self):
        if self.smtp is not None:
            hang_up(self.smtp)
            self.smtp = None


def hang_up(client, polite=True):
    """Close an smtplib client whatever its connection's state; QUIT first when polite."""
    if polite:
        try:
            client.quit()
        except (OSError, smtplib.SMTPException):
            pass
    try:
        client.close()
    except OSError:
        pass


def send_chunks(client, message, reply_of):
    """Stream message as BDAT chunks (RFC 3030); a refusal of a chunk, or None after LAST.

    No dot-stuffing and no end marker: each chunk says its size.  Each
    chunk but the last is answered (reply_of(client)) before the next goes,
    so replies never pile up; the first that is not 2xx ends the message.
    The reply to LAST is the caller's to read: one for SMTP, one per
    recipient for LMTP (RFC 2033 section 4.3).  A message that does not
    end in CRLF gets one, as with DATA.
    """
    chunk = message.read(BDAT_CHUNK)
    while True:
        following = message.read(BDAT_CHUNK)
        last = not following
        if last and not chunk.endswith(b"\r\n"):
            chunk += b"\r\n"
        client.send(b"BDAT %d%s\r\n" % (len(chunk), b" LAST" if last else b""))
        client.send(chunk)
        if last:
            return None
        reply = reply_of(client)
        if not 200 <= reply.code < 300:
            return reply
        chunk = following


def send_data(smtp, message):
    """Stream message (CRLF lines) as DATA text: dot-stuffed, then CRLF.CRLF.

    The spool holds CRLF-only lines (netsmtp.wire checks them on the way
    in); lines are read with a bound, so memory stays small.
    """
    out = bytearray()
    line_start = True
    last = b"\r\n"
    while True:
        line = message.readline(CHUNK)
        if not line:
            break
        if line_start and line[:1] == b".":
            out += b"."
        out += line
        line_start = line.endswith(b"\n")
        last = line
        if len(out) >= CHUNK:
            smtp.send(bytes(out))
            out.clear()
    if not last.endswith(b"\r\n"):
        out += b"\r\n"
    out += b".\r\n"
    smtp.send(bytes(out))


def _text(value):
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    return " ".join(str(value).split())


def _reply(code_text):
    """smtplib's (code, bytes) as a Result on one printable line."""
    code, text = code_text
    return Result(code, printable(_text(text)))
