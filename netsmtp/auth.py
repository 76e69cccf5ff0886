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
MAX_LOG_N = 20  # refuse lines that would make one check take gigabytes


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
    if not (1 <= log_n <= MAX_LOG_N and 1 <= r <= 32 and 1 <= p <= 16):
        raise ValueError("scrypt cost out of range")
    return log_n, r, p, _unb64(salt), _unb64(digest)


_DUMMY = "$scrypt$ln=%d,r=%d,p=%d$%s$%s" % (
    SCRYPT_LOG_N, SCRYPT_R, SCRYPT_P, _b64(b"\0" * SALT_SIZE), _b64(b"\0" * HASH_SIZE))


def verify_password(password, stored):
    """True when password matches stored; a malformed stored hash never matches."""
    try:
        log_n, r, p, salt, digest = _parse(stored or _DUMMY)
    except (ValueError, KeyError):
        log_n, r, p, salt, digest = _parse(_DUMMY)
        stored = None
    match = hmac.compare_digest(_scrypt(password, salt, log_n, r, p), digest)
    return match and stored is not None


class PasswordFile:
    """The user:hash lines of path, reread when the file changes."""

    def __init__(self, path):
        self.path = path
        self.stamp = None
        self.users = {}

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
        return users

    def check(self, user, password):
        """True when user exists and password is theirs; constant in cost."""
        return verify_password(password, self.lookup(user))


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
