"""The spool directory: entries named by queue id, one journal commit each.

    spool/ID.msg        a commit line, the envelope as one line of JSON, then
                        the raw message exactly as received (Received header
                        first); never changed once committed
    spool/ID.state      delivery state (JSON), written after a first attempt
                        that did not finish the message
    spool/tmp/          state writes in progress; debris of crashes
    spool/locks/ID.lock the claim of a netsmtp-send working on ID
    spool/quarantine/   entries that could not be parsed, kept for a human

Writing an entry (SpoolWriter), as Postfix's cleanup writes a queue file:
ID.msg is created under its final name, its 64-octet first line saying
"incomplete"; the envelope and the message follow; that line is then
overwritten with the length and CRC-32 of the rest (the commit line), and
the file is fsync'd once.  Only then does the session answer 250.

No rename and no directory fsync: on Linux's journaling filesystems the
fsync of a newly created file also makes its name durable.  Creating the
file is a metadata change journalled together with the new inode: ext4's
fsync commits the jbd2 transaction holding the inode's last change, and
jbd2 commits whole transactions, so the directory entry (made in the same
or an earlier one) goes with it; XFS logs the inode and the directory
block in one create transaction and fsync forces the log past it; btrfs's
fsync of a new inode logs its name in the parent (its log tree).  Where
this does not hold (ext2, ext4 without a journal, some network
filesystems), --spool-fsync-directory adds the directory fsync.

A crash before the fsync may leave the name with any prefix of the data,
or with blocks missing, so an entry proves it is complete by its content:
check_entry() (every reader calls it, through Envelope.thaw) raises
Incomplete unless the commit line is there and the file is as long as it
says, and ValueError when a committed entry no longer matches its
checksum.  An incomplete entry is never sent, listed or bounced, even when
the cut happens to leave the message whole: netsmtp-send skips it while
younger than --session-timeout (no session lasts longer, so its writer may
still be at work) and removes it, with a log line, once older.  Entries of
schema version 1 (renamed into place whole, so they have no commit line)
are read as before.
"""

import errno
import logging
import os
import re
import time
import zlib

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
# The commit line: 64 octets, first in every entry of schema version 2 on.
# It is written as INCOMPLETE when the entry is created and overwritten with
# COMMITTED (the octets after it and their CRC-32) just before the fsync.
COMMIT_LINE_SIZE = 64
COMMIT_MAGIC = b"netsmtp entry "
INCOMPLETE = (COMMIT_MAGIC + b"incomplete").ljust(COMMIT_LINE_SIZE - 1) + b"\n"
COMMITTED = COMMIT_MAGIC + b"complete size=%020d crc32=%08x\n"
COMMITTED_LINE = re.compile(re.escape(COMMIT_MAGIC) + rb"complete size=(\d{20}) crc32=([0-9a-f]{8})\n")
assert len(INCOMPLETE) == len(COMMITTED % (0, 0)) == COMMIT_LINE_SIZE
ENTRY_NAME = re.compile(r"([0-9a-f]{24})(\.msg|\.state)\Z")
LOCK_NAME = re.compile(r"([0-9a-f]{24})\.lock\Z")  # others' files in locks/ are left alone


class Busy(Exception):
    """Another process has claimed this entry."""


class Incomplete(Exception):
    """An entry whose writer has not committed it: a write in progress or crash debris.

    Not mail (no 250 was given for it), so it is never sent, listed or
    bounced; mtime is its file's modification time.
    """

    def __init__(self, path, mtime):
        super().__init__("%s: entry not committed" % path)
        self.path, self.mtime = path, mtime

    def age(self, now=None):
        return (time.time() if now is None else now) - self.mtime


