"""The session's filters: policy services and milters, at each stage of a session.

A Session with --policy-service or --milter set makes one Filters, which
the session calls at connect, HELO, MAIL, RCPT, DATA, the end of the
message (through the writer it wraps) and the end of a transaction or
session.  The message streams into a bounded temporary file; at the end,
after the filters have spoken, the entry is written with their changes and
committed, so the spooled message is the filtered one, fsync'd before the
250, and a refusal leaves nothing in the spool.
"""

import logging
import os
import re
import tempfile

from . import __version__
from .address import AddressError, domain_of, parse_path
from .milter import (ACCEPT, BODY_CHUNK, CONTINUE, DISCARD, HDR_LEADSPC, REJECTED, SKIPBODY,
                     TEMPFAILED, Milter, MilterError, describe)
from .policy_service import Action, PolicyClient, ask, parse_action
from .replies import FilterReply, printable
from .wire import HEADER_LIMIT, TEXT_LINE_LIMIT

log = logging.getLogger(__name__)

IN_MEMORY = 1 << 20  # octets of a message kept in memory before it goes to a file
COPY_CHUNK = 65536
HEADER_NAME = re.compile(r"[\x21-\x39\x3b-\x7e]+\Z")  # RFC 5322 section 3.6.8
# A milter's refusal at connect: 554 keeps the session for its QUIT (RFC 5321
# section 3.1), a temporary one closes it.
CONNECT_REPLIES = {b"r": FilterReply(554, "5.7.1", "Command rejected"),
                   b"t": FilterReply(421, "4.7.1", "Service unavailable - try again later")}


class Transaction:
    """What the filters decided about one message so far."""

    def __init__(self, envelope):
        self.envelope = envelope
        self.instance = os.urandom(8).hex()  # Postfix's instance: constant within a message
        self.prepend = []     # header lines to put on top of the message
        self.hold = None      # the reason, when the message is to be held
        self.discard = None   # the reason, when it is to be dropped
        self.redirect = None  # the one recipient that replaces all others


def can_hold(spool):
    """True when the spool keeps held entries (the queue control's held flag); a sink does not."""
    return callable(getattr(spool, "write_state", None))


def hold_new_entry(spool, envelope, reason):
    """Write the entry's state with held set before the entry is committed, so that no
    netsmtp-send can take it in between; netsmtp-queue --release lets it go."""
    from .envelope import Envelope
    state = Envelope(**{name: getattr(envelope, name) for name in Envelope.FIELDS})
    state.path = spool.entry_path(envelope.id)
    state.load_state()
    state.held = True
    spool.write_state(envelope.id, state.freeze_state())
    log.info("held id=%s: %s", envelope.id, printable(reason))


