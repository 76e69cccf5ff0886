"""The reply table and the reply formatter."""

import re

import pytest

from netsmtp.replies import REPLIES, SMTPError, format_reply, printable

KEY = re.compile(r"[2-5][0-5][0-9]( [245]\.[0-9]{1,3}\.[0-9]{1,3}( [a-z]+)?)?")


def test_every_key_is_a_code_and_enhanced_code():
    """Keys are "NNN" or "NNN X.Y.Z" whose class digit agrees (RFC 3463 section 2)."""
    for key in REPLIES:
        assert KEY.fullmatch(key), key
        if " " in key:
            assert key[0] == key[4], key


def test_a_word_after_the_codes_names_a_second_text_and_stays_off_the_wire():
    """ "250 2.0.0 chunk" is a key of its own whose reply starts "250 2.0.0 "."""
    assert format_reply("250 2.0.0 chunk", 12) == b"250 2.0.0 12 octets received\r\n"
    assert format_reply("250 2.0.0") == b"250 2.0.0 OK\r\n"


def test_single_line_reply():
    """A reply is the code, the enhanced code, the formatted text and CRLF."""
    assert format_reply("250 2.1.0", "a@b.test") == b"250 2.1.0 Sender <a@b.test> OK\r\n"


def test_multiline_reply_uses_dashes_until_the_last_line():
    """Every line but the last is code-dash (RFC 5321 section 4.2.1)."""
    data = format_reply("250", "mx.test", "c.test", lines=["PIPELINING", "SIZE 10"])
    assert data == b"250-mx.test greets c.test\r\n250-PIPELINING\r\n250 SIZE 10\r\n"
    data = format_reply("214 2.0.0", "x", lines=["a"])
    assert data == b"214-2.0.0 x\r\n214 2.0.0 a\r\n"


@pytest.mark.parametrize("evil", ["a\r\n250 fake", "a\nb", "a\rb", "\x00", "\x1b[31m", "\x9b2J"])
def test_no_control_character_reaches_the_wire(evil):
    """CR, LF and other C0/C1 controls in an argument are escaped, never sent."""
    data = format_reply("555 5.5.4", evil)
    assert data.count(b"\r\n") == 1 and data.endswith(b"\r\n")
    assert not re.search(rb"[\x00-\x1f\x7f]", data[:-2])
    assert not re.search("[\x80-\x9f]", data.decode()[:-2])


def test_echoed_text_keeps_a_reply_short_and_ascii():
    """Even 300 non-ASCII characters echoed make an ASCII reply under 512 octets."""
    data = format_reply("252 2.1.5", "\u00e9\U0001f600" * 150)
    assert data.isascii() and len(data) < 512


def test_printable_bounds_length():
    """A long argument is cut, so a reply or log line stays short."""
    assert len(printable("x" * 10000)) < 300


def test_smtp_error_carries_its_reply():
    """SMTPError knows its code and renders the table's text."""
    error = SMTPError("550 5.7.1", "x@y.test")
    assert error.code == 550
    assert str(error) == "550 5.7.1 Relaying denied for <x@y.test>"


@pytest.mark.parametrize("text, expected", [
    ("plain@example.test", "plain@example.test"),
    ("back\\slash", "back\\\\slash"),
    ("cr\rlf\nnul\0del\x7fc1\x85", "cr\\x0dlf\\x0anul\\x00del\\x7fc1\\x85"),
    ("caf\u00e9", "caf\u00e9"),
])
def test_printable_escapes_exactly_controls_and_backslash(text, expected):
    """The fast path for plain text and the escaping path agree: only controls and \\ change."""
    assert printable(text) == expected


def test_reply_arguments_are_ascii_and_multiline_replies_keep_their_prefixes():
    """A UTF-8 argument is escaped to ASCII; every line but the last says code-."""
    assert format_reply("250 2.1.0", "caf\u00e9@x.test") == b"250 2.1.0 Sender <caf\\xe9@x.test> OK\r\n"
    assert format_reply("250", "mx.test", "c.test", lines=["PIPELINING", "SIZE 10"]) == (
        b"250-" + (REPLIES["250"] % ("mx.test", "c.test")).encode() + b"\r\n"
        b"250-PIPELINING\r\n250 SIZE 10\r\n")
