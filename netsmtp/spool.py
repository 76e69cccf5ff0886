"""The spool directory: durable, atomic entries named by queue id.

    spool/ID.msg        the envelope as one line of JSON, then the raw message
                        exactly as received (Received header first); never
                        changed once it exists
    spool/ID.state      delivery state (JSON), written after a first attempt
                        that did not finish the message
    spool/tmp/          writes in progress; debris of crashes, never sent
    spool/locks/ID.lock the claim of a netsmtp-send working on ID
    spool/quarantine/   entries that could not be parsed, kept for a human

ID.msg is written under tmp/, fsync'd, renamed into the spool and the
directory fsync'd before the session answers 250 (one file fsync plus one
directory fsync per message), so a crash leaves either a whole entry or
debris in tmp/ that is never sent.
"""

import logging
import os
import re
import time

log = logging.getLogger(__name__)

MESSAGE_SUFFIX = ".msg"
STATE_SUFFIX = ".state"
LOCK_SUFFIX = ".lock"
WRITE_BUFFER = 256 * 1024
# The spool's own folders, skipped quietly when named on a command line.
TMP, LOCKS, QUARANTINE = "tmp", "locks", "quarantine"
# Older debris in tmp/ is from a crash: no session takes an hour, as each
# read times out (RFC 5321 section 4.5.3.2) and the size is capped.
STALE_DEBRIS = 3600.0
ENTRY_NAME = re.compile(r"([0-9a-f]{24})(\.msg|\.state)\Z")
LOCK_NAME = re.compile(r"([0-9a-f]{24})\.lock\Z")  # others' files in locks/ are left alone


class Busy(Exception):
    """Another process has claimed this entry."""


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
        self.tmp = os.path.join(self.path, TMP)
        self.locks = os.path.join(self.path, LOCKS)
        self.quarantine_dir = os.path.join(self.path, QUARANTINE)

    def prepare(self):
        """Create the directories and prove they are writable; OSError if not.

        Called at start-up so an unwritable spool is reported at once, not
        at the first message.
        """
        for folder in (self.tmp, self.locks):
            os.makedirs(folder, mode=0o700, exist_ok=True)
        probe = os.path.join(self.tmp, ".probe-%d" % os.getpid())
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        os.close(fd)
        os.unlink(probe)

    def entry_path(self, queue_id):
        return os.path.join(self.path, queue_id + MESSAGE_SUFFIX)

    def state_path(self, queue_id):
        return os.path.join(self.path, queue_id + STATE_SUFFIX)

    def create(self, envelope):
        """Start writing a new entry for envelope; returns a SpoolWriter."""
        return SpoolWriter(self, envelope)

    def add(self, envelope, message):
        """Spool a whole message (bytes) at once, durably; returns its path."""
        writer = self.create(envelope)
        try:
            writer.write(message)
            writer.commit()
        finally:
            writer.close()
        return writer.path

    def queue_ids(self):
        """The ids of the entries, oldest first (ids sort by arrival)."""
        return sorted(name[:-len(MESSAGE_SUFFIX)] for name in os.listdir(self.path)
                      if name.endswith(MESSAGE_SUFFIX) and ENTRY_NAME.match(name))

    def envelopes(self, envelope_class=None):
        """Thaw every entry, oldest first: yields (id, envelope or ValueError)."""
        if envelope_class is None:
            from .envelope import Envelope as envelope_class
        for queue_id in self.queue_ids():
            try:
                yield queue_id, envelope_class.thaw(self.entry_path(queue_id))
            except FileNotFoundError:
                continue  # sent while we were listing
            except ValueError as exc:
                yield queue_id, exc

    def claim(self, queue_id):
        """Lock an entry for sending: `with spool.claim(id):`; Busy if taken.

        The lock is an flock(2) on locks/ID.lock, so it dies with its
        process: a crashed sender leaves no lock that blocks the next run.
        """
        return Claim(self, queue_id)

    def write_state(self, queue_id, data):
        """Replace ID.state with data (bytes), atomically and durably."""
        tmp_path = os.path.join(self.tmp, queue_id + STATE_SUFFIX)
        fd = os.open(tmp_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
        try:
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(tmp_path, self.state_path(queue_id))
        fsync_directory(self.path)

    def unlink_message(self, queue_id):
        """First half of removing a finished entry: the message goes, not yet durably.

        Several removals may share one directory fsync (finish_removals);
        until then a crash may bring a message back, to be sent again.
        """
        os.unlink(self.entry_path(queue_id))

    def finish_removals(self, queue_ids):
        """Second half of removing entries: fsync the directory, then drop the states.

        A crash in between leaves orphan ID.state files, which clean()
        removes; the other order could bring back a message without the
        record of whom it already reached.
        """
        fsync_directory(self.path)
        for queue_id in queue_ids:
            try:
                os.unlink(self.state_path(queue_id))
            except FileNotFoundError:
                pass

    def quarantine(self, queue_id, reason):
        """Move an entry that cannot be parsed out of the queue; never delete it."""
        os.makedirs(self.quarantine_dir, mode=0o700, exist_ok=True)
        moved = []
        for path in (self.entry_path(queue_id), self.state_path(queue_id)):
            target = os.path.join(self.quarantine_dir, os.path.basename(path))
            try:
                os.rename(path, target)
            except FileNotFoundError:
                continue
            moved.append(target)
        fsync_directory(self.quarantine_dir)
        fsync_directory(self.path)
        log.error("quarantined %s: %s (moved to %s)", queue_id, reason,
                  ", ".join(moved) or "nothing")
        return moved

    def clean(self, max_age=STALE_DEBRIS, now=None):
        """Remove crash debris: old files in tmp/, orphan states and locks.

        Returns the removed paths; each is logged.  Lock files are only
        removed for entries that no longer exist, whose ids are never reused.
        """
        now = time.time() if now is None else now
        removed = []

        def drop(path, why):
            try:
                os.unlink(path)
            except FileNotFoundError:
                return
            log.warning("removed %s: %s", path, why)
            removed.append(path)

        for name in _listdir(self.tmp):
            path = os.path.join(self.tmp, name)
            try:
                age = now - os.lstat(path).st_mtime
            except FileNotFoundError:
                continue
            if age > max_age:
                drop(path, "debris of an interrupted write, %d seconds old" % age)
        names = set(os.listdir(self.path))
        for name in names:
            if name.endswith(STATE_SUFFIX) and ENTRY_NAME.match(name) and \
                    name[:-len(STATE_SUFFIX)] + MESSAGE_SUFFIX not in names:
                drop(os.path.join(self.path, name), "state of an entry that is gone")
        for name in _listdir(self.locks):
            match = LOCK_NAME.match(name)
            if match and not os.path.exists(self.entry_path(match.group(1))):
                drop(os.path.join(self.locks, name), "lock of an entry that is gone")
        return removed


def _listdir(path):
    try:
        return os.listdir(path)
    except FileNotFoundError:
        return []


class Claim:
    """The lock on one entry while it is being sent; see Spool.claim()."""

    def __init__(self, spool, queue_id):
        from filelock import FileLock
        self.path = os.path.join(spool.locks, queue_id + LOCK_SUFFIX)
        self.lock = FileLock(self.path, thread_local=False)

    def acquire(self):
        """Take the claim now or raise Busy; never waits."""
        from filelock import Timeout
        os.makedirs(os.path.dirname(self.path), mode=0o700, exist_ok=True)
        try:
            self.lock.acquire(timeout=0)
        except Timeout:
            raise Busy(self.path) from None
        return self

    def release(self):
        # Unlink while still holding the lock: filelock notices a waiter
        # that locked the unlinked file (st_nlink == 0) and starts over.
        try:
            os.unlink(self.path)
        except OSError:
            pass
        self.lock.release()

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc_info):
        self.release()


