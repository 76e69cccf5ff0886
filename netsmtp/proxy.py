"""The PROXY protocol, v1 and v2 (HAProxy's doc/proxy-protocol.txt), read strictly.

A load balancer in front of netsmtp (HAProxy, an AWS NLB, a Kubernetes
ingress) sends one header before the client's first byte, saying who the
client is.  read_header() takes exactly that header off a socket or a file
descriptor and not one byte more, so the SMTP or TLS bytes behind it (P11
and P12 in the research) reach the session intact, in every server mode.

Strict, as the specification asks and as Postfix reads it:
- a v1 line is at most 107 octets with its CRLF, ends in CRLF and nowhere
  else, has no leading zeros and a family (TCP4/TCP6) that matches both
  addresses (section 2.1);
- a v2 header is at most V2_LIMIT octets, its address block fits its
  length, its TLVs fit the rest exactly, and a CRC32C TLV is verified with
  the Castagnoli polynomial (section 2.2.1);
- v1 UNKNOWN, v2 UNSPEC and AF_UNIX, and UDP are refused: they leave the
  proxy as the client and would sidestep address-based access control.
  v2 LOCAL (HAProxy's health checks) is valid and carries no addresses.
Anything else raises ProxyError, whose text is for the log.
"""

import ipaddress
import os
import re
import select
import socket
import struct
import time

V1_PREFIX = b"PROXY "
V1_LIMIT = 107  # octets, CRLF included (section 2.1)
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
V2_FIXED = 16   # signature, version and command, family, length
# Section 2.2 allows 16 + 65535 octets; HAProxy's largest header (SSL,
# certificate, unique-id and authority TLVs) stays far below this cap.
V2_LIMIT = 4096

# Version 2 commands (low nibble of octet 13) and families (octet 14).
V2_LOCAL, V2_PROXY = 0x0, 0x1
V2_TCP4, V2_TCP6 = 0x11, 0x21
V2_REFUSED_FAMILIES = {
    0x00: "UNSPEC (as v1 UNKNOWN) would leave the proxy as the client",
    0x12: "UDP over IPv4 is not SMTP",
    0x22: "UDP over IPv6 is not SMTP",
    0x31: "AF_UNIX would leave the proxy as the client",
    0x32: "AF_UNIX would leave the proxy as the client",
}

# TLV types (section 2.2.7); only these are decoded, and only for logs.
TLV_AUTHORITY, TLV_CRC32C, TLV_UNIQUE_ID, TLV_SSL = 0x02, 0x03, 0x05, 0x20
SSL_SUBTYPES = {0x21: "version", 0x22: "cn", 0x23: "cipher", 0x24: "sig_alg", 0x25: "key_alg"}
SSL_CLIENT_SSL = 0x01  # bit of the PP2_TYPE_SSL client field: TLS was used

_PORT = rb"(0|[1-9][0-9]{0,4})"
_OCTET = rb"(?:25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])"
_IPV4 = rb"%s(?:\.%s){3}" % (_OCTET, _OCTET)
# inet_pton's form, as HAProxy writes it; the address is checked again below.
_IPV6 = rb"[0-9A-Fa-f:.]{2,45}"
V1_LINE = re.compile(
    rb"PROXY (?:TCP4 (%s) (%s)|TCP6 (%s) (%s)) %s %s\r\n\Z" % (
        _IPV4, _IPV4, _IPV6, _IPV6, _PORT, _PORT))


class ProxyError(Exception):
    """No complete, valid PROXY header; the text says why, for the log."""


class ProxyHeader:
    """What a valid header said.

    version      1 or 2
    local        True for a v2 LOCAL header (a health check): no addresses,
                 the connection's own endpoints stand
    source       (address, port) of the client, or None when local
    destination  (address, port) the client connected to, or None
    tlvs         [(type, value bytes)] of a v2 header, in order
    via          the address the header came from (the proxy), set by the
                 connection that read it; None for a local one
    """

    def __init__(self, version, source=None, destination=None, tlvs=(), local=False):
        self.via = None
        self.version = version
        self.source = source
        self.destination = destination
        self.tlvs = list(tlvs)
        self.local = local

    @property
    def tls(self):
        """The TLS facts of a PP2_TYPE_SSL TLV as a dict, or None.

        Only for logs: the proxy says it, nothing proves it, so they never
        count as TLS for --require-tls or AUTH.
        """
        for kind, value in self.tlvs:
            if kind == TLV_SSL and value[0] & SSL_CLIENT_SSL:
                facts = {}
                for _, subtype, sub in _split_tlvs(value, 5):
                    if subtype in SSL_SUBTYPES:
                        facts[SSL_SUBTYPES[subtype]] = sub.decode("ascii", "replace")
                return facts
        return None

    def describe(self):
        """A few words for the log; the caller escapes them."""
        if self.local:
            return "PROXY v2 LOCAL"
        text = "PROXY v%d %s:%d -> %s:%d" % (self.version, *self.source, *self.destination)
        tls = self.tls
        if tls:
            text += " (TLS at the proxy: %s %s)" % (tls.get("version", "?"),
                                                    tls.get("cipher", "?"))
        return text

    def __repr__(self):
        return "<ProxyHeader %s>" % self.describe()