class Filters:
    """The policy services and milters of one session."""

    def __init__(self, session):
        self.session = session
        options = session.options
        self.policies = [PolicyClient(address, options.policy_timeout)
                         for address in options.policy_services]
        self.milters = [Milter(address, options.milter_timeout, options.milter_default_action)
                        for address in options.milters]
        self.transaction = None
        self.mail_discard = None  # a discard at MAIL, before the envelope exists

    def current(self):
        """The Transaction of the session's envelope, new for each MAIL."""
        envelope = self.session.envelope
        if self.transaction is None or self.transaction.envelope is not envelope:
            self.transaction = Transaction(envelope)
            if envelope is not None:
                self.transaction.discard, self.mail_discard = self.mail_discard, None
        return self.transaction

    # -- the stages ----------------------------------------------------------

    def connect(self):
        """Milters' connect stage; a refusal is raised for the greeting to send."""
        session = self.session
        hostname = "[%s]" % session.peer if session.peer else "localhost"
        for milter in self.milters:
            result = milter.connect(hostname, session.peer, self.macro_values())
            if milter.failed:
                continue  # its default action answers the first transaction
            self.milter_result(milter, result, "connect")

    def helo(self, name):
        for milter in self.milters:
            result = milter.helo(name, self.macro_values())
            if not milter.failed:
                self.milter_result(milter, result, "helo")

    def mail(self, sender, params):
        """Milters' MAIL stage, before the envelope exists; raises the refusal."""
        args = esmtp_args(params)
        self.mail_discard = None
        try:
            for milter in self.milters:
                self.milter_result(milter, milter.mail(sender, args, self.macro_values(
                    sender=sender, params=params)), "mail")
        except BaseException:
            self.abort()  # no transaction begins: the milters that saw MAIL forget it
            raise

    def rcpt(self, address, params):
        """Ask the policy services, then the milters, about one recipient."""
        if self.policies:
            self.apply(self.ask("RCPT", recipient=address))
        for milter in self.milters:
            self.milter_result(milter, milter.rcpt(address, esmtp_args(params),
                                                   self.macro_values(recipient=address)), "rcpt")

    def wrap(self, writer, envelope):
        """The DATA stage; then a writer that holds the message back until the end."""
        try:
            for milter in self.milters:
                self.milter_result(milter, milter.data(self.macro_values()), "data")
        except BaseException:
            writer.close()
            raise
        return FilterWriter(self, writer, envelope)

    def end_of_message(self, envelope, size):
        """The policy services' last word before the commit; raises the refusal."""
        if self.policies and self.session.options.policy_end_of_message:
            one = envelope.recipients[0] if len(envelope.recipients) == 1 else ""
            self.apply(self.ask("END-OF-MESSAGE", recipient=one, size=size,
                                recipient_count=len(envelope.recipients),
                                queue_id=envelope.id))

    def milters_end_of_message(self, envelope, message):
        """Each milter in turn sees the message (as the earlier ones left it) and may
        change it; its refusal is raised."""
        for milter in self.milters:
            if milter.failed or milter.done_session or not milter.in_transaction:
                if milter.failed:
                    self.milter_result(milter, milter.default_result(), "eom")
                continue
            leading = bool(milter.protocol & HDR_LEADSPC)
            replacement = message.replacement()
            try:
                result = milter.message(message.milter_headers(leading),
                                        message.body_chunks(BODY_CHUNK), self.macro_values(),
                                        body_sink=replacement.feed)
                if result.kind in (CONTINUE, ACCEPT):
                    self.modify(milter, result, envelope, message, leading)
                    if result.body_replaced:
                        message.replace_body(replacement.finish())
            except ValueError as exc:
                result = milter.fail(MilterError("bad modification: %s" % exc))
            finally:
                replacement.close()
            self.milter_result(milter, result, "eom")
            if self.current().discard is not None:
                return

    def abort(self):
        """The transaction ended without its end of message (RSET, a refusal)."""
        for milter in self.milters:
            milter.abort()

    def close(self):
        for client in self.policies:
            client.close()
        for milter in self.milters:
            milter.close()

    # -- milters -------------------------------------------------------------------

    def macro_values(self, sender=None, params=None, recipient=None):
        """The macros milters rely on, by Sendmail's names; unknown ones are left out."""
        session = self.session
        envelope = session.envelope
        tls = session.tls or {}
        if sender is None and envelope is not None:
            sender, params = envelope.sender, envelope.params
        params = params or {}
        values = {
            "j": session.options.hostname, "{daemon_name}": "netsmtp",
            "v": "netsmtp " + __version__,
            "_": "%s [%s]" % ("unknown", session.peer) if session.peer else "localhost",
            "{client_addr}": session.peer, "{client_name}": "unknown" if session.peer else None,
            "{tls_version}": tls.get("version"), "{cipher}": tls.get("cipher"),
            "{cipher_bits}": tls.get("bits"),
            "{auth_type}": session.auth_mechanism if session.auth_user else None,
            "{auth_authen}": session.auth_user,
            "{auth_author}": params.get("AUTH") if params.get("AUTH") not in (None, "<>") else None,
            "i": envelope.id if envelope is not None else None,
        }
        if sender is not None:
            values.update({"{mail_addr}": sender, "{mail_host}": domain_of(sender) or None,
                           "{mail_mailer}": "smtp" if sender else "local"})
        if recipient is not None:
            domain = domain_of(recipient)
            local = not domain or domain in session.options.local_domains
            values.update({"{rcpt_addr}": recipient, "{rcpt_host}": domain or None,
                           "{rcpt_mailer}": "local" if local else "smtp"})
        return {name: str(value) for name, value in values.items() if value is not None}

    def milter_result(self, milter, result, stage):
        """Take a milter's answer to a stage: raise its refusal, note a discard."""
        if result.kind in (CONTINUE, ACCEPT, SKIPBODY):
            return
        if result.kind == DISCARD:  # never at connect or HELO (netsmtp.milter refuses it)
            reason = "discarded by milter %s" % milter.name
            if stage == "mail":
                self.mail_discard = reason  # the envelope is made after the milters' MAIL
            else:
                self.current().discard = reason
            return
        reply = result.reply
        if stage == "connect" and reply in (REJECTED, TEMPFAILED):
            reply = CONNECT_REPLIES[result.kind]
        log.info("%s: milter %s: %s at %s", self.session.tag, milter.name, describe(result),
                 stage)
        self.refuse(reply)

    def modify(self, milter, result, envelope, message, leading):
        """Apply a milter's modifications at end of message; ValueError if one is unsafe."""
        for command, args in result.modifications:
            if command == b"h":
                message.add_header(args[0], args[1], leading)
            elif command == b"i":
                message.add_header(args[1], args[2], leading, index=args[0])
            elif command == b"m":
                message.change_header(args[0], args[1], args[2], leading)
            elif command in (b"+", b"2"):
                address = check_address(args[0])
                if len(envelope.recipients) >= self.session.options.max_recipients:
                    raise ValueError("too many recipients")
                envelope.add_recipients(address, None, {})
                log.info("%s: milter %s added recipient <%s> to id=%s", self.session.tag,
                         milter.name, printable(address), envelope.id)
            elif command == b"-":
                address = args[0].strip().strip("<>")
                if address in envelope.recipients:
                    envelope.recipients.remove(address)
                    envelope.dsn.pop(address, None)
                log.info("%s: milter %s deleted recipient <%s> from id=%s", self.session.tag,
                         milter.name, printable(address), envelope.id)
            elif command == b"e":
                envelope.sender = check_address(args[0]) if args[0].strip() != "<>" else ""
                log.info("%s: milter %s changed the sender of id=%s to <%s>", self.session.tag,
                         milter.name, envelope.id, printable(envelope.sender))
            elif command == b"q":
                if not can_hold(self.session.spool):
                    raise ValueError("quarantine asked, and this spool cannot hold")
                self.current().hold = "quarantined by milter %s: %s" % (milter.name, args[0])

    # -- policy services -------------------------------------------------------

    def ask(self, state, **values):
        session, envelope = self.session, self.session.envelope
        tls = session.tls or {}
        attributes = {
            "request": "smtpd_access_policy",
            "protocol_state": state,
            "protocol_name": "ESMTP" if session.esmtp else "SMTP",
            "helo_name": session.helo or "",
            "queue_id": "",
            "sender": envelope.sender if envelope is not None else "",
            "recipient": "",
            "recipient_count": 0,
            "client_address": session.peer or "",
            "client_name": "unknown",  # netsmtp does not look names up
            "reverse_client_name": "unknown",
            "instance": self.current().instance,
            "sasl_method": session.auth_mechanism or "" if session.auth_user else "",
            "sasl_username": session.auth_user or "",
            "sasl_sender": "",
            "size": envelope.params.get("SIZE", 0) if envelope is not None else 0,
            "encryption_protocol": tls.get("version", ""),
            "encryption_cipher": tls.get("cipher", ""),
            "encryption_keysize": tls.get("bits", 0) or 0,
            "stress": "",
        }
        attributes.update(values)
        return ask(self.policies, attributes, session.options.policy_default_action)

    def apply(self, actions):
        """Take the actions: a refusal is raised, the rest are kept for the commit."""
        transaction = self.current()
        for action in actions:
            if action.kind == Action.HOLD and not can_hold(self.session.spool):
                log.error("%s: a filter asked to HOLD, and this spool cannot hold: "
                          "using the default action", self.session.tag)
                action = parse_action(self.session.options.policy_default_action)
            if action.kind == Action.REFUSE:
                self.refuse(action.reply)
            elif action.kind == Action.PREPEND:
                transaction.prepend.append(action.argument)
            elif action.kind == Action.HOLD:
                transaction.hold = action.argument or "held by a filter"
            elif action.kind == Action.DISCARD:
                transaction.discard = action.argument or "discarded by a filter"
            elif action.kind == Action.REDIRECT:
                transaction.redirect = action.argument

    def refuse(self, reply):
        """Raise a filter's reply; 421 and 521 also end the session, as in Postfix."""
        if reply.code in (421, 521):
            self.session.closing = True
        raise reply


