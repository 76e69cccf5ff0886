"""The address grammar's character classes, spelt as cheap complements."""

import re

import pytest

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


def test_a_path_is_at_most_256_octets_with_its_brackets():
    """RFC 5321 section 4.5.3.1.3 counts octets, brackets included: 254 octets of
    address pass, 255 do not, and UTF-8 addresses (RFC 6531) count their octets."""
    local, domain = "a" * 64, ".".join(["d" * 60] * 3) + ".test"  # 64 and 187 octets
    assert address.parse_path("<%s@%sxx>" % (local, domain))[0] == "%s@%sxx" % (local, domain)
    with pytest.raises(address.AddressError):
        address.parse_path("<%s@%sxxx>" % (local, domain))
    utf8_domain = ".".join(["\u00e9" * 31] * 4)  # 251 octets in 127 characters
    with pytest.raises(address.AddressError):
        address.parse_path("<%s@%s> SMTPUTF8" % ("\u00e9" * 32, utf8_domain))
