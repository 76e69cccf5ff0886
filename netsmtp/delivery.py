"""Deliveries: where a spooled message goes, one route at a time.

A Delivery takes a thawed envelope and some of its recipients and returns
one Result per recipient, an SMTP reply: 2xx delivered, 4xx try again
later, 5xx failed for good.  The route table (option `routes`) picks a
Delivery by recipient domain; netsmtp.send.SmarthostDelivery forwards with
smtplib, MaildirDelivery below writes to local mailboxes.

Plug in your own delivery by subclassing Delivery and naming it in the
runner's table of deliveries:

    class Archive(Delivery):
        def deliver(self, envelope, recipients):
            with envelope.open() as message:
                ...  # store message somewhere durable
            return {r: Result(250, "2.0.0 archived") for r in recipients}

    class Runner(QueueRunner):
        deliveries = {**QueueRunner.deliveries, "archive": Archive}

    raise SystemExit(netsmtp.cli.send_main(runner_class=Runner))

with `routes = {"archive.example" = "archive", "*" = "smarthost"}` in the
config file.
"""

import logging
import os
from collections import namedtuple

from .address import domain_of
from .envelope import DEFERRED, DELIVERED, FAILED

log = logging.getLogger("netsmtp.delivery")


class Result(namedtuple("Result", "code text")):
    """An SMTP reply for one recipient: code (int) and text (with the enhanced code)."""

    @property
    def status(self):
        if 200 <= self.code < 300:
            return DELIVERED
        return FAILED if 500 <= self.code < 600 else DEFERRED

    def __str__(self):
        return "%d %s" % (self.code, self.text)


class Delivery:
    """One way to deliver.  One instance serves a whole queue run.

    Methods that may be overridden:
        deliver(envelope, recipients)  -> {recipient: Result}; a recipient
                        left out is deferred.  Raise nothing for a per-message
                        problem: return 4xx or 5xx results instead.
        describe()      a few words for --dry-run ("smarthost mx:25")
        close()         called once at the end of the run
    """

    name = "delivery"

    def __init__(self, options):
        self.options = options

    def deliver(self, envelope, recipients):
        raise NotImplementedError

    def describe(self):
        return self.name

    def close(self):
        pass


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


class Routes:
    """The route table: recipient domain -> delivery name, "*" for the rest.

    Without a configured table, the local domains go to "maildir" when a
    maildir_root is set, and everything else to "smarthost".
    """

    def __init__(self, options):
        table = dict(options.routes or {})
        if options.routes is None and options.maildir_root:
            table.update((domain, "maildir") for domain in options.local_domains)
        table.setdefault("*", "smarthost")
        self.table = table
        self.hostname = options.hostname.lower()

    def __call__(self, address):
        domain = domain_of(address) or self.hostname  # <postmaster> is ours
        return self.table.get(domain, self.table["*"])

    def names(self):
        return set(self.table.values())
