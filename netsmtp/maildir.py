"""Maildir delivery: the "maildir" route, one Maildir per local part."""

import logging
import os

from .delivery import Delivery, Result
from .replies import printable

log = logging.getLogger(__name__)


def unsafe_local_part(local):
    """True for a local part that could name another directory, or none."""
    return not local or local[0] in '."' or "/" in local or "\0" in local


def mailbox_of(options, address, table=None):
    """The Maildir folder (a local part) that takes address, or None.

    Never a mailbox nobody named: one the recipient table names (an entry
    without targets, or a local alias target), postmaster (RFC 5321 section
    4.5.1), or a MAILDIR_ROOT/<localpart>/ directory that already exists.
    With a recipient delimiter, "ann+lists" falls back to "ann".  The
    session asks this at RCPT, so an unknown local part is refused with 550
    before the 250, never bounced after it.
    """
    from .recipients import base_of, split_local
    local, domain = split_local(address)
    local = local.lower()
    if unsafe_local_part(local):
        return None
    if local == "postmaster":
        return local
    candidates = [local]
    base = base_of(local, options.recipient_delimiter)
    if base is not None:
        candidates.append(base)
    if table is not None:
        for name in candidates:
            if "%s@%s" % (name, domain) in table.mailboxes:
                return name
    root = options.maildir_root
    for name in candidates:
        if root is not None and os.path.isdir(os.path.join(root, name)):
            return name
    return None


class MaildirDelivery(Delivery):
    """Delivers to MAILDIR_ROOT/<localpart>/, a Maildir.

    Local parts are lower-cased, and go to the folder mailbox_of() names:
    one the recipient table names (created on first use) or one that
    exists; any other is refused with 550, as the session already did at
    RCPT.  The message gets Return-Path and Delivered-To headers (RFC 5321
    section 4.4) and is fsync'd before the spool entry is let go.
    """

    name = "maildir"
    final = True  # a 250 here is final delivery: a "delivered" report (RFC 3461 section 5.2.3)

    def describe(self):
        return "maildir %s" % self.options.maildir_root

    def deliver(self, envelope, recipients):
        return {r: self.deliver_one(envelope, r) for r in recipients}

    def deliver_one(self, envelope, recipient):
        import mailbox
        root = self.options.maildir_root
        if root is None:
            return Result(451, "4.3.5 no maildir_root configured")
        from .recipients import TableError, current
        try:
            table = current(self.options)
        except TableError as exc:
            return Result(451, "4.3.5 %s" % exc)
        local = mailbox_of(self.options, recipient, table)
        if local is None:
            return Result(550, "5.1.1 no mailbox for <%s>" % printable(recipient))
        path = os.path.join(root, local)
        try:
            # A mailbox named by the table, or a bare directory an operator
            # made for one: either way it gets its tmp/, new/ and cur/.
            for sub in ("tmp", "new", "cur"):
                os.makedirs(os.path.join(path, sub), mode=0o700, exist_ok=True)
            folder = mailbox.Maildir(path, create=False)
            prefix = b"Return-Path: <%s>\r\nDelivered-To: %s\r\n" % (
                envelope.sender.encode(), recipient.encode())
            with envelope.open() as message:
                key = folder.add(_Prefixed(prefix, message))
            # mailbox does not fsync; the spool entry goes once this returns.
            fd = os.open(os.path.join(path, "new", key), os.O_RDONLY | os.O_NOFOLLOW)
            try:
                os.fchmod(fd, 0o600)  # mailbox leaves it 0666 less the umask
                os.fsync(fd)
            finally:
                os.close(fd)
            from .spool import fsync_directory
            fsync_directory(os.path.join(path, "new"))
        except OSError as exc:
            log.error("maildir %s: %s", path, exc)
            return Result(451, "4.3.0 maildir %s: %s" % (local, exc.strerror or exc))
        return Result(250, "2.0.0 delivered to maildir %s as %s" % (local, key))


class _Prefixed:
    """A binary file with some header lines in front, read line by line by mailbox."""

    def __init__(self, prefix, file):
        self.lines = prefix.splitlines(keepends=True)
        self.file = file

    def readline(self, size=-1):
        return self.lines.pop(0) if self.lines else self.file.readline(size)

    def read(self, size=-1):
        head, self.lines = b"".join(self.lines), []
        return head + self.file.read(size)
