"""The PROXY protocol parser (netsmtp.proxy): strict, bounded, never a byte too far.

Rows P1..P15 are the wire tests of the research (round2-features.md 4.1);
each header is read off a real socketpair or pipe, and what follows it must
still be there for the session.
"""

import os
import socket
import struct
import threading
import zlib

import pytest
from hypothesis import given, settings, strategies as st

from netsmtp.proxy import (V1_LIMIT, V2_LIMIT, V2_SIGNATURE, ProxyError, crc32c,
                           read_header)

BEHIND = b"EHLO client.test\r\n"


def v2(command=0x21, family=0x11, addresses=None, tlvs=b"", length=None):
    """A v2 header: by default PROXY TCP4 192.0.2.7:40000 -> 127.0.0.1:25 (P7)."""
    if addresses is None:
        addresses = {0x11: socket.inet_aton("192.0.2.7") + socket.inet_aton("127.0.0.1")
                     + struct.pack("!HH", 40000, 25),
                     0x21: socket.inet_pton(socket.AF_INET6, "2001:db8::7")
                     + socket.inet_pton(socket.AF_INET6, "::1")
                     + struct.pack("!HH", 40000, 25)}.get(family, b"")
    body = addresses + tlvs
    size = len(body) if length is None else length
    return V2_SIGNATURE + bytes([command, family]) + struct.pack("!H", size) + body


def tlv(kind, value):
    return bytes([kind]) + struct.pack("!H", len(value)) + value


def with_crc32c(header, corrupt=False):
    """header plus a CRC32C TLV computed over it (section 2.2.5)."""
    grown = header[:14] + struct.pack("!H", struct.unpack("!H", header[14:16])[0] + 7) \
        + header[16:] + tlv(0x03, b"\0\0\0\0")
    crc = crc32c(grown) ^ (1 if corrupt else 0)
    return grown[:-4] + struct.pack("!I", crc)


def over_socket(data, timeout=2.0):
    """read_header on a socketpair holding data; (result or ProxyError, rest)."""
    ours, theirs = socket.socketpair()
    with ours, theirs:
        theirs.sendall(data)
        theirs.shutdown(socket.SHUT_WR)
        try:
            result = read_header(ours, timeout)
        except ProxyError as exc:
            result = exc
        rest = b""
        while chunk := ours.recv(65536):
            rest += chunk
    return result, rest


def over_pipe(data, timeout=2.0):
    """read_header on a pipe holding data, as on fd 0 under --stdin."""
    read_end, write_end = os.pipe()
    try:
        os.write(write_end, data)
        os.close(write_end)
        write_end = None
        try:
            result = read_header(read_end, timeout)
        except ProxyError as exc:
            result = exc
        rest = b""
        while chunk := os.read(read_end, 65536):
            rest += chunk
    finally:
        os.close(read_end)
        if write_end is not None:
            os.close(write_end)
    return result, rest


READERS = [over_socket, over_pipe]


@pytest.mark.parametrize("read", READERS)
def test_v1_tcp4_leaves_the_smtp_behind_it(read):
    """P1, P11: the v1 TCP4 line is parsed and the EHLO in the same write is untouched."""
    header, rest = read(b"PROXY TCP4 192.0.2.7 127.0.0.1 40000 25\r\n" + BEHIND)
    assert (header.version, header.source, header.destination, header.local) == (
        1, ("192.0.2.7", 40000), ("127.0.0.1", 25), False)
    assert rest == BEHIND


@pytest.mark.parametrize("read", READERS)
def test_v1_tcp6(read):
    """P2: a TCP6 line gives the IPv6 source in its canonical form."""
    header, rest = read(b"PROXY TCP6 2001:DB8:0::7 ::1 40000 25\r\n" + BEHIND)
    assert header.source == ("2001:db8::7", 40000) and header.destination == ("::1", 25)
    assert rest == BEHIND


@pytest.mark.parametrize("read", READERS)
def test_v1_longest_line_is_accepted(read):
    """Section 2.1: the longest TCP6 line (104 octets with CRLF) is valid."""
    address = "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff"
    line = ("PROXY TCP6 %s %s 65535 65535\r\n" % (address, address)).encode()
    assert len(line) == 104
    header, rest = read(line + BEHIND)
    assert header.source == (address, 65535) and rest == BEHIND