def check_entry(f):
    """Prove that the entry open as f is whole; returns where its envelope line starts.

    Reads the whole file to verify the checksum.  Raises Incomplete for an
    entry that was never committed (no commit line, or shorter than it
    says and failing its checksum), ValueError for a committed one that is
    damaged (a whole entry whose size digits changed included).  An entry of
    schema version 1 has no commit line (its envelope starts at once).
    """
    head = f.read(COMMIT_LINE_SIZE)
    prefix = head[:len(COMMIT_MAGIC)]
    if not COMMIT_MAGIC.startswith(prefix) and prefix.strip(b"\0"):
        return 0  # schema version 1, or not an entry at all: the envelope parser says which
    stat = os.fstat(f.fileno())
    match = COMMITTED_LINE.fullmatch(head)
    if match is None:
        if len(head) < COMMIT_LINE_SIZE or head == INCOMPLETE or not head.strip(b"\0"):
            raise Incomplete(f.name, stat.st_mtime)
        raise ValueError("damaged commit line")
    size, crc = int(match.group(1)), int(match.group(2), 16)
    if stat.st_size > COMMIT_LINE_SIZE + size:
        raise ValueError("entry is %d octets longer than its commit line says"
                         % (stat.st_size - COMMIT_LINE_SIZE - size))
    actual = 0
    while True:
        chunk = f.read(WRITE_BUFFER)
        if not chunk:
            break
        actual = zlib.crc32(chunk, actual)
    if stat.st_size < COMMIT_LINE_SIZE + size:
        if actual == crc:
            # Everything the writer wrote is there: the size in the commit
            # line changed, it was not a cut (a cut fails the checksum).
            raise ValueError("damaged commit line: the entry is whole but shorter than it says")
        raise Incomplete(f.name, stat.st_mtime)
    if actual != crc:
        raise ValueError("checksum mismatch: the entry changed after it was committed")
    return COMMIT_LINE_SIZE


def own_folder(path):
    """Make one of a spool's folders (0700); OSError when it is a symlink, which no
    write under the spool may follow (the spool's own path may be one)."""
    os.makedirs(path, mode=0o700, exist_ok=True)
    if os.path.islink(path):
        raise OSError(errno.ELOOP, "%s is a symlink; a spool's folders must be directories"
                      % path)


def misnamed(path):
    """The refusal for a spool directory named like a spool's own folder, or None.

    A spool at BASE/tmp would be taken for BASE's tmp/ and never sent.
    """
    name = os.path.basename(os.path.normpath(os.fspath(path)))
    if name in (TMP, LOCKS, QUARANTINE):
        return "%s: a spool directory may not be named %s (a spool's own folders are)" % (
            path, name)
    return None


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
    """A spool directory: entries at the top, tmp/ for state writes in progress.

    fsync_directory (--spool-fsync-directory) adds a directory fsync to
    each commit, for filesystems where a file's fsync does not make its
    name durable.
    """

    def __init__(self, path, fsync_directory=False):
        self.path = os.fspath(path)
        self.fsync_directory = fsync_directory
        self.tmp = os.path.join(self.path, TMP)
        self.locks = os.path.join(self.path, LOCKS)
        self.quarantine_dir = os.path.join(self.path, QUARANTINE)

    def prepare(self):
        """Create the directories and prove they are writable; OSError if not.

        Called at start-up so an unwritable spool is reported at once, not
        at the first message.
        """
        problem = misnamed(self.path)
        if problem is not None:
            raise OSError(problem)
        os.makedirs(self.path, mode=0o700, exist_ok=True)
        for folder in (self.tmp, self.locks):
            own_folder(folder)
        probe = os.path.join(self.path, ".probe-%d" % os.getpid())
        try:
            os.unlink(probe)
        except FileNotFoundError:
            pass
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        os.close(fd)
        os.unlink(probe)

    def free_space(self):
        """Octets an unprivileged writer may still use on the spool's filesystem.

        A spool not created yet is measured on the filesystem it would be on.
        """
        try:
            stat = os.statvfs(self.path)  # one syscall per MAIL while the spool exists
        except (FileNotFoundError, NotADirectoryError):
            path = os.path.abspath(self.path)
            while not os.path.isdir(path) and os.path.dirname(path) != path:
                path = os.path.dirname(path)
            stat = os.statvfs(path)
        return stat.f_bavail * stat.f_frsize

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
        """Thaw every entry, oldest first: yields (id, envelope or ValueError).

        Entries not committed yet (Incomplete) are not mail: left out.
        """
        if envelope_class is None:
            from .envelope import Envelope as envelope_class
        for queue_id in self.queue_ids():
            try:
                yield queue_id, envelope_class.thaw(self.entry_path(queue_id))
            except (FileNotFoundError, Incomplete):
                continue  # sent while we were listing, or not committed
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

    def overwrite_state(self, queue_id, data):
        """Write data over ID.state in place, within the octets it holds already.

        The fallback when a full disk refuses write_state()'s new file: the
        space a padded state reserved (netsmtp.runner) takes the outcome of
        a delivery, so it is never repeated.  False when data does not fit.
        """
        fd = os.open(self.state_path(queue_id), os.O_WRONLY | os.O_NOFOLLOW)
        try:
            room = os.fstat(fd).st_size
            if len(data) > room:
                return False
            os.pwrite(fd, data.ljust(room), 0)  # JSON allows the trailing spaces
            os.fsync(fd)
            return True
        finally:
            os.close(fd)

    def remove_incomplete(self, queue_id, reason):
        """Remove an entry that was never committed, with a log line (crash debris)."""
        path = self.entry_path(queue_id)
        try:
            os.unlink(path)
        except FileNotFoundError:
            return False
        log.warning("removed %s: %s", path, reason)
        return True

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
        own_folder(self.quarantine_dir)
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

    def is_spool(directory):
        return os.path.isdir(os.path.join(directory, TMP))

    for path in map(os.fspath, paths):
        parent, name = os.path.split(os.path.normpath(path))
        parent = parent or "."
        if os.path.basename(parent) in (TMP, LOCKS, QUARANTINE) and not is_spool(path):
            # Inside a spool's own folder (/tmp/spool itself is a spool) or
            # inside a spool misnamed like one.
            if is_spool(parent) and misnamed(parent) not in problems:
                problems.append(misnamed(parent))
            continue
        match = ENTRY_NAME.match(name)
        if match and not os.path.isdir(path):
            # No existence check: another sender may just have finished it.
            add(spool_at(parent), match.group(1))
        elif os.path.isdir(path):
            if name in (TMP, LOCKS, QUARANTINE):
                if is_spool(path) or not is_spool(parent):
                    problems.append(misnamed(path))
                continue  # a spool's own folder, as `spool/*` names it
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


