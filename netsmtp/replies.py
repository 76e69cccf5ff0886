"""The reply table: every line netsmtp sends comes from REPLIES.

Keys are the reply code and its RFC 3463 enhanced status code ("250 2.1.0");
the 220 greeting and the HELO/EHLO reply carry no enhanced code (RFC 2034
section 3).  Where one code pair has two texts, a word after the codes
tells them apart ("250 2.0.0 chunk"); it never reaches the wire.  Values
are printf-style formats.  Arguments are made printable before formatting,
so nothing a client sends can put CR, LF or other control characters on
the wire.
"""

import functools
import re
from types import MappingProxyType

REPLIES = MappingProxyType({
    "214 2.0.0": "%s",
    "220": "%s ESMTP netsmtp ready",
    "221 2.0.0": "%s closing connection",
    "235 2.7.0": "Authentication successful",
    "250": "%s greets %s",
    "250 2.0.0": "OK",
    "250 2.0.0 chunk": "%d octets received",  # RFC 3030 section 2
    "250 2.1.0": "Sender <%s> OK",
    "250 2.1.5": "Recipient <%s> OK",
    "250 2.6.0": "Message accepted, queued as %s",
    "252 2.1.5": "Cannot VRFY <%s>; send mail to it and delivery will be attempted",
    "334": "%s",
    "354": "End data with <CR><LF>.<CR><LF>",
    "220 2.0.0": "Ready to start TLS",
    "421 4.3.0": "%s service not available, try again later",
    "421 4.3.2": "%s shutting down, closing connection",
    "421 4.4.2": "%s idle for too long, closing connection",
    "421 4.7.0": "%s %s, closing connection",
    "450 4.1.1": "Mailbox <%s> cannot be verified now, try again later",
    "450 4.7.1": "%s",
    "451 4.3.0": "Local error in processing, try again later",
    "452 4.3.1": "Insufficient system storage, try again later",
    "452 4.5.3": "Too many recipients",
    "454 4.7.0": "%s",  # TLS not available, or AUTH cannot be run now (RFC 4954 section 6)
    "500 5.5.0": "Line too long (limit %d octets)",
    "500 5.5.1": "%s is not LMTP; say LHLO (RFC 2033 section 4.1)",
    "500 5.5.2": "Command not recognized",
    "501 5.1.3": "Bad recipient address syntax",
    "501 5.1.7": "Bad sender address syntax",
    "501 5.5.2": "Syntax error: %s",
    "501 5.5.4": "Invalid value for parameter %s",
    "501 5.7.0": "Authentication cancelled",
    "502 5.5.1": "%s not implemented",
    "503 5.5.1": "Bad sequence of commands",
    "504 5.5.4": "Unrecognized authentication mechanism %s",
    "504 5.5.4 bdat": "BDAT 0 needs LAST",
    "530 5.7.0": "Must issue %s first",  # RFC 3207 section 4, RFC 4954 section 6
    "535 5.7.8": "Authentication credentials invalid",
    "538 5.7.11": "Encryption required for requested authentication mechanism",
    "550 5.1.1": "Mailbox <%s> unavailable",
    "550 5.7.1": "Relaying denied for <%s>",
    "552 5.3.4": "Message too big (limit %d octets)",
    "553 5.6.7": "Non-ASCII address <%s> requires SMTPUTF8",
    "554 5.4.6": "Mail loop detected (%d Received headers)",
    "554 5.6.0": "Message refused: %s",
    "554 5.7.1": "Access denied: %s",
    "555 5.5.4": "Unsupported parameter %s",
})

_CONTROLS = {c: "\\x%02x" % c for c in [*range(0x20), *range(0x7f, 0xa0)]}
_CONTROLS[ord("\\")] = "\\\\"
# Beyond C0 and C1: line and paragraph separators (str.splitlines() breaks
# at U+2028 and U+2029) and format controls such as bidi overrides.
INVISIBLE = frozenset({"Cc", "Cf", "Zl", "Zp", "Cs"})


def invisible(char):
    """True for a character no text netsmtp writes may carry as it is."""
    import unicodedata
    return unicodedata.category(char) in INVISIBLE or len(("a%sa" % char).splitlines()) > 1


def printable(value, limit=256):
    """Return value as text safe for a reply, a log line or a header.

    Control characters, line separators and format controls become
    backslash escapes and the text is cut to limit, so a peer can neither
    inject a line nor hide one, nor flood a log.
    """
    if isinstance(value, bytes):
        value = value.decode("utf-8", "backslashreplace")
    text = str(value)
    if not (text.isascii() and text.isprintable() and "\\" not in text):  # else: as it is
        text = text.translate(_CONTROLS)
        if not text.isascii():
            text = "".join(("\\u%04x" % ord(c) if ord(c) <= 0xffff else "\\U%08x" % ord(c))
                           if c > "\x9f" and invisible(c) else c for c in text)
    return text if len(text) <= limit else text[:limit] + "..."