def esmtp_args(params):
    """MAIL or RCPT parameters as the words of the command ("SIZE=10", "SMTPUTF8")."""
    return [key if value is True else "%s=%s" % (key, value) for key, value in params.items()]


class FilterWriter:
    """Stands for the spool writer during DATA; the entry is written at commit().

    The message waits in a temporary file (in memory up to IN_MEMORY
    octets) until the filters have spoken.  The writer the session began is
    then thrown away and a fresh entry written, since the filters may have
    changed the envelope (its line heads the entry) as well as the message.
    """

    def __init__(self, filters, writer, envelope):
        self.filters, self.inner, self.envelope = filters, writer, envelope
        spool = filters.session.spool
        self.buffer = tempfile.SpooledTemporaryFile(IN_MEMORY, dir=getattr(spool, "tmp", None))
        self.size = 0
        self.committed = False

    def write(self, data):
        self.buffer.write(data)
        self.size += len(data)

    def commit(self):
        filters, envelope = self.filters, self.envelope
        session = filters.session
        filters.end_of_message(envelope, self.size)
        message = EditedMessage(self.buffer, session.options.max_size,
                                getattr(session.spool, "tmp", None))
        try:
            filters.milters_end_of_message(envelope, message)
            transaction = filters.current()
            self.inner.close()
            if transaction.discard is None and not envelope.recipients:
                transaction.discard = "the filters removed every recipient"
            if transaction.discard is not None:
                log.info("%s: discarded id=%s: %s", session.tag, envelope.id,
                         printable(transaction.discard))
                self.committed = True
                return
            if transaction.redirect is not None:
                log.info("%s: redirected id=%s from %s to <%s>", session.tag, envelope.id,
                         ",".join("<%s>" % printable(r) for r in envelope.recipients),
                         printable(transaction.redirect))
                envelope.recipients[:] = [transaction.redirect]
                envelope.dsn.clear()  # the DSN requests were the replaced recipients'
            self.inner = session.spool.create(envelope)
            for line in transaction.prepend:  # above the Received header, as Postfix's smtpd
                self.inner.write(line.encode("utf-8") + b"\r\n")
            self.inner.write(session.received_header(envelope))
            message.write_to(self.inner)
            if transaction.hold is not None:
                hold_new_entry(session.spool, envelope, transaction.hold)
            self.inner.commit()
            self.committed = True
        finally:
            message.close()

    def close(self):
        self.buffer.close()
        self.inner.close()