def read_header(conn, timeout):
    """Read one PROXY header from conn and return a ProxyHeader.

    conn is a connected socket (read with MSG_PEEK, then exactly the
    header's length) or a file descriptor such as a pipe on fd 0 (read
    with exact-length reads, the v1 line one octet at a time).  The whole
    header must arrive within timeout seconds, in as many pieces as it
    likes.  Raises ProxyError for anything but a valid header: a bad
    header, a timeout, end of file or a connection error.
    """
    deadline = time.monotonic() + timeout
    source = SocketSource(conn, deadline) if isinstance(conn, socket.socket) \
        else FdSource(conn, deadline)
    try:
        return _read(source)
    except TimeoutError:
        raise ProxyError("no complete PROXY header within %gs" % timeout) from None
    except OSError as exc:
        raise ProxyError("connection error before the PROXY header ended: %s"
                         % (exc.strerror or exc)) from None
    finally:
        source.close()


def _read(source):
    start = bytearray()
    # Octet by octet for as long as the signatures allow: a client that
    # speaks SMTP or TLS at once is told apart at its first octet.
    while len(start) < len(V1_PREFIX):
        start += source.read_some(len(V1_PREFIX) - len(start))
        if not (V1_PREFIX.startswith(start) or V2_SIGNATURE.startswith(start)):
            raise ProxyError("no PROXY signature")
    if start == V1_PREFIX:
        return parse_v1(bytes(start) + source.read_line(V1_LIMIT - len(start)))
    head = bytes(start) + source.read_exact(V2_FIXED - len(start))
    if not head.startswith(V2_SIGNATURE):
        raise ProxyError("no PROXY signature")
    _check_v2_version(head[12])
    length = struct.unpack("!H", head[14:16])[0]
    if V2_FIXED + length > V2_LIMIT:
        raise ProxyError("PROXY v2 header of %d octets is over the limit of %d"
                         % (V2_FIXED + length, V2_LIMIT))
    return parse_v2(head + source.read_exact(length))


def parse_v1(line):
    """Parse one complete v1 line (CRLF included) into a ProxyHeader."""
    if len(line) > V1_LIMIT:
        raise ProxyError("PROXY v1 line over %d octets" % V1_LIMIT)
    if not line.endswith(b"\r\n") or line.count(b"\r") != 1 or line.count(b"\n") != 1:
        raise ProxyError("PROXY v1 line not ended by CRLF alone")
    if line.startswith(b"PROXY UNKNOWN"):
        raise ProxyError("PROXY UNKNOWN refused: it would leave the proxy as the client")
    match = V1_LINE.match(line)
    if not match:
        raise ProxyError("malformed PROXY v1 line")
    v4_src, v4_dst, v6_src, v6_dst, sport, dport = match.groups()
    if v4_src is not None:
        src, dst = v4_src.decode(), v4_dst.decode()
    else:
        src, dst = _ipv6(v6_src), _ipv6(v6_dst)
    sport, dport = int(sport), int(dport)
    if sport > 65535 or dport > 65535:
        raise ProxyError("PROXY v1 port out of range")
    return ProxyHeader(1, (src, sport), (dst, dport))


def _ipv6(text):
    try:
        return str(ipaddress.IPv6Address(text.decode("ascii")))
    except ValueError:
        raise ProxyError("PROXY v1 TCP6 address is not IPv6") from None


def _check_v2_version(ver_cmd):
    if ver_cmd >> 4 != 2:
        raise ProxyError("PROXY v2 version %d is not 2" % (ver_cmd >> 4))
    if ver_cmd & 0xF not in (V2_LOCAL, V2_PROXY):
        raise ProxyError("PROXY v2 command %d is neither LOCAL nor PROXY" % (ver_cmd & 0xF))


