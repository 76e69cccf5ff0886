"""LMTP delivery (RFC 2033): the "lmtp" route, into a mail store such as Dovecot.

LMTP is SMTP without a queue at the far end: after the final dot the
server answers once for each recipient it accepted, in RCPT order, and each
answer is that recipient's own outcome (section 4.2).  smtplib.LMTP reads
a single reply there (CPython gh-76984), so this client uses smtplib only to
connect, say LHLO and read replies, and runs the transaction itself.
"""

import logging
import os
import smtplib

from . import dsn
from .delivery import Delivery, Result
from .options import UnixPath
from .replies import printable
from .smarthost import _reply, hang_up, send_chunks, send_data

log = logging.getLogger(__name__)


class LMTPDelivery(Delivery):
    """Delivers over LMTP to options.lmtp_host: HOST:PORT or unix:PATH.

    One connection serves the whole queue run, one transaction per message:
    LHLO once, then MAIL, the RCPTs and DATA pipelined in one write (an LMTP
    server must support PIPELINING, RFC 2033 section 5), the message (in
    BDAT chunks when the server offers CHUNKING), and one reply per
    accepted recipient: 2xx delivered, 4xx deferred, 5xx
    failed and bounced.  The DSN request (RET, ENVID, NOTIFY, ORCPT) goes
    to a server that offers DSN, which then reports itself; for one that
    does not, a 250 is final delivery and netsmtp reports it.  A server that cannot be reached defers all mail of
    the run without being tried again; a connection lost mid-transaction
    defers the recipients that have no reply yet.

    Class variables that may be overridden:
        timeout     seconds to wait for each reply (a mail store may take
                    a while to answer after the dot, as Postfix's
                    lmtp_data_done_timeout allows for)
    """

    name = "lmtp"
    timeout = 600.0
    relays_dsn = False

    @property
    def final(self):
        """A 2xx is final delivery (a "delivered" report for NOTIFY=SUCCESS), unless
        the server offered DSN and got the request to report itself (RFC 3461 5.2.2)."""
        return not self.relays_dsn

    def __init__(self, options):
        super().__init__(options)
        self.lmtp = None
        self.unusable = None
        target = options.lmtp_host
        if target is None:
            self.where = None
        elif isinstance(target, UnixPath):
            self.where = "unix:%s" % target
        else:
            self.where = "%s:%d" % target

    def describe(self):
        return "lmtp %s" % (self.where or "(no lmtp_host configured)")

    def deliver(self, envelope, recipients):
        if self.options.lmtp_host is None:
            return dict.fromkeys(recipients, Result(451, "4.3.5 no lmtp_host configured"))
        if self.unusable is not None:
            return dict.fromkeys(recipients, self.unusable)
        for attempt in (1, 2):
            reused = self.lmtp is not None
            results = {}
            sent = []
            try:
                if self.lmtp is None:
                    self.lmtp = self.connect()
                    if self.lmtp is None:
                        return dict.fromkeys(recipients, self.unusable)
                self.transaction(self.lmtp, envelope, recipients, results, sent)
                return results
            except (OSError, smtplib.SMTPException) as exc:
                self.drop()
                if reused and not sent and attempt == 1:
                    continue  # the kept connection went stale; one fresh try
                error = Result(451, "4.4.2 lmtp %s: %s" % (
                    self.where, printable(exc) or type(exc).__name__))
                log.warning("%s: %s", envelope.id, error)
                return {r: results.get(r, error) for r in recipients}
        raise AssertionError("unreachable")

    def connect(self):
        """An smtplib.LMTP after the greeting and LHLO, or None (self.unusable set)."""
        target = self.options.lmtp_host
        try:
            if isinstance(target, UnixPath):
                # smtplib takes a Unix socket only as an absolute path.
                lmtp = smtplib.LMTP(os.path.abspath(target), local_hostname=self.options.hostname,
                                    timeout=self.timeout)
            else:
                lmtp = smtplib.LMTP(*target, local_hostname=self.options.hostname,
                                    timeout=self.timeout)
        except (OSError, smtplib.SMTPException) as exc:
            self.unusable = Result(451, "4.4.1 lmtp %s unreachable: %s" % (
                self.where, printable(exc) or type(exc).__name__))
            log.warning("%s", self.unusable)
            return None
        try:
            code, text = lmtp.ehlo()  # LHLO: smtplib.LMTP says it in place of EHLO
        except (OSError, smtplib.SMTPException):
            lmtp.close()
            raise
        if not 200 <= code < 300:
            lmtp.close()
            self.unusable = Result(451, "4.4.1 lmtp %s refused LHLO: %d %s" % (
                self.where, code, printable(_reply((code, text)).text)))
            log.warning("%s", self.unusable)
            return None
        log.info("connected to lmtp %s", self.where)
        return lmtp

    def mail_options(self, lmtp, envelope):
        """The MAIL parameters; a Result for every recipient when the server lacks one."""
        params, options = envelope.params, []
        if lmtp.has_extn("size") and envelope.size is not None:
            options.append("SIZE=%d" % envelope.size)
        if params.get("BODY") == "8BITMIME":
            if not lmtp.has_extn("8bitmime"):
                # RFC 6152 section 3: no 8-bit data to a 7-bit server.
                return Result(554, "5.6.3 lmtp server does not support 8BITMIME")
            options.append("BODY=8BITMIME")
        if params.get("SMTPUTF8"):
            if not lmtp.has_extn("smtputf8"):
                return Result(553, "5.6.7 lmtp server does not support SMTPUTF8")
            options.append("SMTPUTF8")
        if self.relays_dsn:
            # RFC 3461 section 5.2.1: RET and ENVID pass on as the client gave them.
            options += ["%s=%s" % (key, params[key]) for key in ("RET", "ENVID") if key in params]
        return options

    def rcpt_options(self, lmtp, envelope, recipient):
        """The RCPT parameters of recipient: NOTIFY and ORCPT when the server offers DSN."""
        if not self.relays_dsn:
            return []
        record = envelope.status.get(recipient)
        options = []
        if record is not None and record.notify is not None:
            options.append("NOTIFY=" + ",".join(record.notify))
        options.append("ORCPT=" + (record.orcpt if record is not None and record.orcpt
                                   else dsn.orcpt_for(recipient)))
        return options

    def transaction(self, lmtp, envelope, recipients, results, sent):
        """One MAIL..DATA for recipients, filling results with final outcomes.

        sent gets an item once anything was written, so a failure after it
        is not retried on a fresh connection (the server may have acted).
        """
        self.relays_dsn = lmtp.has_extn("dsn")
        options = self.mail_options(lmtp, envelope)
        if isinstance(options, Result):
            results.update(dict.fromkeys(recipients, options))
            return
        lmtp.command_encoding = "utf-8" if envelope.params.get("SMTPUTF8") else "ascii"
        lines = ["MAIL FROM:<%s>%s\r\n" % (envelope.sender, "".join(" " + o for o in options))]
        for recipient in recipients:
            extra = self.rcpt_options(lmtp, envelope, recipient)
            lines.append("RCPT TO:<%s>%s\r\n" % (recipient, "".join(" " + o for o in extra)))
        # RFC 3030: a server with CHUNKING gets the message in BDAT chunks.
        chunking = lmtp.has_extn("chunking")
        if not chunking:
            lines.append("DATA\r\n")
        sent.append(True)
        lmtp.send("".join(lines))
        mail_reply = _reply(lmtp.getreply())
        rcpt_replies = [_reply(lmtp.getreply()) for _ in recipients]
        data_reply = None if chunking else _reply(lmtp.getreply())
        accepted = []
        for recipient, reply in zip(recipients, rcpt_replies, strict=True):
            if not 200 <= mail_reply.code < 300:
                results[recipient] = mail_reply
            elif 200 <= reply.code < 300:
                accepted.append(recipient)
            else:
                results[recipient] = reply
        if chunking:
            if accepted:
                self.send_chunks(lmtp, envelope, accepted, results)
            else:
                lmtp.rset()
            return
        if data_reply.code == 354 and not accepted:
            # RFC 2033 section 4.2 wants 503 here; after a 354 the count of
            # replies to come is unknowable, so this connection is done.
            self.drop()
            return
        if not accepted:
            lmtp.rset()
            return
        if data_reply.code != 354:
            if data_reply.code < 400:
                data_reply = Result(451, "4.5.0 unexpected reply to DATA: %s" % (data_reply,))
            results.update(dict.fromkeys(accepted, data_reply))
            lmtp.rset()
            return
        with envelope.open() as message:
            send_data(lmtp, message)
        # Section 4.2: one reply per accepted RCPT, in RCPT order, duplicates included.
        for recipient in accepted:
            results[recipient] = _reply(lmtp.getreply())
        log.debug("%s: lmtp %s: %s", envelope.id, self.where, "; ".join(
            "<%s> %s" % (printable(r), results[r]) for r in accepted))

    def send_chunks(self, lmtp, envelope, accepted, results):
        """The message as BDAT chunks; after BDAT LAST one reply per accepted RCPT.

        A chunk before the last gets one reply; one that is not 2xx ends
        the message with that reply for every accepted recipient.
        """
        with envelope.open() as message:
            refusal = send_chunks(lmtp, message, lambda client: _reply(client.getreply()))
        if refusal is not None:
            results.update(dict.fromkeys(accepted, refusal))
            lmtp.rset()
            return
        # RFC 2033 section 4.3: BDAT LAST is answered like DATA's final dot.
        for recipient in accepted:
            results[recipient] = _reply(lmtp.getreply())

    def drop(self):
        if self.lmtp is not None:
            hang_up(self.lmtp, polite=False)
            self.lmtp = None

    def close(self):
        if self.lmtp is not None:
            hang_up(self.lmtp)
            self.lmtp = None