class EditedMessage:
    """The message as the filters see and change it: its header fields, and its body
    (the received one, or the milters' replacement), both bounded.

    headers is [[name, value]], value being the text after the colon with its
    folds ("\\r\\n" and white space), as received; the body stays in a file.
    """

    def __init__(self, buffer, max_size, tmp=None):
        self.buffer, self.max_size, self.tmp = buffer, max_size, tmp
        self.headers, self.blank_line = [], False
        buffer.seek(0)
        while True:
            line = buffer.readline(HEADER_LIMIT)
            if line in (b"\r\n", b""):
                self.blank_line = line == b"\r\n"
                break
            text = line[:-2].decode("utf-8", "surrogateescape")
            if text[:1] in (" ", "\t") and self.headers:
                self.headers[-1][1] += "\r\n" + text
                continue
            name, colon, value = text.partition(":")
            if not colon or not HEADER_NAME.match(name) or not line.endswith(b"\r\n"):
                # No header section (check_headers let it through): all of it is body.
                self.headers = []
                buffer.seek(0)
                break
            self.headers.append([name, value])
        self.body_offset = buffer.tell()
        self.body = None  # a replacement from a milter: a temporary file

    # -- as milters see it -------------------------------------------------------

    def milter_headers(self, leading_space):
        """[(name, value)]: folds as "\\n" (as Sendmail sends them), one leading space
        removed unless the milter asked for it (SMFIP_HDR_LEADSPC)."""
        out = []
        for name, value in self.headers:
            if not leading_space and value[:1] == " ":
                value = value[1:]
            out.append((name, value.replace("\r\n", "\n")))
        return out

    def body_chunks(self, size):
        source = self.body if self.body is not None else self.buffer
        source.seek(0 if self.body is not None else self.body_offset)
        while True:
            chunk = source.read(size)
            if not chunk:
                return
            yield chunk

    # -- changes, each checked ---------------------------------------------------

    def header_value(self, value, leading_space):
        """A milter's header value as it will be written; ValueError if it could
        change the message's structure (NUL, bare CR or LF, a fold without white
        space, a line over 998 octets)."""
        value = value.replace("\r\n", "\n")
        if "\0" in value or "\r" in value:
            raise ValueError("NUL or bare CR in a header value")
        lines = value.split("\n")
        if any(line[:1] not in (" ", "\t") or not line.strip() for line in lines[1:]):
            raise ValueError("a header value's continuation line must begin with white space")
        if any(len(line.encode("utf-8", "surrogateescape")) > 998 for line in lines):
            raise ValueError("header line over 998 octets")
        if any(c < " " and c != "\t" or c == "\x7f" for c in value.replace("\n", "")):
            raise ValueError("control character in a header value")
        value = "\r\n".join(lines)
        return value if leading_space or value[:1] in (" ", "\t") or not value else " " + value

    def add_header(self, name, value, leading_space, index=None):
        header = [check_name(name), self.header_value(value, leading_space)]
        if index is None or index >= len(self.headers):
            self.headers.append(header)
        else:
            self.headers.insert(index, header)

    def change_header(self, index, name, value, leading_space):
        """SMFIR_CHGHEADER: the index-th (from 1; 0 is taken as 1, as Postfix takes it)
        field of that name; an empty value deletes it, a missing one is added (as
        Sendmail does)."""
        check_name(name)
        index = index or 1
        found = [i for i, (other, _) in enumerate(self.headers) if other.lower() == name.lower()]
        position = found[index - 1] if 0 < index <= len(found) else None
        if not value:
            if position is not None:
                del self.headers[position]
        elif position is None:
            self.add_header(name, value, leading_space)
        else:
            self.headers[position][1] = self.header_value(value, leading_space)

    def replacement(self):
        """A BodyReplacement for a milter's SMFIR_REPLBODY chunks."""
        return BodyReplacement(self.max_size, self.tmp)

    def replace_body(self, body):
        """Take a finished replacement (a file) as the body."""
        if self.body is not None:
            self.body.close()
        self.body = body

    # -- the result ----------------------------------------------------------------

    def write_to(self, writer):
        for name, value in self.headers:
            writer.write(("%s:%s\r\n" % (name, value)).encode("utf-8", "surrogateescape"))
        has_body = self.body is not None or self.buffer.seek(0, 2) > self.body_offset
        if self.headers and (self.blank_line or has_body):
            writer.write(b"\r\n")
        for chunk in self.body_chunks(COPY_CHUNK):
            writer.write(chunk)

    def close(self):
        if self.body is not None:
            self.body.close()