def resolve(paths):
    """Map command-line paths to spool entries: ([(Spool, id)], [problems], [Spool]).

    A path may be an entry's ID.msg or ID.state (an entry named twice is
    listed once) or a spool directory (all its entries).  The spool's own
    folders (tmp/, locks/, quarantine/) and anything in them are skipped
    quietly, so `spool/*` just works; any other path is a problem, refused
    without being opened.  The last list holds each spool named once.
    """
    entries, problems, seen, spools = [], [], set(), {}

    def spool_at(directory):
        key = os.path.realpath(directory)
        if key not in spools:
            spools[key] = Spool(directory)
        return spools[key]

    def add(spool, queue_id):
        key = (os.path.realpath(spool.path), queue_id)
        if key not in seen:
            seen.add(key)
            entries.append((spool, queue_id))

    for path in map(os.fspath, paths):
        parent, name = os.path.split(os.path.normpath(path))
        parent = parent or "."
        if os.path.basename(parent) in (TMP, LOCKS, QUARANTINE):
            continue
        match = ENTRY_NAME.match(name)
        if match and not os.path.isdir(path):
            # No existence check: another sender may just have finished it.
            add(spool_at(parent), match.group(1))
        elif os.path.isdir(path):
            if name in (TMP, LOCKS, QUARANTINE) and os.path.isdir(os.path.join(parent, TMP)):
                continue
            if not os.path.isdir(os.path.join(path, TMP)):
                problems.append("%s: not a spool directory (it has no tmp/)" % path)
                continue
            spool = spool_at(path)
            try:
                queue_ids = spool.queue_ids()
            except OSError as exc:
                problems.append("%s: %s" % (path, exc.strerror or exc))
                continue
            for queue_id in queue_ids:
                add(spool, queue_id)
        elif not os.path.lexists(path):
            problems.append("%s: no such file or directory" % path)
        else:
            problems.append("%s: not a spool entry (expected ID%s or ID%s)" % (
                path, MESSAGE_SUFFIX, STATE_SUFFIX))
    entries.sort(key=lambda entry: entry[1])
    return entries, problems, list(spools.values())


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
        self.write(envelope.freeze())

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
