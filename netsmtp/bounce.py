"""Bounces: RFC 3464 delivery status notifications, built with `email`.

A bounce is a multipart/report (RFC 6522) with a human-readable part, a
message/delivery-status part with one field block per failed recipient,
and the original message's header section (text/rfc822-headers).  It is
spooled as a new message from <> (RFC 5321 section 4.5.5), so a bounce
can never itself be bounced.
"""

import email.policy
import time
from email.message import Message
from email.mime.multipart import MIMEMultipart
from email.mime.text import MIMEText
from email.utils import formatdate, make_msgid

from .envelope import Envelope
from .spool import new_queue_id

# The original header section is quoted up to this size (RFC 3462 allows
# headers only; a bound keeps a bounce small whatever the original).
MAX_QUOTED_HEADERS = 64 * 1024

EXPLANATION = """\
This is the mail system at %(host)s.

Your message could not be delivered to one or more recipients.
It is attached below, headers only.

%(failures)s
"""


def status_code(result):
    """The RFC 3463 status of a Result: its enhanced code, or one from its class."""
    word = result.text.split(" ", 1)[0]
    parts = word.split(".")
    if len(parts) == 3 and all(p.isdigit() for p in parts) and word[0] in "245":
        return word
    return "%d.0.0" % (result.code // 100)


def original_headers(envelope):
    """The header section of the spooled message, bounded."""
    lines = []
    size = 0
    with envelope.open() as message:
        for line in iter(lambda: message.readline(MAX_QUOTED_HEADERS), b""):
            if line in (b"\r\n", b"\n") or size + len(line) > MAX_QUOTED_HEADERS:
                break
            lines.append(line)
            size += len(line)
    return b"".join(lines).decode("utf-8", "replace").replace("\r\n", "\n")


def address_type(address):
    # RFC 6533 section 3: utf-8 addresses for SMTPUTF8 mail.
    return "rfc822" if address.isascii() else "utf-8"


def build_dsn(envelope, failures, hostname, now=None):
    """The DSN for envelope's failed recipients as wire bytes (CRLF).

    failures is {recipient: Result}.
    """
    now = time.time() if now is None else now
    report = MIMEMultipart("report", report_type="delivery-status")
    report["From"] = "Mail Delivery System <MAILER-DAEMON@%s>" % hostname
    report["To"] = envelope.sender
    report["Subject"] = "Undelivered Mail Returned to Sender"
    report["Date"] = formatdate(now, localtime=True)
    report["Message-ID"] = make_msgid("bounce", domain=hostname)
    report["Auto-Submitted"] = "auto-replied"  # RFC 3834 section 5

    lines = "\n".join("<%s>: %s" % (r, result) for r, result in failures.items())
    text = EXPLANATION % {"host": hostname, "failures": lines}
    report.attach(MIMEText(text, "plain", "us-ascii" if text.isascii() else "utf-8"))

    status = Message()
    status["Content-Type"] = "message/delivery-status"
    per_message = Message()
    per_message["Reporting-MTA"] = "dns; %s" % hostname
    per_message["X-Netsmtp-Queue-ID"] = envelope.id
    if envelope.arrival:
        per_message["Arrival-Date"] = formatdate(envelope.arrival, localtime=True)
    blocks = [per_message]
    for recipient, result in failures.items():
        block = Message()
        block["Final-Recipient"] = "%s; %s" % (address_type(recipient), recipient)
        block["Action"] = "failed"
        block["Status"] = status_code(result)
        block["Diagnostic-Code"] = "smtp; %s" % (result,)
        block["Last-Attempt-Date"] = formatdate(now, localtime=True)
        blocks.append(block)
    status.set_payload(blocks)
    report.attach(status)

    headers = original_headers(envelope)
    report.attach(MIMEText(headers, "rfc822-headers",
                           "us-ascii" if headers.isascii() else "utf-8"))
    policy = email.policy.SMTPUTF8 if needs_smtputf8(envelope, failures) else email.policy.SMTP
    return report.as_bytes(policy=policy)


def needs_smtputf8(envelope, failures):
    # RFC 6533: a DSN about non-ASCII addresses carries them as UTF-8.
    return not all(address.isascii() for address in [envelope.sender, *failures])


def spool_bounce(spool, envelope, failures, hostname, now=None):
    """Spool a DSN to envelope.sender; returns the bounce's queue id.

    The caller makes sure the sender is not <>.
    """
    now = time.time() if now is None else now
    params = {"SMTPUTF8": True} if needs_smtputf8(envelope, failures) else {}
    bounce = Envelope(sender="", recipients=[envelope.sender], helo=hostname,
                      protocol="LOCAL", params=params, id=new_queue_id(), arrival=now)
    spool.add(bounce, build_dsn(envelope, failures, hostname, now))
    return bounce.id
