"""Maildir delivery: the "maildir" route, one Maildir per local part."""

import logging
import os

from .delivery import Delivery, Result

log = logging.getLogger(__name__)


class MaildirDelivery(Delivery):
    """Delivers to MAILDIR_ROOT/<localpart>/ (a Maildir, created on first use).

    Local parts are lower-cased; one that could name another directory
    (with "/", a leading "." or a NUL) is refused with 550.  The message
    gets Return-Path and Delivered-To headers (RFC 5321 section 4.4) and is
    fsync'd before the spool entry is let go.
    """

    name = "maildir"

    def describe(self):
        return "maildir %s" % self.options.maildir_root

    def deliver(self, envelope, recipients):
        return {r: self.deliver_one(envelope, r) for r in recipients}

    def deliver_one(self, envelope, recipient):
        import mailbox
        root = self.options.maildir_root
        if root is None:
            return Result(451, "4.3.5 no maildir_root configured")
        local = recipient.rpartition("@")[0] if "@" in recipient else recipient
        local = local.lower()
        if not local or local[0] in '."' or "/" in local or "\0" in local:
            return Result(550, "5.1.1 no mailbox for local part %r" % local)
        path = os.path.join(root, local)
        try:
            os.makedirs(root, mode=0o700, exist_ok=True)
            folder = mailbox.Maildir(path, create=True)
            prefix = b"Return-Path: <%s>\r\nDelivered-To: %s\r\n" % (
                envelope.sender.encode(), recipient.encode())
            with envelope.open() as message:
                key = folder.add(_Prefixed(prefix, message))
            # mailbox does not fsync; the spool entry goes once this returns.
            fd = os.open(os.path.join(path, "new", key), os.O_RDONLY)
            try:
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
