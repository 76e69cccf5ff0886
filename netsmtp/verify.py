"""Recipient verification: ask the smarthost at RCPT whether a recipient exists.

For local domains relayed inward (netsmtp as the edge MX in front of an
internal server), accepting a recipient the inner server will refuse makes
a bounce to a sender that may be forged.  Postfix's
reject_unverified_recipient asks the inner server first; so does this:
EHLO, MAIL FROM:<>, RCPT TO:<x>, RSET on one kept connection per process.
A probe never sends DATA, so it never makes a message or a bounce.

Answers are cached in SPOOL/locks/verify/, one small file per address,
shared by every process: a 2xx for verify_positive_ttl, a 5xx for
verify_negative_ttl.  Nothing else is cached (a 4xx, a timeout, garbage), so
only real answers are remembered.  Probes of one address are serialised by
a lock stripe, so a flood of guesses costs the inner server at most one
probe per address and TTL.
"""

import hashlib
import logging
import os
import smtplib
import time

from .limits import SharedState
from .replies import printable
from .smarthost import BoundedSMTP, SmarthostDelivery, SmarthostUnusable

log = logging.getLogger(__name__)

LOCK_STRIPES = 64  # lock files serialising the probes; a bounded number
MAX_CACHED = 100_000  # cache files kept at most; expired ones go first
PRUNE_EVERY = 1000  # cache writes between two prunings

ACCEPT, REFUSE, UNKNOWN = "250", "550 5.1.1", "450 4.1.1"


class ProbeConnection(SmarthostDelivery):
    """The smarthost connection logic (address, TLS, AUTH) on a BoundedSMTP."""

    deadline = None

    def new_smtp(self):
        smtp = BoundedSMTP(local_hostname=self.options.hostname,
                           timeout=self.options.verify_timeout)
        smtp.deadline = self.deadline
        return smtp


def _is_answer(doc):
    """The shape of a cache file (an empty one is a miss)."""
    return isinstance(doc, dict) and (not doc or (
        isinstance(doc.get("address"), str) and type(doc.get("code")) is int
        and isinstance(doc.get("text"), str) and isinstance(doc.get("expires"), (int, float))))


class VerifyCache:
    """Probe answers shared by processes: SPOOL/locks/verify/<hash>.json.

    One file per address, written through netsmtp.limits.SharedState (a
    temporary file made with O_EXCL and O_NOFOLLOW, then renamed), so a
    reader never sees half an answer; the address is stored in the file
    too, and a file that does not hold the address asked about is no answer.
    """

    def __init__(self, spool_path, ttls=(86400, 3600)):
        self.directory = os.path.join(spool_path, "locks", "verify")
        self.ttls = ttls
        self.writes = 0

    def name(self, address):
        return hashlib.sha256(address.lower().encode("utf-8")).hexdigest()[:40]

    def entry(self, address):
        """The cache file of address, read and written like the other files in locks/."""
        return SharedState(os.path.join(self.directory, self.name(address) + ".json"),
                           valid=_is_answer)

    def get(self, address, now=None):
        """(code, text) of a live answer for address, or None."""
        now = time.time() if now is None else now
        try:
            data = self.entry(address).load()
        except OSError:
            return None
        if data and data["address"] == address.lower() and now < data["expires"]:
            return data["code"], data["text"]
        return None

    def put(self, address, code, text, ttl, now=None):
        now = time.time() if now is None else now
        os.makedirs(self.directory, mode=0o700, exist_ok=True)
        self.entry(address).save({"address": address.lower(), "code": code,
                                  "text": text[:200], "expires": now + ttl})
        self.writes += 1
        if self.writes % PRUNE_EVERY == 0:
            self.prune(now)

    def prune(self, now):
        """Drop the answers certainly expired, then the oldest while over MAX_CACHED.

        A file's age tells without reading it: none lives longer than the
        longer of the two TTLs.
        """
        longest = max(self.ttls)
        found = []
        for entry in os.scandir(self.directory):
            if entry.name.endswith(".json"):
                try:
                    found.append((entry.stat().st_mtime, entry.path))
                except OSError:
                    continue
        found.sort()
        excess = len(found) - MAX_CACHED
        for index, (mtime, path) in enumerate(found):
            if index >= excess and mtime + longest >= now:
                break  # sorted by age: the rest are newer still
            try:
                os.unlink(path)
            except OSError:
                pass

    def lock(self, address, timeout):
        from filelock import FileLock
        os.makedirs(self.directory, mode=0o700, exist_ok=True)
        stripe = int(self.name(address)[:8], 16) % LOCK_STRIPES
        return FileLock(os.path.join(self.directory, "probe-%02d.lock" % stripe),
                        timeout=timeout)


