"""Admission control: refuse a connection before a session is spent on it.

A server asks admit(peer) when a connection arrives: None lets it in, a
reason refuses it, and the server then sends refusal(options, reason) (421
4.7.0) and closes.  Every admitted connection is given back with
release(peer) when its session ends.  Four limits, each off when unset:

  conn_rate_limit          new sessions per client address, N per SECONDS
  conn_rate_total          new sessions in total, N per SECONDS
  max_sessions_per_client  concurrent sessions per client address
  max_sessions             concurrent sessions in total

Limits keeps its counts in memory for a server that sees every connection
in one process (the forking server's parent).  SharedLimits keeps them in a
JSON file under a filelock, for servers whose sessions run in separate
processes that share nothing else (inetd's processes, prefork workers); a
session there is its process id, and the entries of dead processes expire.
FailureLog counts failed AUTH attempts per client in the same way.
"""

import fcntl
import ipaddress
import json
import logging
import mmap
import os
import time

from .address import in_networks, ip_of
from .replies import format_reply

log = logging.getLogger(__name__)

MAX_TRACKED = 100_000  # rate entries kept at most; the oldest go first
LOCK_TIMEOUT = 5.0  # seconds; past it a session is let in rather than hung


def client_key(peer):
    """Whom a connection counts against: its IPv4 address, or its IPv6 /64.

    One IPv6 host commonly holds a whole /64; counting by full address would
    let it step around every per-client limit.
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

    def __init__(self, options, slots):
        self.slots = slots
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

    def keys(self):
        size = self.KEY_SIZE
        return [self.memory[i * size:(i + 1) * size].rstrip(b"\0")
                for i in range(self.slots)]

    def admit(self, peer):
        """None when a session from peer may start in this process's slot, else why not."""
        key = client_key(peer).encode("utf-8", "replace")[:self.KEY_SIZE]
        fcntl.lockf(self.lock_file, fcntl.LOCK_EX)
        try:
            others = [k for i, k in enumerate(self.keys()) if k and i != self.slot]
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
    """A small JSON document in a file, changed under a filelock."""

    def __init__(self, path):
        self.path = path

    def update(self, change):
        """Load the document, call change(doc) -> result, save it; return result."""
        from filelock import FileLock, Timeout
        os.makedirs(os.path.dirname(self.path), mode=0o700, exist_ok=True)
        try:
            with FileLock(self.path + ".lock", timeout=LOCK_TIMEOUT):
                try:
                    with open(self.path, encoding="utf-8") as f:
                        doc = json.load(f)
                except (OSError, ValueError):
                    doc = {}
                result = change(doc)
                tmp = "%s.%d" % (self.path, os.getpid())
                with open(tmp, "w", encoding="utf-8") as f:
                    json.dump(doc, f, separators=(",", ":"))
                os.replace(tmp, self.path)
                return result
        except Timeout:
            log.warning("%s: lock busy for %ss, limits skipped", self.path, LOCK_TIMEOUT)
            return None


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class SharedLimits(Limits):
    """Limits shared by processes through spool/locks/limits.json.

    Each admitted session is recorded as this process's id; admit() drops
    the sessions of processes that have died, so a killed process cannot
    hold a slot for ever.  One process serves one session at a time.
    """

    def __init__(self, options, clock=time.monotonic, sessions=True):
        super().__init__(options, clock, sessions)
        self.state = SharedState(os.path.join(options.spool, "locks", "limits.json"))

    def admit(self, peer):
        def change(doc):
            self.starts = doc.get("starts", [])
            pids = {int(pid): key for pid, key in doc.get("sessions", {}).items()}
            pids = {pid: key for pid, key in pids.items() if _alive(pid)}
            self.sessions = {}
            for key in pids.values():
                self.sessions[key] = self.sessions.get(key, 0) + 1
            reason = Limits.admit(self, peer)
            if reason is None:
                pids[os.getpid()] = client_key(peer)
            doc["starts"] = self.starts
            doc["sessions"] = {str(pid): key for pid, key in pids.items()}
            return reason
        return self.state.update(change)

    def release(self, peer):
        def change(doc):
            doc.get("sessions", {}).pop(str(os.getpid()), None)
        self.state.update(change)


class FailureLog:
    """Recent failed AUTH attempts per client, shared through a file in the spool.

    A success does not wipe the record: an attacker holding one account must
    not be able to reset the slow-down of its guesses at the others.
    """

    def __init__(self, spool_path, window=3600.0, clock=time.time):
        self.state = SharedState(os.path.join(spool_path, "locks", "auth-failures.json"))
        self.window = window
        self.clock = clock

    def record(self, peer):
        """Count one failure of peer; returns its failures within the window."""
        key, now = client_key(peer), self.clock()

        def change(doc):
            for client in list(doc):
                doc[client] = [t for t in doc[client] if t > now - self.window]
                if not doc[client]:
                    del doc[client]
            if len(doc) >= MAX_TRACKED:
                doc.clear()
            doc.setdefault(key, []).append(now)
            del doc[key][:-100]
            return len(doc[key])
        return self.state.update(change) or 1
