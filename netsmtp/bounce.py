"""Delivery status notifications (RFC 3464 reports).

A report is a multipart/report (RFC 6522): a human-readable part, a
message/delivery-status part (one block about the message, one per
recipient), and the original message: whole for a failure with RET=FULL
up to a size limit (RFC 3461 section 6.2), else its header section.  A
report naming a UTF-8 address is message/global-delivery-status with the
original as message/global or message/global-headers (RFC 6533).  It is
spooled as a new message from <> (RFC 5321 section 4.5.5) with NOTIFY=NEVER
(RFC 3461 section 6.1), so a report is never itself reported on.

Actions (RFC 3464 section 2.3.3): failed, delayed, delivered (final
delivery, e.g. Maildir), relayed (to a smarthost that does not do DSN) and
expanded (an alias, RFC 3461 section 5.2.7.3).
"""

import os
import time
from email.utils import formatdate, make_msgid

from . import dsn
from .envelope import Envelope
from .replies import invisible, printable
from .spool import new_queue_id

# The original header section is quoted up to this size (RFC 3462 allows
# headers only; a bound keeps a report small whatever the original).
MAX_QUOTED_HEADERS = 64 * 1024
DEFAULT_FULL_LIMIT = 50_000  # --bounce-size-limit, as Postfix's bounce_size_limit

# action -> (Subject, what the text part says happened)
ACTIONS = {
    "failed": ("Undelivered Mail Returned to Sender",
               "Your message could not be delivered to one or more recipients."),
    "delayed": ("Delayed Mail (still being retried)",
                "Your message could not be delivered yet to one or more recipients.\n"
                "Delivery will be tried again until %(until)s; no action is needed."),
    "delivered": ("Successful Mail Delivery Report",
                  "Your message was delivered to the mailbox of each recipient below."),
    "relayed": ("Successful Mail Delivery Report",
                "Your message was passed on to a mail system that sends no delivery\n"
                "reports; this is the last report you will get about these recipients."),
    "expanded": ("Successful Mail Delivery Report",
                 "Your message reached each address below, which is a list; it was\n"
                 "passed on to every member of the list."),
}

EXPLANATION = """\
This is the mail system at %(host)s.

%(what)s
%(returned)s

%(lines)s
"""


