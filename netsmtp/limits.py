"""Admission control: refuse a connection before a session is spent on it.

The connection path (netsmtp.connection) asks each gate admit(peer) when a
connection arrives: None lets it in, a reason refuses it with
refusal(options, reason) (421 4.7.0).  Every admitted connection is given
back with release(peer) when its session ends.  Four limits:

  conn_rate_limit          new sessions per client address, N per SECONDS
  conn_rate_total          new sessions in total, N per SECONDS
  max_sessions_per_client  concurrent sessions per client (per_client_cap())
  max_sessions             concurrent sessions in total

SessionTable counts the sessions of a forking or prefork server in memory
its processes share.  SharedLimits keeps counts in files in SPOOL/locks,
for the rates and for --stdin processes that share nothing else; Limits is
the same in one process's memory.  FailureLog counts failed AUTH attempts
per client and user, and AuthInProgress lets a client run one AUTH at once.
"""

import errno
import fcntl
import functools
import ipaddress
import json
import logging
import mmap
import os
import re
import time

from .address import in_networks, ip_of
from .replies import format_reply

log = logging.getLogger(__name__)

GRACE = 0.5  # seconds a connection over max_sessions waits for a session to end
MAX_TRACKED = 100_000  # keys kept at most by KeyedTimes; the oldest go first
LOCK_TIMEOUT = 5.0  # seconds; past it admission and AUTH fail closed


@functools.lru_cache(maxsize=1024)
def client_key(peer):
    """Whom a connection counts against: its IPv4 address, or its IPv6 /64.

    One IPv6 host commonly holds a whole /64; counting by full address would
    let it step around every per-client limit.  Cached: parsing an address
    with ipaddress is most of a connection's admission, and a client
    mostly comes back.
    """
    if not peer:
        return "local"
    address = ip_of(peer)
    if address is None:
        return peer
    if address.version == 4:
        return str(address)
    return str(ipaddress.ip_network((address, 64), strict=False))


def refusal(options, reason):
    """The wire bytes of the 421 that refuses a connection."""
    return format_reply("421 4.7.0", options.hostname, reason)


def refuse_connection(sock, options, reason):
    """Send the 421 on a fresh connection without ever blocking the server.

    Nothing is sent with implicit TLS: the client expects a handshake.
    """
    if options.tls_on_connect:
        return
    try:
        sock.setblocking(False)
        sock.send(refusal(options, reason))
    except OSError:
        pass