class Verifier:
    """Verifies recipients at the smarthost; one per process, its connection kept.

    verify(address) returns (reply, text): ACCEPT ("250"), REFUSE ("550
    5.1.1") or UNKNOWN ("450 4.1.1"), and the server's words.
    """

    def __init__(self, options):
        self.options = options
        self.cache = VerifyCache(options.spool, (options.verify_positive_ttl,
                                                 options.verify_negative_ttl))
        self.connection = ProbeConnection(options)
        self.probes = 0

    def verify(self, address):
        """The answer for address within verify_timeout, the wait for the lock included.

        A flood of RCPTs for one address queues on its lock; each client is
        still answered by its own deadline, not the deadline of the probe
        that held the lock before it plus a whole timeout of its own.
        """
        cached = self.cache.get(address)
        if cached is not None:
            return self.classify(*cached)
        from filelock import Timeout
        deadline = time.monotonic() + self.options.verify_timeout
        try:
            with self.cache.lock(address, self.options.verify_timeout):
                cached = self.cache.get(address)  # another process asked meanwhile
                if cached is not None:
                    return self.classify(*cached)
                code, text = self.probe(address, deadline)
                if 200 <= code < 300 or 500 <= code < 600:
                    ttl = (self.options.verify_positive_ttl if code < 300
                           else self.options.verify_negative_ttl)
                    try:
                        self.cache.put(address, code, text, ttl)
                    except OSError as exc:
                        log.error("verify cache %s: %s", self.cache.directory, exc)
        except Timeout:
            return UNKNOWN, "another probe of this address is under way"
        except OSError as exc:
            log.error("verify cache %s: %s", self.cache.directory, exc)
            return UNKNOWN, "verification cache unusable"
        return self.classify(code, text)

    @staticmethod
    def classify(code, text):
        if 200 <= code < 300:
            return ACCEPT, text
        if 500 <= code < 600:
            return REFUSE, text
        return UNKNOWN, text

    def probe(self, address, deadline=None):
        """(code, text) of the smarthost's RCPT reply by deadline; code 0 when there was none.

        deadline is a time.monotonic() value (default: verify_timeout from
        now).  A kept connection that turns out closed (the server's idle or
        session limits, a 421) is reopened once.
        """
        self.probes += 1
        if deadline is None:
            deadline = time.monotonic() + self.options.verify_timeout
        for attempt in (1, 2):
            self.connection.deadline = deadline
            reused = self.connection.smtp is not None
            try:
                if self.connection.smtp is None:
                    self.connection.smtp = self.connection.connect()
                smtp = self.connection.smtp
                smtp.deadline = deadline
                return self.ask(smtp, address)
            except SmarthostUnusable as exc:
                self.connection.drop()
                log.warning("verify <%s>: %s", printable(address), exc)
                return 0, str(exc.result)
            except Stale:
                self.connection.drop()
                if reused and attempt == 1:
                    continue
                return 0, "smarthost closed the connection"
            except (OSError, smtplib.SMTPException) as exc:
                self.connection.drop()
                if reused and attempt == 1 and not isinstance(exc, TimeoutError):
                    continue
                log.warning("verify <%s>: smarthost %s: %s", printable(address),
                            self.connection.where, printable(exc) or type(exc).__name__)
                return 0, "smarthost %s: %s" % (self.connection.where,
                                                printable(exc) or type(exc).__name__)
        return 0, "no answer"

    def ask(self, smtp, address):
        """MAIL FROM:<>, RCPT TO, RSET on an open connection."""
        smtputf8 = not address.isascii()
        if smtputf8 and not smtp.has_extn("smtputf8"):
            return 0, "smarthost does not support SMTPUTF8"
        smtp.command_encoding = "utf-8" if smtputf8 else "ascii"
        code, text = smtp.docmd("MAIL", "FROM:<>" + (" SMTPUTF8" if smtputf8 else ""))
        if code == 421:
            raise Stale
        if not 200 <= code < 300:
            self.connection.drop()
            return 0, "smarthost refused MAIL FROM:<>: %d %s" % (code, _text(text))
        code, text = smtp.docmd("RCPT", "TO:<%s>" % address)
        if code == 421:
            raise Stale
        if code < 200 or code > 599:
            self.connection.drop()  # garbage: hang up, remember nothing
            return 0, "unexpected reply from the smarthost"
        try:
            if smtp.docmd("RSET")[0] != 250:
                self.connection.drop()
        except (OSError, smtplib.SMTPException):
            self.connection.drop()
        return code, "%d %s" % (code, _text(text))

    def close(self):
        self.connection.close()


class Stale(Exception):
    """The kept connection was closed by the server (421)."""


def _text(value):
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    return printable(" ".join(str(value).split()), 200)


_VERIFIERS = {}


def verifier(options):
    """The Verifier of this process for these options (its connection is kept)."""
    key = id(options)
    found = _VERIFIERS.get(key)
    if found is None or found.options is not options:
        found = _VERIFIERS[key] = Verifier(options)
    return found
