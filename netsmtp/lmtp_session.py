"""The LMTP server session (RFC 2033): `netsmtp --lmtp`.

LMTP is SMTP for the last hop, where the server has no queue of its own to
hide failures in: the client says LHLO, and after the final dot (or BDAT
LAST) the server answers once for every RCPT it accepted, in order,
duplicates included (section 4.2), so each recipient learns its own fate.
netsmtp accepts responsibility by spooling, so every recipient of a message
gets the same answer: the 250 of the spooled entry, or the refusal.
"""

import logging
from types import MappingProxyType

from .address import domain_of
from .replies import REPLIES, SMTPError
from .session import Session, ShuttingDown

log = logging.getLogger(__name__)


class LMTPSession(Session):
    """A Session that speaks LMTP.

    HELO and EHLO get 500 5.5.1 (section 4.1: never a positive reply); LHLO
    offers the EHLO keywords, PIPELINING and ENHANCEDSTATUSCODES among them
    (section 5).  Every recipient must be in a local domain (550 5.1.1
    otherwise), whoever the client is: an LMTP server delivers, it never
    relays.  The Received header says "with LMTP" (RFC 3848).
    """

    predecessors = {**Session.predecessors, "LHLO": Session.predecessors["EHLO"]}
    replies = MappingProxyType({**REPLIES, "220": "%s LMTP netsmtp ready"})

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.successful_rcpts = 0  # of the transaction, duplicates included
        self.whole_bdat = False  # the command is a BDAT LAST that is the whole message

    @property
    def protocol(self):
        """RFC 3848: LMTP, LMTPS, LMTPA or LMTPSA."""
        return "LMTP" + ("S" if self.tls else "") + ("A" if self.auth_user else "")

    def reset_transaction(self):
        super().reset_transaction()
        self.successful_rcpts = 0

    def smtp_LHLO(self, arg):
        self.greet(arg, esmtp=True)
        self.reply("250", self.options.hostname, self.helo, lines=self.extensions())

    def smtp_HELO(self, arg):
        raise SMTPError("500 5.5.1", "HELO")

    def smtp_EHLO(self, arg):
        raise SMTPError("500 5.5.1", "EHLO")

    def check_rcpt_to(self, address, params):
        domain = domain_of(address)
        if domain and domain not in self.options.local_domains:
            raise SMTPError("550 5.1.1", address)
        return super().check_rcpt_to(address, params)

    def smtp_RCPT(self, arg):
        super().smtp_RCPT(arg)  # raises for a refused recipient
        self.successful_rcpts += 1

    def smtp_BDAT(self, arg):
        self.whole_bdat = self.chunks is None and self.chunk_size(arg)[1]
        try:
            super().smtp_BDAT(arg)
        finally:
            self.whole_bdat = False

    def start_message(self):
        """A BDAT LAST whose message cannot even begin (the spool is full) stands
        for the final dot: its refusal is said once per successful RCPT too."""
        count = self.successful_rcpts  # the refusal resets the transaction
        try:
            return super().start_message()
        except SMTPError as refusal:
            if self.whole_bdat:
                for _ in range(count - 1):
                    self.reply(refusal.key, *refusal.args_)
            raise

    def end_message(self, sink, size, problem):
        """Section 4.2: one reply per successful RCPT, all the same here.

        The message is one spool entry: either every recipient's message is
        safely stored or none is.  A refusal is likewise said once per RCPT
        (the dispatcher sends the last one); an unexpected error is a 451
        for each, never a single reply the client would wait past.
        """
        count = self.successful_rcpts
        try:
            super().end_message(sink, size, problem)
        except SMTPError as refusal:
            for _ in range(count - 1):
                self.reply(refusal.key, *refusal.args_, lines=refusal.lines,
                           replies=refusal.replies)  # a filter's reply brings its own table
            raise
        except (EOFError, TimeoutError, ConnectionError, ShuttingDown):
            raise
        except Exception:
            log.exception("%s: internal error", self.tag)
            for _ in range(count):
                self.reply("451 4.3.0")
            return
        for _ in range(count - 1):
            self.reply("250 2.6.0", self.envelope.id)
