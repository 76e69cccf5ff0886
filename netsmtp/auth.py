"""Passwords for AUTH (RFC 4954): scrypt hashes in a user:hash file.

A hash reads "$scrypt$ln=14,r=8,p=1$SALT$HASH" (base64, PHC string style):
hashlib.scrypt is memory-hard, so a stolen file is slow to attack, and the
cost is written into each line so it can be raised later.  Comparison is
constant-time, and an unknown user costs the same hash as a known one, so
timing tells an attacker nothing.  Passwords never reach a log.
"""

import base64
import hashlib
import hmac
import logging
import os

log = logging.getLogger(__name__)

SCRYPT_LOG_N, SCRYPT_R, SCRYPT_P = 14, 8, 1  # 16 MiB, about 50 ms (RFC 7914)
SALT_SIZE = 16
HASH_SIZE = 32
MAX_LOG_N = 20
MAX_MEMORY = 64 * 1024 * 1024  # octets one check may take (128 r N): more is refused


def _b64(data):
    return base64.b64encode(data).decode("ascii").rstrip("=")


def _unb64(text):
    return base64.b64decode(text + "=" * (-len(text) % 4), validate=True)


def _scrypt(password, salt, log_n, r, p):
    return hashlib.scrypt(password.encode("utf-8"), salt=salt, n=2 ** log_n, r=r, p=p,
                          maxmem=2 ** (log_n + 8) * r, dklen=HASH_SIZE)


def hash_password(password):
    """A new hash of password with a random salt."""
    salt = os.urandom(SALT_SIZE)
    digest = _scrypt(password, salt, SCRYPT_LOG_N, SCRYPT_R, SCRYPT_P)
    return "$scrypt$ln=%d,r=%d,p=%d$%s$%s" % (
        SCRYPT_LOG_N, SCRYPT_R, SCRYPT_P, _b64(salt), _b64(digest))


def _parse(stored):
    """(log_n, r, p, salt, digest) of a stored hash; ValueError if malformed."""
    empty, scheme, params, salt, digest = stored.split("$")
    if empty or scheme != "scrypt":
        raise ValueError("not an scrypt hash")
    values = dict(item.split("=", 1) for item in params.split(","))
    log_n, r, p = int(values["ln"]), int(values["r"]), int(values["p"])
    if not (1 <= log_n <= MAX_LOG_N and 1 <= r <= 32 and 1 <= p <= 16
            and 128 * r * 2 ** log_n <= MAX_MEMORY):
        raise ValueError("scrypt cost out of range")
    return log_n, r, p, _unb64(salt), _unb64(digest)


def dummy_hash(log_n=SCRYPT_LOG_N, r=SCRYPT_R, p=SCRYPT_P):
    """A hash no password matches, at the given cost."""
    return "$scrypt$ln=%d,r=%d,p=%d$%s$%s" % (
        log_n, r, p, _b64(b"\0" * SALT_SIZE), _b64(b"\0" * HASH_SIZE))


_DUMMY = dummy_hash()


def verify_password(password, stored, dummy=_DUMMY):
    """True when password matches stored; a malformed stored hash never matches.

    Without a usable stored hash the dummy is computed instead, so an
    unknown user costs what a known one does.
    """
    try:
        log_n, r, p, salt, digest = _parse(stored or dummy)
    except (ValueError, KeyError):
        log_n, r, p, salt, digest = _parse(dummy)
        stored = None
    match = hmac.compare_digest(_scrypt(password, salt, log_n, r, p), digest)
    return match and stored is not None


class PasswordFile:
    """The user:hash lines of path, reread when the file changes."""

    def __init__(self, path):
        self.path = path
        self.stamp = None
        self.users = {}
        self.dummy = _DUMMY  # at the highest cost in the file: unknown users cost as much

    def lookup(self, user):
        """The stored hash of user, or None (also when the file is unreadable)."""
        try:
            stat = os.stat(self.path)
            stamp = (stat.st_mtime_ns, stat.st_size, stat.st_ino)
            if stamp != self.stamp:
                self.users = self.read()
                self.stamp = stamp
        except OSError as exc:
            log.error("auth file %s: %s", self.path, exc.strerror)
            return None
        return self.users.get(user)

    def read(self):
        users = {}
        with open(self.path, encoding="utf-8") as f:
            for number, line in enumerate(f, 1):
                line = line.strip()
                if not line or line.startswith("#"):
                    continue
                user, sep, stored = line.rpartition(":")
                if not sep or not user:
                    log.warning("auth file %s line %d: not user:hash", self.path, number)
                    continue
                users[user] = stored
        costs = [(SCRYPT_LOG_N, SCRYPT_R, SCRYPT_P)]
        for stored in users.values():
            try:
                costs.append(_parse(stored)[:3])
            except (ValueError, KeyError):
                pass
        self.dummy = dummy_hash(*max(costs, key=lambda c: (2 ** c[0] * c[1] * c[2], c)))
        return users

    def check(self, user, password):
        """True when user exists and password is theirs; constant in cost."""
        return verify_password(password, self.lookup(user), self.dummy)


def warn_if_readable(path, what):
    """Log a warning when a secret file can be read by its group or others."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return False
    if mode & 0o077:
        log.warning("%s %s is readable by group or others (mode %04o); chmod 600 it",
                    what, path, mode & 0o7777)
        return True
    return False


def decode_plain(data):
    """(authzid, authcid, password) of a SASL PLAIN message (RFC 4616 section 2)."""
    parts = data.split(b"\0")
    if len(parts) != 3 or not parts[1]:
        raise ValueError("PLAIN wants authzid NUL authcid NUL password")
    authzid, authcid, password = (part.decode("utf-8") for part in parts)
    return authzid, authcid, password


def decode_base64(text):
    """The octets of a base64 SASL response; "=" is empty (RFC 4954 section 4)."""
    if text == "=":
        return b""
    return base64.b64decode(text.encode("ascii"), validate=True)
