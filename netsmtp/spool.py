"""The spool directory: durable, atomic entries named by queue id.

An entry is one file, ID.msg: the envelope as one line of JSON, then the raw
message exactly as received (Received header first).  It is written under
tmp/, fsync'd, renamed into the spool and the directory fsync'd before the
session answers 250 (one file fsync plus one directory fsync per message),
so a crash leaves either a whole entry or debris in tmp/ that is never sent.
"""

import logging
import os
import time

log = logging.getLogger("netsmtp.spool")

MESSAGE_SUFFIX = ".msg"
WRITE_BUFFER = 256 * 1024


def new_queue_id():
    """A queue id unique without coordination, sortable by arrival, file-name safe.

    14 hex digits of microseconds since the epoch, then 10 random hex digits.
    """
    return "%014x%s" % (time.time_ns() // 1000, os.urandom(5).hex())


def fsync_directory(path):
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Spool:
    """A spool directory: tmp/ for writes in progress, entries at the top."""

    def __init__(self, path):
        self.path = os.fspath(path)
        self.tmp = os.path.join(self.path, "tmp")

    def prepare(self):
        """Create the directories and prove they are writable; OSError if not.

        Called at start-up so an unwritable spool is reported at once, not
        at the first message.
        """
        os.makedirs(self.tmp, mode=0o700, exist_ok=True)
        probe = os.path.join(self.tmp, ".probe-%d" % os.getpid())
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        os.close(fd)
        os.unlink(probe)

    def entry_path(self, queue_id):
        return os.path.join(self.path, queue_id + MESSAGE_SUFFIX)

    def create(self, envelope):
        """Start writing a new entry for envelope; returns a SpoolWriter."""
        return SpoolWriter(self, envelope)


class SpoolWriter:
    """One entry being written: write() the message, commit(), then close().

    close() throws the entry away unless commit() finished, so a writer
    closed on any error path leaves nothing behind.
    """

    def __init__(self, spool, envelope):
        self.spool = spool
        self.envelope = envelope
        self.tmp_path = os.path.join(spool.tmp, envelope.id + MESSAGE_SUFFIX)
        self.path = spool.entry_path(envelope.id)
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
        try:
            fd = os.open(self.tmp_path, flags, 0o600)
        except FileNotFoundError:
            os.makedirs(spool.tmp, mode=0o700, exist_ok=True)
            fd = os.open(self.tmp_path, flags, 0o600)
        self.file = os.fdopen(fd, "wb", buffering=WRITE_BUFFER)
        self.committed = False
        self.header_size = 0
        self.write(envelope.freeze())
        self.header_size = self.file.tell()

    def write(self, data):
        self.file.write(data)

    def commit(self):
        """Make the entry durable and visible: fsync, rename, fsync the directory."""
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()
        os.rename(self.tmp_path, self.path)
        self.tmp_path = self.path  # from here on, close() removes the entry
        fsync_directory(self.spool.path)
        self.committed = True

    def close(self):
        """Throw the entry away, also when commit() failed halfway; never raises.

        The client is told 4xx and will send again, so a half-committed entry
        must go too or the message would be delivered twice.
        """
        if self.committed:
            return
        try:
            self.file.close()
        except OSError:
            pass
        try:
            os.unlink(self.tmp_path)
        except OSError as exc:
            log.warning("cannot remove %s: %s", self.tmp_path, exc)
