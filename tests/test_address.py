"""The address grammar's character classes, spelt as cheap complements."""

import re

from netsmtp import address

EVERY_CHARACTER = "".join(map(chr, range(0x110000)))

# The classes as RFC 5321/5322 and RFC 6531 read: ASCII sets plus U+00A0..U+10FFFF.
AS_THE_RFCS_READ = {
    "_ATEXT": r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~\-\xa0-\U0010ffff]",
    "_LET_DIG": r"[A-Za-z0-9\xa0-\U0010ffff]",
    "_LDH": r"[A-Za-z0-9\-\xa0-\U0010ffff]",
}


def test_classes_match_exactly_what_the_rfc_spelling_matches():
    """Each complement class accepts the same code points as its plain spelling."""
    for name, plain in AS_THE_RFCS_READ.items():
        ours = getattr(address, name)
        assert re.findall(ours, EVERY_CHARACTER) == re.findall(plain, EVERY_CHARACTER), name


def test_quoted_string_and_parameter_values_keep_their_alphabets():
    """qtext (RFC 5321 section 4.1.2) and esmtp-value accept the RFC's code points."""
    qtext = re.compile(r"[\x20\x21\x23-\x5b\x5d-\x7e\xa0-\U0010ffff]")
    value = re.compile(r"[\x21-\x3c\x3e-\x7e\xa0-\U0010ffff]")
    for c in EVERY_CHARACTER:
        assert bool(address.PATH.fullmatch('<"%s"@d.test>' % c)) == bool(qtext.match(c)), hex(ord(c))
        assert bool(address.PARAM.fullmatch("K=" + c)) == bool(value.match(c)), hex(ord(c))