@pytest.mark.parametrize("read", READERS)
def test_v1_without_crlf_in_107_octets_is_refused_having_read_at_most_107(read):
    """P3: no CRLF in the first 107 octets is invalid, and octet 108 is never read."""
    data = b"PROXY TCP4 " + b"1" * 200 + b"\r\n"
    error, rest = read(data)
    assert isinstance(error, ProxyError)
    assert len(data) - len(rest) <= V1_LIMIT


@pytest.mark.parametrize("line", [
    b"PROXY TCP4 192.0.2.7 127.0.0.1 40000 25\n",          # P4: bare LF
    b"PROXY TCP4 192.0.2.7 127.0.0.1 40000 25\r\r\n",      # a CR before the CRLF
    b"PROXY TCP4 192.0.2.7\r127.0.0.1 40000 25\r\n",        # a bare CR inside
    b"PROXY TCP4 192.000.2.7 127.0.0.1 40000 25\r\n",       # P5: leading zeros
    b"PROXY TCP4 192.0.2.07 127.0.0.1 40000 25\r\n",
    b"PROXY TCP4 192.0.2.7 127.0.0.1 40000 025\r\n",
    b"PROXY TCP4 192.0.2.7 127.0.0.1 040000 25\r\n",
    b"PROXY TCP4 2001:db8::7 ::1 40000 25\r\n",             # P5: family mismatch
    b"PROXY TCP6 192.0.2.7 127.0.0.1 40000 25\r\n",
    b"PROXY TCP4 192.0.2.7 ::1 40000 25\r\n",
    b"PROXY TCP4 256.0.2.7 127.0.0.1 40000 25\r\n",
    b"PROXY TCP4 192.0.2.7 127.0.0.1 65536 25\r\n",
    b"PROXY TCP4 192.0.2.7 127.0.0.1 40000\r\n",
    b"PROXY TCP4  192.0.2.7 127.0.0.1 40000 25\r\n",        # two spaces
    b"PROXY TCP4 192.0.2.7 127.0.0.1 40000 25 \r\n",
    b"PROXY tcp4 192.0.2.7 127.0.0.1 40000 25\r\n",
    b"PROXY TCP6 2001:db8::7%eth0 ::1 40000 25\r\n",        # a scope id
    b"PROXY TCP6 2001:db8:::7 ::1 40000 25\r\n",
    b"PROXY UNKNOWN\r\n",                                     # P6: refused, as Postfix
    b"PROXY UNKNOWN ffff::1 ffff::2 1 2\r\n",
    b"PROXY\r\n",
])
def test_v1_malformed_lines_are_refused(line):
    """P4, P5, P6: bare CR or LF, leading zeros, mismatched family, UNKNOWN: invalid."""
    error, _ = over_socket(line + BEHIND)
    assert isinstance(error, ProxyError), line


@pytest.mark.parametrize("read", READERS)
def test_v2_tcp4(read):
    """P7, P11: the 28-octet v2 TCP4 header of the research, then SMTP intact."""
    data = bytes.fromhex("0d0a0d0a000d0a515549540a 21 11 000c c0000207 7f000001 9c40 0019")
    header, rest = read(data + BEHIND)
    assert (header.version, header.source, header.destination) == (
        2, ("192.0.2.7", 40000), ("127.0.0.1", 25))
    assert rest == BEHIND


@pytest.mark.parametrize("read", READERS)
def test_v2_tcp6(read):
    header, rest = read(v2(family=0x21) + BEHIND)
    assert header.source == ("2001:db8::7", 40000) and rest == BEHIND


@pytest.mark.parametrize("read", READERS)
def test_v2_local_is_valid_and_carries_no_address(read):
    """P8: LOCAL (HAProxy's health checks) is valid; its address block is skipped."""
    header, rest = read(v2(command=0x20, family=0x00) + BEHIND)
    assert header.local and header.source is None and rest == BEHIND
    header, rest = read(v2(command=0x20, family=0x11) + BEHIND)
    assert header.local and rest == BEHIND


