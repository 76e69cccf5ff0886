"""Delivery status notification requests (RFC 3461): the MAIL and RCPT parameters.

MAIL may carry RET=FULL|HDRS and ENVID=<xtext>; RCPT may carry NOTIFY
(NEVER, or a list of SUCCESS, FAILURE and DELAY) and ORCPT=<type>;<xtext>.
The checks here are strict, since decoded values end up as header fields
of a report: xtext is "+" and two upper-case hex digits for anything but
printable ASCII (section 4), and nothing may decode to a control character.
Values are kept as the client sent them (the spool stores them verbatim,
a DSN-capable smarthost gets them unchanged) and decoded only for reports.
"""

import re

NOTIFY_WORDS = ("SUCCESS", "FAILURE", "DELAY")
NEVER = "NEVER"
RET_VALUES = ("FULL", "HDRS")
# RFC 3461 section 5.4: the longest values a server must accept.
ENVID_LIMIT = 100
ORCPT_LIMIT = 500

_XTEXT = re.compile(r"(?:[!-*,-<>-~]|\+[0-9A-F]{2})+")
# RFC 6533 section 3: utf-8-addr-unitext and utf-8-addr-xtext, raw UTF-8 or
# \x{HEX} escapes; no "+", "=", space or control character.  Written as a
# complement, as in address.py, so the class compiles fast.
_UTEXT = re.compile(r"(?:[^\x00-\x20+=\\\x7f-\x9f]|\\x\{[0-9A-Fa-f]{1,6}\})+")
_ADDRESS_TYPE = re.compile(r"[A-Za-z0-9][A-Za-z0-9-]*")


class DSNError(ValueError):
    """A DSN parameter that is malformed; the session answers 501 5.5.4."""


def decode_xtext(text):
    """The text an xtext stands for; DSNError if malformed or a control character."""
    if not _XTEXT.fullmatch(text):
        raise DSNError("xtext")
    decoded = re.sub(r"\+([0-9A-F]{2})", lambda m: chr(int(m.group(1), 16)), text)
    if not all(0x20 <= ord(c) < 0x7f for c in decoded):
        raise DSNError("control character")
    return decoded


def encode_xtext(text):
    """text as xtext: "+" HEX for "+", "=" and anything outside printable ASCII."""
    return "".join(c if "!" <= c <= "~" and c not in "+=" else
                   "".join("+%02X" % b for b in c.encode("utf-8")) for c in text)


def decode_utf8_address(text):
    """An RFC 6533 utf-8 address: raw UTF-8 with \\x{HEX} escapes; DSNError if malformed."""
    if not _UTEXT.fullmatch(text):
        raise DSNError("utf-8 address")
    decoded = re.sub(r"\\x\{([0-9A-Fa-f]{1,6})\}", lambda m: _codepoint(m.group(1)), text)
    if any(ord(c) < 0x20 or 0x7f <= ord(c) < 0xa0 for c in decoded):
        raise DSNError("control character")
    return decoded


def _codepoint(hexdigits):
    value = int(hexdigits, 16)
    if value > 0x10FFFF or 0xD800 <= value <= 0xDFFF:
        raise DSNError("code point")
    return chr(value)


def check_ret(value):
    """RET=FULL|HDRS (section 4.3), any case; returns it upper-cased."""
    if not isinstance(value, str) or value.upper() not in RET_VALUES:
        raise DSNError("RET")
    return value.upper()


def check_envid(value):
    """ENVID=xtext (section 4.4), at most ENVID_LIMIT characters; returned verbatim."""
    if not isinstance(value, str) or len(value) > ENVID_LIMIT:
        raise DSNError("ENVID")
    decode_xtext(value)
    return value


def check_notify(value):
    """NOTIFY (section 4.1): ("NEVER",) or some of NOTIFY_WORDS, upper-cased, in order given."""
    if not isinstance(value, str):
        raise DSNError("NOTIFY")
    words = value.upper().split(",")
    if words == [NEVER]:
        return (NEVER,)
    if len(set(words)) != len(words) or not all(w in NOTIFY_WORDS for w in words):
        raise DSNError("NOTIFY")
    return tuple(words)


def check_orcpt(value, utf8=False):
    """ORCPT=addr-type;xtext (section 4.2), or RFC 6533's utf-8 form under SMTPUTF8.

    Returned verbatim (a smarthost must get it identically).
    """
    if not isinstance(value, str) or len(value) > ORCPT_LIMIT:
        raise DSNError("ORCPT")
    kind, sep, address = value.partition(";")
    if not sep or not _ADDRESS_TYPE.fullmatch(kind) or not address:
        raise DSNError("ORCPT")
    if kind.lower() == "utf-8" and utf8:
        decode_utf8_address(address)
    else:
        decode_xtext(address)
    return value


def orcpt_field(value):
    """The Original-Recipient of a report (RFC 3464 section 2.3.1): "type;address", decoded."""
    kind, _, address = value.partition(";")
    if _XTEXT.fullmatch(address):
        try:
            address = decode_xtext(address)
        except DSNError:
            pass  # not from a session (they are checked): the text as it stands
    if kind.lower() == "utf-8":
        try:
            address = decode_utf8_address(address)
        except DSNError:
            pass  # an xtext-decoded "+" or "=": the address as it stands
    return "%s;%s" % (kind, address)


def orcpt_for(address):
    """The ORCPT a relay adds for a recipient that had none (section 5.2.1(c))."""
    if address.isascii():
        return "rfc822;" + encode_xtext(address)
    return "utf-8;" + "".join(c if c.isprintable() and c not in " +=\\" else
                              "\\x{%X}" % ord(c) for c in address)


def wants(notify, word):
    """True when a recipient's NOTIFY (None: not given) asks for word.

    Without NOTIFY, failures and delays are reported and successes are not
    (sections 5.2.5 and 5.2.6).
    """
    if notify is None:
        return word in ("FAILURE", "DELAY")
    return word in notify


def without_success(notify):
    """NOTIFY for the targets of an alias that was reported as expanded (section 5.2.7.3)."""
    if notify is None:
        return None
    rest = tuple(w for w in notify if w != "SUCCESS")
    return rest or (NEVER,)
