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
import shutil
import tempfile

from .policy_service import Action, PolicyClient, ask, parse_action
from .replies import FilterReply, printable

log = logging.getLogger(__name__)

IN_MEMORY = 1 << 20  # octets of a message kept in memory before it goes to a file
COPY_CHUNK = 65536


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
    """True when the spool keeps held entries (the queue control's held flag)."""
    return callable(getattr(spool, "hold", None))


class Filters:
    """The policy services and milters of one session."""

    def __init__(self, session):
        self.session = session
        options = session.options
        self.policies = [PolicyClient(address, options.policy_timeout)
                         for address in options.policy_services]
        self.transaction = None

    def current(self):
        """The Transaction of the session's envelope, new for each MAIL."""
        envelope = self.session.envelope
        if self.transaction is None or self.transaction.envelope is not envelope:
            self.transaction = Transaction(envelope)
        return self.transaction

    # -- the stages ----------------------------------------------------------

    def rcpt(self, address, params):
        """Ask the policy services about one recipient; raises the refusal."""
        if self.policies:
            self.apply(self.ask("RCPT", recipient=address))

    def wrap(self, writer, envelope):
        """A writer that holds the message back until the filters have seen it."""
        return FilterWriter(self, writer, envelope)

    def end_of_message(self, envelope, size):
        """The last word of the filters before the commit; raises the refusal."""
        if self.policies and self.session.options.policy_end_of_message:
            one = envelope.recipients[0] if len(envelope.recipients) == 1 else ""
            self.apply(self.ask("END-OF-MESSAGE", recipient=one, size=size,
                                recipient_count=len(envelope.recipients),
                                queue_id=envelope.id))

    def close(self):
        for client in self.policies:
            client.close()

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
            "sasl_method": getattr(session, "auth_mechanism", None) or ""
            if session.auth_user else "",
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


class FilterWriter:
    """Stands for the spool writer during DATA; the entry is written at commit().

    The writer the session began is thrown away and a fresh entry written,
    since the filters may have changed the envelope (its line heads the
    entry) as well as the message.
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
        transaction = filters.current()
        self.inner.close()
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
        self.inner = session.spool.create(envelope)
        self.inner.write(session.received_header(envelope))
        for line in transaction.prepend:
            self.inner.write(line.encode("utf-8") + b"\r\n")
        self.buffer.seek(0)
        shutil.copyfileobj(self.buffer, self.inner, COPY_CHUNK)
        if transaction.hold is not None:
            session.spool.hold(envelope.id, transaction.hold)
        self.inner.commit()
        self.committed = True

    def close(self):
        self.buffer.close()
        self.inner.close()


__all__ = ["FilterReply", "FilterWriter", "Filters"]