@pytest.mark.parametrize("data", [
    v2(command=0x11),                      # version 1 in a v2 header
    v2(command=0x31),                      # version 3
    v2(command=0x22),                      # command 2
    v2(family=0x41, addresses=b"\0" * 12),  # unknown family
    v2(family=0x13, addresses=b"\0" * 12),  # unknown transport
    v2(family=0x00),                       # UNSPEC: as v1 UNKNOWN, refused
    v2(family=0x31, addresses=b"\0" * 216),  # AF_UNIX
    v2(family=0x12),                       # UDP over IPv4
    v2(family=0x11, addresses=b"\0" * 11),  # P9: len below the address size
    v2(family=0x21, addresses=b"\0" * 35),
    v2(tlvs=b"\x04\x00"),                  # a truncated TLV
    v2(tlvs=tlv(0x04, b"") + b"\x04\x00\x09abc"),  # a TLV longer than the header
    v2(tlvs=tlv(0x20, b"\x01\0\0\0")),      # an SSL TLV shorter than its fields
    v2(tlvs=tlv(0x20, b"\x01\0\0\0\0" + b"\x21\x00\x09TLS")),  # its sub-TLV overflows
    v2(tlvs=tlv(0x03, b"\0\0\0")),          # a CRC32C of three octets
    b"\r\n\r\n\x00\r\nQUIT\r" + v2()[12:],  # a damaged signature
])
def test_v2_malformed_headers_are_refused(data):
    """P9: bad version or command, unknown or refused family, short or broken parts."""
    error, _ = over_socket(data + BEHIND)
    assert isinstance(error, ProxyError), data


def test_v2_tlvs_are_skipped():
    """P10: a NOOP TLV and others are skipped; the SMTP after them is intact."""
    header, rest = over_socket(v2(tlvs=tlv(0x04, b"\0\0\0") + tlv(0x05, b"id-1")) + BEHIND)
    assert header.source == ("192.0.2.7", 40000) and rest == BEHIND
    assert header.tlvs == [(0x04, b"\0\0\0"), (0x05, b"id-1")]


def test_crc32c_is_castagnoli_not_zlib():
    """CRC-32C's check value (RFC 3720 B.4); zlib.crc32 gives another."""
    assert crc32c(b"123456789") == 0xE3069283
    assert zlib.crc32(b"123456789") != 0xE3069283
    assert crc32c(b"") == 0


def test_v2_crc32c_is_verified():
    """Section 2.2.5: a right checksum passes, a wrong one is refused."""
    header, rest = over_socket(with_crc32c(v2()) + BEHIND)
    assert header.source == ("192.0.2.7", 40000) and rest == BEHIND
    error, _ = over_socket(with_crc32c(v2(), corrupt=True) + BEHIND)
    assert isinstance(error, ProxyError) and "CRC32C" in str(error)


def test_v2_header_over_the_cap_is_refused_before_its_body_is_read():
    """The documented cap: the length field alone refuses it; the body stays unread."""
    body = b"\0" * (V2_LIMIT - 16 + 1)
    data = v2(addresses=body)
    error, rest = over_socket(data)
    assert isinstance(error, ProxyError) and "limit" in str(error)
    assert rest == body
    header, _ = over_socket(v2(addresses=body[:-1]))
    assert header.source == ("0.0.0.0", 0)


def test_tls_facts_are_read_from_the_ssl_tlv():
    """PP2_TYPE_SSL: version and cipher come out for the log, never as TLS."""
    ssl = tlv(0x20, b"\x01" + b"\0\0\0\0" + tlv(0x21, b"TLSv1.3")
              + tlv(0x23, b"TLS_AES_256_GCM_SHA384"))
    header, _ = over_socket(v2(tlvs=ssl))
    assert header.tls == {"version": "TLSv1.3",
                          "cipher": "TLS_AES_256_GCM_SHA384"}
    assert "TLSv1.3" in header.describe()
    assert over_socket(v2())[0].tls is None


@pytest.mark.parametrize("read", READERS)
def test_smtp_or_tls_instead_of_a_header_is_refused(read):
    """No signature: SMTP, a TLS ClientHello or an empty connection are refused."""
    for data in (BEHIND, b"\x16\x03\x01\x02\x00\x01", b"PROXY", b""):
        error, _ = read(data)
        assert isinstance(error, ProxyError), data


def test_a_wrong_first_octet_is_refused_without_waiting():
    """A client that speaks SMTP at once is told apart at its first octet, not at the timeout."""
    ours, theirs = socket.socketpair()
    with ours, theirs:
        theirs.sendall(b"E")  # and keeps the connection open
        with pytest.raises(ProxyError, match="no PROXY signature"):
            read_header(ours, 60)


def test_no_header_within_the_timeout():
    """P13: nothing, or a part of a header, within the timeout is refused."""
    for data in (b"", b"PROXY TCP4 192.0.2.7", v2()[:20]):
        ours, theirs = socket.socketpair()
        with ours, theirs:
            theirs.sendall(data)
            with pytest.raises(ProxyError, match="within"):
                read_header(ours, 0.2)