def per_client_cap(options):
    """The concurrent sessions one client may hold; 0 when there is no cap.

    Unset, it is half of max_sessions (Postfix's anvil ratio), at least 1;
    under --stdin, unset means off: a superserver has its own per-source
    limit, and a plain inetd session should touch no shared file.
    """
    if options.max_sessions_per_client is not None:
        return options.max_sessions_per_client
    if options.stdin or not options.max_sessions:
        return 0
    return max(1, options.max_sessions // 2)


def exempt(options, peer):
    """True when peer is in the relay networks, which no per-client cap counts."""
    return in_networks(peer, options.relay_networks)


def rates_configured(options):
    return bool(options.conn_rate_limit or options.conn_rate_total)


def stdin_limits_configured(options):
    """Under --stdin the shared limits file is used only when a limit was set."""
    return bool(rates_configured(options) or options.max_sessions_per_client
                or options.given("max_sessions"))


_NONZERO = re.compile(rb"[^\0]")


def _occupied(heads):
    """The indexes of the octets of heads that are not 0."""
    return [match.start() for match in _NONZERO.finditer(heads)]


class SessionTable:
    """The sessions of a forking or prefork server, in memory its processes share.

    The server makes the table before it forks and gives each child or
    worker a slot of its own (use(slot) in the child); the slot holds the
    client key of the session running there.  admit() counts the other
    slots under a lock, so two processes cannot both take the last place;
    the server clears a slot when its process has ended (clear()), so a
    killed session never holds one.  Nothing is written to disk and no
    process id is trusted across a restart.
    """

    KEY_SIZE = 48  # octets of a client key: "ffff:...:ffff::/64" is 24

    def __init__(self, options, slots, grace=0.0):
        self.slots = slots
        self.grace = grace
        self.max_total = options.max_sessions
        self.max_per_client = per_client_cap(options)
        self.options = options
        import tempfile
        self.memory = mmap.mmap(-1, max(1, slots) * self.KEY_SIZE)
        self.lock_file = tempfile.TemporaryFile(prefix="netsmtp-sessions-")
        self.slot = None

    def use(self, slot):
        """In the child or worker: this process's sessions go into slot."""
        self.slot = slot

    def keys(self, skip=None):
        """The client keys of the occupied slots but skip: one pass over the first octets.

        A key never starts with a NUL, so an empty slot is one whose first
        octet is 0; with max_sessions slots and a few sessions, looking at
        the occupied ones alone is what keeps admit() cheap per connection.
        """
        size, data = self.KEY_SIZE, self.memory[:]
        heads = data[::size]
        return [data[i * size:(i + 1) * size].rstrip(b"\0")
                for i in _occupied(heads) if i != skip]

    def admit(self, peer):
        """None when a session from peer may start in this process's slot, else why not.

        Over max_sessions it waits up to grace seconds for a session to end
        first, so a client arriving just as another leaves is not refused.
        """
        deadline = time.monotonic() + self.grace
        while True:
            reason = self.try_admit(peer)
            if reason != "too many sessions" or time.monotonic() >= deadline:
                return reason
            time.sleep(0.02)

    def try_admit(self, peer):
        key = client_key(peer).encode("utf-8", "replace")[:self.KEY_SIZE]
        fcntl.lockf(self.lock_file, fcntl.LOCK_EX)
        try:
            others = self.keys(skip=self.slot)
            reason = None
            if self.max_total and len(others) >= self.max_total:
                reason = "too many sessions"
            elif (self.max_per_client and others.count(key) >= self.max_per_client
                    and not exempt(self.options, peer)):
                reason = "too many sessions from your address"
            if reason is None:
                self.write(self.slot, key)
        finally:
            fcntl.lockf(self.lock_file, fcntl.LOCK_UN)
        if reason is not None:
            log.info("%s: connection refused: %s", key.decode("utf-8", "replace"), reason)
        return reason

    def release(self, peer):
        self.write(self.slot, b"")

    def clear(self, slot):
        """In the server, once the process that used slot has ended."""
        self.write(slot, b"")

    def write(self, slot, key):
        start = slot * self.KEY_SIZE
        self.memory[start:start + self.KEY_SIZE] = key.ljust(self.KEY_SIZE, b"\0")


class Limits:
    """Connection limits counted in this process (see the module docstring)."""

    def __init__(self, options, clock=time.monotonic, sessions=True):
        self.options = options
        self.per_client_rate = options.conn_rate_limit
        self.total_rate = options.conn_rate_total
        # sessions=False: only the rates, when a SessionTable counts sessions.
        self.max_per_client = per_client_cap(options) if sessions else 0
        self.max_total = options.max_sessions if sessions else 0
        self.clock = clock
        self.starts = []      # [time, peer] of admitted sessions, oldest first
        self.sessions = {}    # peer -> concurrent sessions

    def admit(self, peer):
        """None when a session from peer may start now, else the reason it may not."""
        key = client_key(peer)
        now = self.clock()
        self.expire(now)
        reason = self.refusal_reason(key, now, exempt(self.options, peer))
        if reason is None:
            self.starts.append([now, key])
            del self.starts[:-MAX_TRACKED]
            self.sessions[key] = self.sessions.get(key, 0) + 1
        else:
            log.info("%s: connection refused: %s", key, reason)
        return reason

    def release(self, peer):
        """The session of peer that admit() let in has ended."""
        key = client_key(peer)
        count = self.sessions.get(key, 0) - 1
        if count > 0:
            self.sessions[key] = count
        else:
            self.sessions.pop(key, None)

    def expire(self, now):
        longest = max(rate[1] for rate in (self.per_client_rate, self.total_rate, (1, 0)) if rate)
        cut = 0
        while cut < len(self.starts) and self.starts[cut][0] <= now - longest:
            cut += 1
        del self.starts[:cut]

    def refusal_reason(self, key, now, exempt=False):
        if self.max_total and sum(self.sessions.values()) >= self.max_total:
            return "too many sessions"
        if (self.max_per_client and not exempt
                and self.sessions.get(key, 0) >= self.max_per_client):
            return "too many sessions from your address"
        if self.total_rate:
            count, seconds = self.total_rate
            if sum(1 for t, _ in self.starts if t > now - seconds) >= count:
                return "too many new sessions, slow down"
        if self.per_client_rate:
            count, seconds = self.per_client_rate
            if sum(1 for t, p in self.starts if p == key and t > now - seconds) >= count:
                return "too many new sessions from your address, slow down"
        return None


class SharedState:
    """A small JSON document in SPOOL/locks, changed under a filelock.

    valid(doc) says whether a loaded document has the expected shape; one
    that does not parse or is not valid is replaced with fresh() and logged,
    so a corrupt file never stops admission or AUTH.  The new version is
    written to a temporary file created with O_EXCL and O_NOFOLLOW and
    renamed into place.  OSError (a full or read-only disk, a lock busy for
    LOCK_TIMEOUT) reaches the caller, which fails closed.
    """

    def __init__(self, path, fresh=dict, valid=lambda doc: isinstance(doc, dict)):
        self.path = path
        self.fresh = fresh
        self.valid = valid

    def load(self):
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_NOFOLLOW)
        except FileNotFoundError:
            return self.fresh()
        except OSError as exc:
            if exc.errno != errno.ELOOP:
                raise
            log.warning("%s: a symlink, replaced with a fresh file", self.path)
            return self.fresh()
        try:
            with os.fdopen(fd, encoding="utf-8") as f:
                doc = json.load(f)
            if self.valid(doc):
                return doc
        except (ValueError, RecursionError, TypeError, KeyError, AttributeError):
            pass
        log.warning("%s: corrupt, replaced with a fresh one", self.path)
        return self.fresh()

    def save(self, doc):
        tmp = "%s.%d.tmp" % (self.path, os.getpid())
        try:
            os.unlink(tmp)  # left by a killed process of the same id, or planted
        except FileNotFoundError:
            pass
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(doc, f, separators=(",", ":"))
            os.replace(tmp, self.path)
        except BaseException:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise

    def update(self, change):
        """Load the document, call change(doc) -> result, save it; return result."""
        from filelock import FileLock, Timeout
        os.makedirs(os.path.dirname(self.path), mode=0o700, exist_ok=True)
        try:
            with FileLock(self.path + ".lock", timeout=LOCK_TIMEOUT, mode=0o600):
                doc = self.load()
                result = change(doc)
                self.save(doc)
                return result
        except Timeout:
            raise TimeoutError("%s: lock busy for %ss" % (self.path, LOCK_TIMEOUT)) from None


