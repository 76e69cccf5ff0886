"""Parsing of MAIL FROM / RCPT TO paths and their ESMTP parameters.

RFC 5321 section 4.1.2 gives the grammar: a path in angle brackets, with an
optional source route (tolerated and dropped, section 4.1.1.3 and appendix
C), a local part that is a dot-atom or a quoted string, and a domain or an
address literal.  Non-ASCII characters are allowed by the grammar here
(RFC 6531); the session refuses them unless SMTPUTF8 was given.
"""

import ipaddress
import re

from .replies import invisible

# Each class is ASCII characters plus all of U+00A0..U+10FFFF, written as
# the complement of what it leaves out: a class with a range up to U+10FFFF
# costs sre about 2 ms to compile, and the stdin mode imports this module on
# every connection (bench/README.md).  tests/test_address.py pins them.
_ATEXT = r"""[^\x00-\x20"(),.:;<>@\[\\\]\x7f-\x9f]"""  # RFC 5322 atext, UTF-8
_DOT_ATOM = r"%s+(?:\.%s+)*" % (_ATEXT, _ATEXT)
_QUOTED = r'"(?:[^\x00-\x1f"\\\x7f-\x9f]|\\[\x20-\x7e])*"'
_LET_DIG = r"[^\x00-/:-@\[-`{-\x9f]"  # letters, digits and UTF-8
_LDH = r"[^\x00-,./:-@\[-`{-\x9f]"  # and the hyphen
_LABEL = r"%s(?:%s*%s)?" % (_LET_DIG, _LDH, _LET_DIG)
_DOMAIN = r"%s(?:\.%s)*\.?" % (_LABEL, _LABEL)
_LITERAL = r"\[(?:[0-9.]+|IPv6:[0-9A-Fa-f:.]+|[A-Za-z0-9\-]*[A-Za-z0-9]:[\x21-\x5a\x5e-\x7e]+)\]"
_ROUTE = r"@%s(?:,@%s)*:" % (_DOMAIN, _DOMAIN)

PATH = re.compile(r"<(?:%s)?((%s|%s)@(%s|%s)|(?i:postmaster)|)>(?= |$)" % (
    _ROUTE, _DOT_ATOM, _QUOTED, _DOMAIN, _LITERAL))
_KEYWORD = re.compile(r"[A-Za-z0-9][A-Za-z0-9\-]*")
PARAM = re.compile(r"([A-Za-z0-9][A-Za-z0-9\-]*)(?:=([^\x00-\x20=\x7f-\x9f]+))?")

# RFC 5321 section 4.5.3.1: size limits of the parts of a path, in octets
# (the path's own includes its angle brackets).
LOCAL_PART_LIMIT = 64
DOMAIN_LIMIT = 255
PATH_LIMIT = 256


class AddressError(ValueError):
    """A path or parameter that does not follow the RFC 5321 grammar."""


class ParameterError(AddressError):
    """A parameter that is malformed or given twice; key names it."""

    def __init__(self, key):
        super().__init__("parameter %s" % key)
        self.key = key


def parse_path(text):
    """Split '<path> PARAM=VALUE ...' into (address, {PARAM: value or True}).

    The address comes back without brackets or source route: "" for the
    null path <>, "postmaster" for <postmaster>.
    """
    text = text.lstrip(" ")
    match = PATH.match(text)
    if not match:
        raise AddressError("path")
    address = match.group(1)
    if not address.isascii() and any(invisible(c) for c in address):
        # U+2028 and kin would become line breaks in a bounce's headers.
        raise AddressError("path")
    local, domain = match.group(2), match.group(3)
    if (len(address.encode()) + 2 > PATH_LIMIT
            or local and len(local.encode()) > LOCAL_PART_LIMIT
            or domain and len(domain.encode()) > DOMAIN_LIMIT):
        raise AddressError("path")
    if domain and domain.endswith("."):
        address = address[:-1]
    return address, parse_params(text[match.end():])


def parse_params(text):
    """'SIZE=10 BODY=8BITMIME' -> {'SIZE': '10', 'BODY': '8BITMIME'}."""
    params = {}
    for word in text.split(" "):
        if not word:
            continue
        match = PARAM.fullmatch(word)
        if not match or not word.isascii() and any(invisible(c) for c in word):
            name = word.partition("=")[0]
            raise ParameterError(name.upper() if _KEYWORD.fullmatch(name[:32]) else "(malformed)")
        key = match.group(1).upper()
        if key in params:
            raise ParameterError(key)
        params[key] = match.group(2) if match.group(2) is not None else True
    return params


def domain_of(address):
    """The lower-cased domain of an address; "" for <> and <postmaster>."""
    return address.rpartition("@")[2].lower() if "@" in address else ""


def ip_of(text):
    """The ip_address of a client address as text (IPv4-mapped IPv6 as IPv4), or None."""
    try:
        address = ipaddress.ip_address(text.partition("%")[0])
    except ValueError:
        return None
    if address.version == 6 and address.ipv4_mapped:
        return address.ipv4_mapped
    return address


def in_networks(peer, networks):
    """True when the client peer is in networks.

    peer None is a session with no known client address ("local"); only the
    word "local" among the networks matches it, so an unknown client is never
    trusted by default.
    """
    if peer is None:
        return "local" in networks
    address = ip_of(peer)
    return address is not None and any(
        not isinstance(net, str) and address in net for net in networks)