def parse_v2(data):
    """Parse one complete v2 header (signature included) into a ProxyHeader."""
    if len(data) < V2_FIXED or not data.startswith(V2_SIGNATURE):
        raise ProxyError("no PROXY v2 signature")
    _check_v2_version(data[12])
    family = data[13]
    length = struct.unpack("!H", data[14:16])[0]
    if len(data) != V2_FIXED + length:
        raise ProxyError("PROXY v2 length does not match the header")
    if data[12] & 0xF == V2_LOCAL:
        # Section 2.2: the receiver ignores the address block of LOCAL.
        return ProxyHeader(2, local=True)
    body = data[V2_FIXED:]
    if family == V2_TCP4:
        size, unpack, af = 12, "!4s4sHH", socket.AF_INET
    elif family == V2_TCP6:
        size, unpack, af = 36, "!16s16sHH", socket.AF_INET6
    elif family in V2_REFUSED_FAMILIES:
        raise ProxyError("PROXY v2 family 0x%02x refused: %s"
                         % (family, V2_REFUSED_FAMILIES[family]))
    else:
        raise ProxyError("PROXY v2 family 0x%02x unknown" % family)
    if length < size:
        raise ProxyError("PROXY v2 length %d is short of the %d-octet addresses"
                         % (length, size))
    src, dst, sport, dport = struct.unpack(unpack, body[:size])
    tlvs, checksums = [], []
    for offset, kind, value in _split_tlvs(data, V2_FIXED + size):
        if kind == TLV_SSL:
            if len(value) < 5:
                raise ProxyError("PROXY v2 SSL TLV too short")
            for _ in _split_tlvs(value, 5):
                pass  # the sub-TLVs must fit too
        elif kind == TLV_CRC32C:
            checksums.append((offset, value))
        tlvs.append((kind, value))
    if checksums:
        _check_crc32c(data, checksums)
    return ProxyHeader(2, (socket.inet_ntop(af, src), sport),
                       (socket.inet_ntop(af, dst), dport), tlvs)


def _split_tlvs(data, offset):
    """Yield (offset of the value, type, value) of the TLVs from offset to the end.

    They must fill data exactly (section 2.2.7), or the header is invalid.
    """
    while offset < len(data):
        if len(data) - offset < 3:
            raise ProxyError("PROXY v2 TLV truncated")
        kind, size = data[offset], struct.unpack("!H", data[offset + 1:offset + 3])[0]
        value = data[offset + 3:offset + 3 + size]
        if len(value) != size:
            raise ProxyError("PROXY v2 TLV 0x%02x longer than the header" % kind)
        yield offset + 3, kind, bytes(value)
        offset += 3 + size


def _check_crc32c(data, checksums):
    """Section 2.2.5: the CRC32C TLV covers the whole header, its own value zeroed."""
    if len(checksums) > 1 or len(checksums[0][1]) != 4:
        raise ProxyError("PROXY v2 CRC32C TLV malformed")
    at, value = checksums[0]
    zeroed = data[:at] + b"\0\0\0\0" + data[at + 4:]
    if struct.unpack("!I", value)[0] != crc32c(zeroed):
        raise ProxyError("PROXY v2 CRC32C checksum mismatch")


_CRC32C_TABLE = []


def crc32c(data):
    """CRC-32C (Castagnoli, reflected polynomial 0x82F63B78), as RFC 3720 defines it.

    Not zlib.crc32, whose polynomial is another one (0xEDB88320).
    """
    table = _CRC32C_TABLE
    if not table:
        for n in range(256):
            for _ in range(8):
                n = (n >> 1) ^ 0x82F63B78 if n & 1 else n >> 1
            table.append(n)
    crc = 0xFFFFFFFF
    for octet in data:
        crc = table[(crc ^ octet) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


class SocketSource:
    """Reads from a socket within a deadline; peeks so a line is read to its end only."""

    def __init__(self, sock, deadline):
        self.sock = sock
        self.deadline = deadline
        self.saved_timeout = sock.gettimeout()

    def recv(self, size, flags=0):
        remaining = self.deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError
        self.sock.settimeout(remaining)
        data = self.sock.recv(size, flags)
        if not data:
            raise ProxyError("connection closed before the PROXY header ended")
        return data

    def read_some(self, size):
        return self.recv(size)

    def read_exact(self, size):
        data = bytearray()
        while len(data) < size:
            data += self.recv(size - len(data))
        return bytes(data)

    def read_line(self, limit):
        """Octets up to and including the first LF, at most limit of them."""
        line = bytearray()
        while len(line) < limit:
            peeked = self.recv(limit - len(line), socket.MSG_PEEK)
            end = peeked.find(b"\n")
            line += self.read_exact(end + 1 if end >= 0 else len(peeked))
            if end >= 0:
                return bytes(line)
        raise ProxyError("no LF in the first %d octets of a PROXY v1 line" % V1_LIMIT)

    def close(self):
        try:
            self.sock.settimeout(self.saved_timeout)
        except OSError:
            pass


class FdSource:
    """Reads from a file descriptor (a pipe has no MSG_PEEK) within a deadline."""

    def __init__(self, fd, deadline):
        self.fd = fd
        self.deadline = deadline

    def read_some(self, size):
        remaining = self.deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError
        ready, _, _ = select.select([self.fd], [], [], remaining)
        if not ready:
            raise TimeoutError
        data = os.read(self.fd, size)
        if not data:
            raise ProxyError("connection closed before the PROXY header ended")
        return data

    def read_exact(self, size):
        data = bytearray()
        while len(data) < size:
            data += self.read_some(size - len(data))
        return bytes(data)

    def read_line(self, limit):
        line = bytearray()
        while len(line) < limit:
            line += self.read_some(1)
            if line.endswith(b"\n"):
                return bytes(line)
        raise ProxyError("no LF in the first %d octets of a PROXY v1 line" % V1_LIMIT)

    def close(self):
        pass