def boot_id():
    """This boot's id (Linux), or "" where the kernel does not say."""
    try:
        with open("/proc/sys/kernel/random/boot_id", encoding="ascii") as f:
            return f.read().strip()
    except OSError:
        return ""


def process_id(pid):
    """pid with its start time ("1234:56789"): a reused pid is another process."""
    try:
        with open("/proc/%d/stat" % pid, "rb") as f:
            # Field 2 (comm) may hold spaces and ")": count after the last ")".
            return "%d:%s" % (pid, f.read().rsplit(b")", 1)[1].split()[19].decode())
    except (OSError, IndexError):
        return "%d:" % pid


def _alive(session):
    """True while the process a process_id() names is running."""
    pid = int(session.partition(":")[0])
    if os.path.isdir("/proc/self"):
        return process_id(pid) == session
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _numbers(values):
    return isinstance(values, list) and all(
        isinstance(v, (int, float)) and not isinstance(v, bool) and v == v for v in values)


class KeyedTimes:
    """Recent event times per key, spread over SHARDS JSON files in SPOOL/locks.

    An update loads and rewrites one shard, so its cost stays bounded however
    many keys are tracked; past MAX_TRACKED keys in all, the keys with the
    fewest events go first, never everyone's.  Times are wall-clock
    seconds, valid across a reboot; times in the future are dropped.
    """

    SHARDS = 64

    def __init__(self, spool_path, name, window):
        self.directory = os.path.join(spool_path, "locks")
        self.name = name
        self.window = window

    def state(self, key):
        import hashlib
        shard = int.from_bytes(hashlib.blake2b(key.encode(), digest_size=4).digest(), "big")
        path = os.path.join(self.directory, "%s.%02d.json" % (self.name, shard % self.SHARDS))
        return SharedState(path, valid=lambda doc: isinstance(doc, dict) and all(
            isinstance(k, str) and _numbers(v) for k, v in doc.items()))

    def update(self, keys, add, now=None):
        """Prune the keys' times, add now to each when add; returns the most recent counts."""
        now = time.time() if now is None else now
        counts = []
        for key in keys:
            def change(doc, key=key):
                times = [t for t in doc.get(key, ()) if now - self.window < t <= now + 1]
                if add:
                    times = (times + [now])[-MAX_EVENTS:]
                if times:
                    doc[key] = times
                else:
                    doc.pop(key, None)
                excess = len(doc) - MAX_TRACKED // self.SHARDS
                if excess > 0:
                    # The keys with the fewest events go first (the oldest of
                    # those): a busy guesser's record outlives a crowd of one-offs.
                    for old in sorted(doc, key=lambda k: (len(doc[k]), doc[k][-1]))[:excess + 1]:
                        if old != key and excess > 0:
                            del doc[old]
                            excess -= 1
                return len(times)
            counts.append(self.state(key).update(change))
        return max(counts, default=0)


MAX_EVENTS = 100  # event times kept per key