def write_all(fd, data):
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


class SpoolWriter:
    """One entry being written: write() the message, commit(), then close().

    The entry exists under its final name from the start, marked
    incomplete until commit(); close() throws it away unless commit()
    finished, so a writer closed on any error path leaves nothing behind.
    Writes are gathered up to WRITE_BUFFER octets, so a small message is
    one write(2) at commit, then one fsync.
    """

    def __init__(self, spool, envelope):
        self.spool = spool
        self.envelope = envelope
        self.path = spool.entry_path(envelope.id)
        self.fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                          | os.O_CLOEXEC, 0o600)
        self.pending = [INCOMPLETE]
        self.buffered = 0
        self.written = False  # whether INCOMPLETE is in the file already
        self.size = 0
        self.crc = 0
        self.committed = False
        self.write(envelope.freeze())

    def write(self, data):
        self.crc = zlib.crc32(data, self.crc)
        self.size += len(data)
        self.pending.append(data)
        self.buffered += len(data)
        if self.buffered >= WRITE_BUFFER:
            self.flush()

    def flush(self):
        data = b"".join(self.pending)
        self.pending.clear()
        self.buffered = 0
        write_all(self.fd, data)
        self.written = True

    def commit(self):
        """Mark the entry complete and make it durable: one fsync (see the module docstring)."""
        line = COMMITTED % (self.size, self.crc)
        if self.written:
            self.flush()
            if os.pwrite(self.fd, line, 0) != COMMIT_LINE_SIZE:
                raise OSError("short write of the commit line")
        else:
            self.pending[0] = line
            self.flush()
        os.fsync(self.fd)
        if os.fstat(self.fd).st_nlink == 0:
            # Removed as crash debris by a netsmtp-send with a shorter
            # --session-timeout: this message is not in the spool.
            raise OSError("%s was removed while being written" % self.path)
        if self.spool.fsync_directory:
            fsync_directory(self.spool.path)
        self.committed = True
        os.close(self.fd)

    def close(self):
        """Throw the entry away, also when commit() failed halfway; never raises.

        The client is told 4xx and will send again, so a half-committed entry
        must go too or the message would be delivered twice.
        """
        if self.committed:
            return
        try:
            os.close(self.fd)
        except OSError:
            pass
        try:
            os.unlink(self.path)
        except OSError as exc:
            log.warning("cannot remove %s: %s", self.path, exc)