def _argument(value, limit=200):
    """An argument as a reply may carry it: printable ASCII, at most limit octets.

    Replies stay ASCII, since the client may not have asked for SMTPUTF8
    (RFC 6531 section 3.7.4), and short of the 512-octet reply line (RFC
    5321 section 4.5.3.1.5) whatever a client echoes into them.
    """
    text = printable(value, limit)
    if not text.isascii():
        text = text.encode("ascii", "backslashreplace").decode("ascii")
    return text if len(text) <= limit else text[:limit] + "..."


class SMTPError(Exception):
    """A refusal that carries its reply: the key of REPLIES and its arguments."""

    lines = ()      # further lines of a multi-line reply
    replies = None  # the table of its key; None is the session's

    def __init__(self, key, *args):
        super().__init__(key, *args)
        self.key = key
        self.args_ = args

    @property
    def code(self):
        """The three-digit reply code as an int."""
        return int(self.key[:3])

    def __str__(self):
        return format_reply(self.key, *self.args_).decode().rstrip()


# A filter's own reply (RFC 5321 section 4.2, RFC 3463 section 2): a 4xx or
# 5xx code, an enhanced code of the same class, printable ASCII text.
FILTER_REPLY = re.compile(r"([45][0-5][0-9])(?:[ -]([45])\.([0-9]{1,3})\.([0-9]{1,3}))?(?: (.*))?\Z")
FILTER_TEXT_LIMIT = 400  # octets of text, so a reply line stays under 512


class FilterReply(SMTPError):
    """A refusal whose code and text a filter chose (a policy service, a milter).

    It is the one reply not written in REPLIES: Postfix passes a policy
    service's or milter's reply text on, and so does netsmtp, once
    parse_filter_reply() has checked it.  It carries a one-entry table of its
    own, so the session formats it like any other reply.
    """

    def __init__(self, code, enhanced, text, more=()):
        super().__init__("%d %s" % (code, enhanced))
        self.text, self.lines = text, tuple(more)
        self.replies = {self.key: text.replace("%", "%%")}

    def __str__(self):
        return "%s %s" % (self.key, self.text)


def parse_filter_reply(text, default_enhanced=None):
    """A FilterReply from "NNN [X.Y.Z] text" (lines joined by CRLF); ValueError if invalid.

    Without an enhanced code, default_enhanced (e.g. "7.1", the class digit
    is the code's) is used; without one either, the reply is invalid.  A
    multi-line reply must use "NNN-" on every line but the last, one code
    throughout (RFC 5321 section 4.2.1).
    """
    lines = text.split("\r\n") if text else [""]
    parsed = []
    for number, line in enumerate(lines):
        match = FILTER_REPLY.match(line)
        # "NNN-" on every line but the last, which says "NNN ".
        if match is None or (line[3:4] == "-") == (number == len(lines) - 1):
            raise ValueError("not a 4xx or 5xx reply: %r" % printable(line, 80))
        code, klass, subject, detail, words = match.groups()
        if klass is None:
            if default_enhanced is None:
                raise ValueError("no enhanced status code: %r" % printable(line, 80))
            klass, subject, detail = code[0], *default_enhanced.split(".")
        words = words or ""
        if klass != code[0] or (parsed and code != parsed[0][0]):
            raise ValueError("enhanced code class differs from the reply code: %r"
                             % printable(line, 80))
        if not all(" " <= c <= "~" for c in words) or len(words) > FILTER_TEXT_LIMIT:
            raise ValueError("reply text is not short printable ASCII: %r" % printable(line, 80))
        parsed.append((code, "%s.%s.%s" % (klass, int(subject), int(detail)), words))
    code, enhanced, words = parsed[0]
    return FilterReply(int(code), enhanced, words, more=[p[2] for p in parsed[1:]])


def format_reply(key, *args, lines=(), replies=REPLIES):
    """Return the wire bytes of one reply, multi-line when lines are given.

    The first line is replies[key] % args; each of lines follows it (EHLO
    keywords, HELP text).  Every line but the last uses "code-" (RFC 5321
    section 4.2.1).
    """
    prefix, more = _prefixes(key)
    first = replies[key] % tuple(a if isinstance(a, int) else _argument(a) for a in args)
    if not lines:
        return (prefix + first + "\r\n").encode("utf-8")
    texts = [first, *(printable(line) for line in lines)]
    out = [more + text for text in texts[:-1]]
    out.append(prefix + texts[-1])
    return ("\r\n".join(out) + "\r\n").encode("utf-8")


@functools.lru_cache(maxsize=256)
def _prefixes(key):
    """("250 2.1.0 ", "250-2.1.0 ") for the key "250 2.1.0": the last line's and the others'."""
    code, _, enhanced = key.partition(" ")
    enhanced = enhanced.partition(" ")[0]
    if enhanced:
        return code + " " + enhanced + " ", code + "-" + enhanced + " "
    return code + " ", code + "-"