class SharedLimits(Limits):
    """Limits shared by processes through files in SPOOL/locks.

    limits.json holds the running sessions (by process_id(), so a reused pid
    never counts) and the starts of the total rate, with the boot id: a file
    from before a reboot is reset, for its processes are gone.  The starts
    per client go to KeyedTimes shards.  One process serves one session at a
    time.
    """

    def __init__(self, options, clock=time.time, sessions=True):
        super().__init__(options, clock, sessions)
        locks = os.path.join(options.spool, "locks")
        self.boot = boot_id()
        self.state = SharedState(os.path.join(locks, "limits.json"), fresh=self.fresh,
                                 valid=self.valid)
        window = self.per_client_rate[1] if self.per_client_rate else 1.0
        self.per_client = KeyedTimes(options.spool, "limits", window)

    def fresh(self):
        return {"boot": self.boot, "sessions": {}, "starts": []}

    def valid(self, doc):
        return (isinstance(doc, dict) and isinstance(doc.get("sessions"), dict)
                and _numbers(doc.get("starts")) and isinstance(doc.get("boot"), str)
                and all(isinstance(v, str) for v in doc["sessions"].values()))

    def admit(self, peer):
        key, now, me = client_key(peer), self.clock(), process_id(os.getpid())

        def change(doc):
            if doc["boot"] != self.boot:
                # Its processes are gone and its clock may have jumped: forget it.
                log.info("%s: from another boot, reset", self.state.path)
                doc.update(self.fresh())
            doc["sessions"] = sessions = {
                s: k for s, k in doc["sessions"].items() if s != me and _alive(s)}
            seconds = self.total_rate[1] if self.total_rate else 0
            doc["starts"] = starts = [t for t in doc["starts"] if now - seconds < t <= now + 1]
            reason = None
            if self.max_total and len(sessions) >= self.max_total:
                reason = "too many sessions"
            elif (self.max_per_client and not exempt(self.options, peer)
                  and list(sessions.values()).count(key) >= self.max_per_client):
                reason = "too many sessions from your address"
            elif self.total_rate and len(starts) >= self.total_rate[0]:
                reason = "too many new sessions, slow down"
            if reason is None:
                sessions[me] = key
                if self.total_rate:
                    starts.append(now)
            return reason
        reason = None
        if self.max_total or self.max_per_client or self.total_rate:
            reason = self.state.update(change)
        if reason is None and self.per_client_rate:
            count = self.per_client.update([key], add=True, now=now)
            if count > self.per_client_rate[0]:
                reason = "too many new sessions from your address, slow down"
                self.release(peer)
        if reason is not None:
            log.info("%s: connection refused: %s", key, reason)
        return reason

    def release(self, peer):
        if self.max_total or self.max_per_client or self.total_rate:
            me = process_id(os.getpid())
            self.state.update(lambda doc: doc["sessions"].pop(me, None))


class FailureLog:
    """Recent failed AUTH attempts per client and per user name, shared in SPOOL/locks.

    A success does not wipe the record: an attacker holding one account must
    not be able to reset the slow-down of its guesses at the others.  Every
    method may raise OSError when the log cannot be written; AUTH then
    fails closed.
    """

    def __init__(self, spool_path, window=3600.0, clock=time.time):
        self.times = KeyedTimes(spool_path, "auth-failures", window)
        self.clock = clock

    @staticmethod
    def keys(peer, user=None):
        keys = ["client " + client_key(peer)]
        if user:
            keys.append("user " + user[:256])
        return keys

    def recent(self, peer, user=None):
        """The failures of the last window for peer or user, whichever has more."""
        return self.times.update(self.keys(peer, user), add=False, now=self.clock())

    def record(self, peer, user=None):
        """Count one failure of peer (and user); returns the recent failures."""
        return self.times.update(self.keys(peer, user), add=True, now=self.clock())


class AuthInProgress:
    """Held while a session runs an AUTH exchange, so one client runs one at a time.

    A POSIX byte-range lock on SPOOL/locks/auth.lock at an offset given by
    the client key: O(1), one file, and freed by the kernel when the process
    ends however it ends.  acquire() is False when another process holds it.
    """

    def __init__(self, spool_path, peer):
        import hashlib
        self.path = os.path.join(spool_path, "locks", "auth.lock")
        digest = hashlib.blake2b(client_key(peer).encode(), digest_size=7).digest()
        self.offset = int.from_bytes(digest, "big")
        self.fd = None

    def acquire(self):
        """True once held; raises OSError when the lock file cannot be opened."""
        os.makedirs(os.path.dirname(self.path), mode=0o700, exist_ok=True)
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
        try:
            fcntl.lockf(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, self.offset)
        except OSError:
            self.release()
            return False
        return True

    def release(self):
        if self.fd is not None:
            os.close(self.fd)  # closing drops the lock
            self.fd = None