def status_code(result):
    """The RFC 3463 status of a Result: its enhanced code, or one from its class."""
    word = result.text.split(" ", 1)[0]
    parts = word.split(".")
    if len(parts) == 3 and all(p.isdigit() for p in parts) and word[0] in "245":
        return word
    return "%d.0.0" % (result.code // 100)


def original_headers(envelope):
    """The header section of the spooled message, bounded (bytes, CRLF)."""
    lines = []
    size = 0
    with envelope.open() as message:
        for line in iter(lambda: message.readline(MAX_QUOTED_HEADERS), b""):
            if line in (b"\r\n", b"\n") or size + len(line) > MAX_QUOTED_HEADERS:
                break
            lines.append(line)
            size += len(line)
    return b"".join(lines)


def address_type(address):
    # RFC 6533 section 3: utf-8 addresses for SMTPUTF8 mail.
    return "rfc822" if address.isascii() else "utf-8"


def returns_full(envelope, action, full_limit):
    """True when the report carries the whole message (RFC 3461 section 6.2)."""
    return (action == "failed" and envelope.params.get("RET") == "FULL"
            and not envelope.params.get("REQUIRETLS")  # RFC 8689 section 5: headers only
            and envelope.size is not None and envelope.size <= full_limit)


def field(value):
    """value as one header or delivery-status field: nothing in it can break a line.

    Addresses are checked at MAIL and RCPT, but an entry may be older, an
    override may have replaced a recipient, and a DSN parameter decodes to
    any octet: every control, separator and format character (everything
    str.splitlines() breaks at) is escaped, so no field of a report can
    start another (security review 2, M3).
    """
    text = str(value)
    if text.isascii() and text.isprintable():
        return text
    return "".join("\\x%02x" % ord(c) if c < " " or c == "\x7f"
                   else printable(c) if c > "\x7f" and invisible(c) else c for c in text)


def status_fields(envelope, action, records, hostname, now, retry_until=None):
    """The delivery-status fields: [per-message block, per-recipient blocks...] of (name, value)."""
    per_message = [("Reporting-MTA", "dns; %s" % hostname)]
    envid = envelope.params.get("ENVID")
    if envid is not None:
        try:
            envid = dsn.decode_xtext(envid)
        except dsn.DSNError:
            pass  # a session checks it; a hand-made one is escaped by field()
        per_message.append(("Original-Envelope-Id", envid))
    per_message.append(("X-Netsmtp-Queue-ID", envelope.id))
    if envelope.arrival:
        per_message.append(("Arrival-Date", formatdate(envelope.arrival, localtime=True)))
    blocks = [per_message]
    for record in records:
        block = []
        if record.orcpt is not None:
            block.append(("Original-Recipient", dsn.orcpt_field(record.orcpt)))
        block.append(("Final-Recipient", "%s; %s" % (address_type(record.address), record.address)))
        block.append(("Action", action))
        reply = None if action == "expanded" else record.reply
        block.append(("Status", "2.0.0" if reply is None else status_code(reply)))
        if record.remote is not None:
            block.append(("Remote-MTA", "dns; %s" % record.remote))
        if reply is not None:
            block.append(("Diagnostic-Code", "smtp; %s" % printable(reply)))
        if action in ("failed", "delayed"):
            block.append(("Last-Attempt-Date", formatdate(now, localtime=True)))
        if action == "delayed" and retry_until is not None:
            block.append(("Will-Retry-Until", formatdate(retry_until, localtime=True)))
        blocks.append(block)
    return blocks


def build_report(envelope, action, records, hostname, now=None, full_limit=DEFAULT_FULL_LIMIT,
                 retry_until=None):
    """The report of one action about records (Recipient records) as wire bytes (CRLF).

    Written out by hand rather than by email's generator, which cannot
    write 8-bit message/* parts: the returned message must be the octets
    that were spooled.  Every value comes from a checked address, a decoded
    and checked DSN parameter, or printable().
    """
    now = time.time() if now is None else now
    subject, what = ACTIONS[action]
    utf8 = needs_smtputf8(envelope, records)
    full = returns_full(envelope, action, full_limit)
    if full:
        with envelope.open() as message:
            original = message.read()
        if not original.endswith(b"\r\n"):
            original += b"\r\n"
        original_type = "message/global" if utf8 else "message/rfc822"
    else:
        original = original_headers(envelope)
        original_type = "message/global-headers" if utf8 else "text/rfc822-headers"

    lines = "\n".join("<%s>: %s" % (field(r.address), printable(r.reply) if r.reply else action)
                      for r in records)
    until = formatdate(retry_until, localtime=True) if retry_until else "later"
    text = EXPLANATION % {"host": hostname, "what": what % {"until": until},
                          "returned": "It is attached below." if full else
                          "Its header section is attached below.", "lines": lines}
    blocks = status_fields(envelope, action, records, hostname, now, retry_until)
    status = "\r\n\r\n".join("\r\n".join("%s: %s" % (name, field(value))
                                         for name, value in block)
                               for block in blocks) + "\r\n"
    parts = [("text/plain; charset=%s" % ("us-ascii" if text.isascii() else "utf-8"),
              text.replace("\n", "\r\n").encode("utf-8")),
             ("message/global-delivery-status" if utf8 else "message/delivery-status",
              status.encode("utf-8")),
             (original_type, original)]
    boundary = "=_netsmtp_%s" % os.urandom(12).hex()
    while any(boundary.encode() in body for _, body in parts):
        boundary = "=_netsmtp_%s" % os.urandom(12).hex()
    head = [("From", "Mail Delivery System <MAILER-DAEMON@%s>" % hostname),
            ("To", "<%s>" % envelope.sender),
            ("Subject", subject),
            ("Date", formatdate(now, localtime=True)),
            ("Message-ID", make_msgid("report", domain=hostname)),
            ("Auto-Submitted", "auto-replied"),  # RFC 3834 section 5
            ("MIME-Version", "1.0"),
            ("Content-Type", 'multipart/report; report-type=%s; boundary="%s"' % (
                "global-delivery-status" if utf8 else "delivery-status", boundary))]
    out = ["%s: %s\r\n" % (name, field(value)) for name, value in head]
    out.append("\r\nThis is a MIME-encapsulated message.\r\n")
    data = "".join(out).encode("utf-8")
    for content_type, body in parts:
        data += b"\r\n--%s\r\nContent-Type: %s\r\nContent-Transfer-Encoding: %s\r\n\r\n" % (
            boundary.encode(), content_type.encode(), b"7bit" if body.isascii() else b"8bit")
        data += body
    return data + b"\r\n--%s--\r\n" % boundary.encode()


def needs_smtputf8(envelope, records):
    # RFC 6533: a report about non-ASCII addresses carries them as UTF-8.
    return not all(address.isascii() for address in
                   [envelope.sender, *(r.address for r in records),
                    *(dsn.orcpt_field(r.orcpt) for r in records if r.orcpt is not None)])


def spool_report(spool, envelope, action, records, hostname, now=None,
                 full_limit=DEFAULT_FULL_LIMIT, retry_until=None):
    """Spool a report to envelope.sender; returns its queue id.

    The caller makes sure the sender is not <>.
    """
    now = time.time() if now is None else now
    data = build_report(envelope, action, records, hostname, now, full_limit, retry_until)
    params = {"SMTPUTF8": True} if needs_smtputf8(envelope, records) else {}
    report = Envelope(sender="", recipients=[envelope.sender], helo=hostname, protocol="LOCAL",
                      params=params, id=new_queue_id(), arrival=now,
                      dsn={envelope.sender: {"notify": ["NEVER"]}})
    spool.add(report, data)
    return report.id