@pytest.mark.parametrize("fd", [False, True])
@pytest.mark.parametrize("data", [b"PROXY TCP4 192.0.2.7 127.0.0.1 40000 25\r\n",
                                  with_crc32c(v2(family=0x21))])
def test_fragmented_header_is_fine(data, fd):
    """P15: one octet per write, within the timeout, is read as one header."""
    ours, theirs = socket.socketpair()
    done = threading.Event()

    def trickle():
        for i in range(len(data)):
            theirs.send(data[i:i + 1])
            done.wait(0.005)
        theirs.sendall(BEHIND)
    writer = threading.Thread(target=trickle)
    with ours, theirs:
        writer.start()
        header = read_header(ours.fileno() if fd else ours, 10)
        writer.join()
        assert header.source[1] == 40000
        theirs.shutdown(socket.SHUT_WR)
        rest = b""
        while chunk := ours.recv(65536):
            rest += chunk
        assert rest == BEHIND


def test_socket_timeout_is_restored():
    """The session's own socket timeout is back in place after the header."""
    ours, theirs = socket.socketpair()
    with ours, theirs:
        ours.settimeout(123.0)
        theirs.sendall(v2())
        read_header(ours, 5)
        assert ours.gettimeout() == 123.0


# -- property tests ----------------------------------------------------------

ipv4 = st.ip_addresses(v=4).map(str)
ipv6 = st.ip_addresses(v=6).map(str)
port = st.integers(0, 65535)
v1_headers = st.one_of(
    st.tuples(st.just("TCP4"), ipv4, ipv4, port, port),
    st.tuples(st.just("TCP6"), ipv6, ipv6, port, port),
).map(lambda t: ("PROXY %s %s %s %d %d\r\n" % t).encode())
tlvs = st.lists(st.tuples(st.sampled_from([0x01, 0x02, 0x04, 0x05, 0x30, 0xE0]),
                          st.binary(max_size=40)),
                max_size=5).map(lambda items: b"".join(tlv(k, v) for k, v in items))
v2_headers = st.one_of(
    st.builds(lambda t: v2(tlvs=t), tlvs),
    st.builds(lambda t: v2(family=0x21, tlvs=t), tlvs),
    st.builds(lambda t: with_crc32c(v2(tlvs=t)), tlvs),
    st.builds(lambda a: v2(command=0x20, family=0x00, addresses=a), st.binary(max_size=64)),
)
headers = st.one_of(v1_headers, v2_headers)
trailers = st.binary(max_size=300)


@settings(max_examples=300, deadline=None)
@given(header=headers, trailer=trailers, pipe=st.booleans())
def test_valid_header_is_read_exactly(header, trailer, pipe):
    """Any valid header with any bytes behind it: parsed, and exactly the header consumed."""
    result, rest = (over_pipe if pipe else over_socket)(header + trailer)
    assert not isinstance(result, ProxyError), (header, result)
    assert rest == trailer


def mutate(data, edits):
    data = bytearray(data)
    for position, value, kind in edits:
        if not data:
            break
        at = position % len(data)
        if kind == 0:
            data[at] = value
        elif kind == 1:
            data.insert(at, value)
        else:
            del data[at]
    return bytes(data)


damaged = st.one_of(
    st.builds(mutate, headers, st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255),
                                                  st.integers(0, 2)), min_size=1, max_size=4)),
    st.builds(lambda head, noise: head + noise,
              st.sampled_from([b"PROXY ", b"PROXY TCP4 ", V2_SIGNATURE, V2_SIGNATURE + b"\x21\x11"]),
              st.binary(max_size=200)),
    st.binary(max_size=200),
)


@settings(max_examples=400, deadline=None)
@given(data=damaged, trailer=trailers, pipe=st.booleans())
def test_damaged_input_raises_only_proxyerror_and_reads_a_bounded_prefix(data, trailer, pipe):
    """Anything at all, on a socket or a pipe: a header or a ProxyError, never another
    exception; a header consumes exactly its own length, a failure never more than
    the header limits."""
    stream = data + trailer
    result, rest = (over_pipe if pipe else over_socket)(stream, timeout=0.5)
    consumed = len(stream) - len(rest)
    assert rest == stream[consumed:]
    if isinstance(result, ProxyError):
        assert consumed <= max(V1_LIMIT, V2_LIMIT)
    else:
        again, _ = over_pipe(stream[:consumed])
        assert not isinstance(again, ProxyError)
        assert result.version == again.version and result.source == again.source