class BodyReplacement:
    """A replaced body as its chunks arrive, checked and kept in a temporary file.

    LF becomes CRLF (Sendmail's milters send LF); NUL, a bare CR, a line over
    1000 octets or a body over max_size is refused with ValueError.
    """

    def __init__(self, max_size, tmp=None):
        self.max_size, self.tmp = max_size, tmp
        self.file = None
        self.size, self.line, self.pending_cr = 0, 0, False

    def feed(self, chunk):
        if self.file is None:
            self.file = tempfile.SpooledTemporaryFile(IN_MEMORY, dir=self.tmp)
        if b"\0" in chunk:
            raise ValueError("NUL in the replaced body")
        if self.pending_cr:
            chunk = b"\r" + chunk
        self.pending_cr = chunk.endswith(b"\r")
        if self.pending_cr:
            chunk = chunk[:-1]
        if b"\r" in chunk.replace(b"\r\n", b""):
            raise ValueError("bare CR in the replaced body")
        chunk = chunk.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
        pieces = chunk.split(b"\r\n")
        first = self.line + len(pieces[0])
        self.line = first if len(pieces) == 1 else len(pieces[-1])
        if max(first, self.line, *map(len, pieces[1:])) > TEXT_LINE_LIMIT - 2:
            raise ValueError("line over %d octets in the replaced body" % TEXT_LINE_LIMIT)
        self.size += len(chunk)
        if self.size > self.max_size:
            raise ValueError("replaced body over --max-size")
        self.file.write(chunk)

    def finish(self):
        """The replacement as a file; the caller owns it from here on."""
        if self.pending_cr:
            raise ValueError("bare CR in the replaced body")
        if self.file is None:
            self.file = tempfile.SpooledTemporaryFile(IN_MEMORY, dir=self.tmp)
        if self.size and self.line:
            self.file.write(b"\r\n")  # text ends with a line break (RFC 5322 section 2.3)
        body, self.file = self.file, None
        return body

    def close(self):
        if self.file is not None:
            self.file.close()
            self.file = None


def check_name(name):
    if not HEADER_NAME.match(name):
        raise ValueError("header name %r is not a field name" % printable(name, 80))
    return name


def check_address(address):
    """A milter's address ("<a@b>" or "a@b"), checked as a path; ValueError if not one."""
    text = address.strip()
    try:
        parsed, params = parse_path(text if text.startswith("<") else "<%s>" % text)
    except AddressError:
        raise ValueError("%r is not an address" % printable(address, 80)) from None
    if params:
        raise ValueError("%r is not an address" % printable(address, 80))
    return parsed


__all__ = ["EditedMessage", "FilterReply", "FilterWriter", "Filters"]
