"""netsmtp --sink: accept everything, keep nothing, show each message.

The replacement for the removed smtpd.DebuggingServer (and aiosmtpd's
Debugging handler): every message to any recipient is accepted, relayed
nowhere and not spooled.  Each one is printed to standard output as an
envelope line, the message as received (dot-unstuffed, no trace header
added) and an end marker; with --sink-dir it is written to DIR/ID.eml
instead.  Everything else the server says goes to stderr.
"""

import fcntl
import logging
import os
import shutil
import socket
import sys
import tempfile

from .replies import printable
from .session import Session

log = logging.getLogger(__name__)

BEGIN = "---------- MESSAGE FOLLOWS ----------"
END = "------------ END MESSAGE ------------"
IN_MEMORY = 1 << 20  # a message larger than this waits in a temporary file


def is_loopback(host):
    """True when every address host names is a loopback one ("" is every address)."""
    from .address import ip_of
    try:
        found = {ip_of(info[4][0]) for info in socket.getaddrinfo(host or None, None)}
    except (socket.gaierror, UnicodeError):
        return False
    return bool(host) and all(address is not None and address.is_loopback for address in found)


def parameters(params):
    """MAIL or RCPT parameters as they were given: " SIZE=10 SMTPUTF8"."""
    return "".join(" %s" % key if value is True else " %s=%s" % (key, value)
                   for key, value in params.items())


def envelope_line(envelope):
    """One line naming the client, sender, recipients and their parameters."""
    rcpt_params = getattr(envelope, "rcpt_params", {})
    recipients = " ".join("<%s>%s" % (r, parameters(rcpt_params.get(r, {})))
                          for r in envelope.recipients)
    # aiosmtpd's begin marker, then the envelope, on one line.
    return printable("%s client=%s helo=%s from=<%s>%s to=%s" % (
        BEGIN, envelope.client or "local", envelope.helo,
        envelope.sender, parameters(envelope.params), recipients), limit=4096)


class SinkSession(Session):
    """A session that accepts any recipient: nothing it takes is ever relayed."""

    def check_rcpt_to(self, address, params):
        if not hasattr(self.envelope, "rcpt_params"):
            self.envelope.rcpt_params = {}
        self.envelope.rcpt_params[address] = dict(params)
        return None

    def received_header(self, envelope):
        return b""  # the message is shown exactly as the client sent it


class Sink:
    """Stands where the spool stands: create(envelope) gives a writer.

    directory None prints to stdout (a binary stream); otherwise each
    message becomes directory/ID.eml, written under a temporary name and
    renamed, so a reader never sees half a message.
    """

    def __init__(self, directory=None, stdout=None):
        self.directory = directory
        self.stdout = stdout if stdout is not None else sys.stdout.buffer
        self.path = directory or "(stdout)"

    def prepare(self):
        if self.directory is not None:
            os.makedirs(self.directory, exist_ok=True)

    def create(self, envelope):
        return SinkWriter(self, envelope)


class SinkWriter:
    """One message on its way to stdout or DIR: write(), commit(), close()."""

    def __init__(self, sink, envelope):
        self.sink = sink
        self.envelope = envelope
        self.file = tempfile.SpooledTemporaryFile(IN_MEMORY)
        self.committed = False

    def write(self, data):
        self.file.write(data)

    def commit(self):
        self.file.seek(0)
        if self.sink.directory is None:
            self.print()
        else:
            self.save()
        self.committed = True

    def print(self):
        out = self.sink.stdout
        # Sessions are processes that share stdout: a POSIX lock on it (held
        # per process, unlike flock) keeps two messages from interleaving.
        locked = _lock(out)
        try:
            out.write(envelope_line(self.envelope).encode() + b"\n")
            shutil.copyfileobj(self.file, out)
            out.write(END.encode() + b"\n")
            out.flush()
        finally:
            if locked:
                fcntl.lockf(out.fileno(), fcntl.LOCK_UN)

    def save(self):
        name = os.path.join(self.sink.directory, self.envelope.id + ".eml")
        fd, tmp = tempfile.mkstemp(dir=self.sink.directory, prefix=".", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                shutil.copyfileobj(self.file, f)
            os.rename(tmp, name)
        except BaseException:
            os.unlink(tmp)
            raise
        log.info("%s written to %s", envelope_line(self.envelope), name)

    def close(self):
        self.file.close()


def _lock(stream):
    """Lock stream's file for this process when it can be locked; True if so."""
    try:
        fcntl.lockf(stream.fileno(), fcntl.LOCK_EX)
    except (OSError, ValueError, AttributeError):
        return False  # a pipe or a terminal: writes are small or one process
    return True
