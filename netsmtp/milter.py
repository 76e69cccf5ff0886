"""The Sendmail milter protocol, version 6, from the MTA's side.

There is no RFC: the protocol is what Sendmail's libmilter speaks (Todd
Vierling's milter-protocol.txt, go-milter's v6 notes, Postfix's
src/milter/milter8.c).  A packet is a 32-bit length in network order, a
command letter and its data; strings end in NUL.  netsmtp opens one
connection per milter per session, negotiates actions and protocol steps
('O'), then sends each stage preceded by its macros ('D'): connect 'C',
HELO 'H', MAIL 'M', RCPT 'R', DATA 'T', each header 'L', end of headers
'N', the body in chunks of at most 65535 octets 'B', end of message 'E';
'A' aborts a transaction and 'Q' ends the session.

Everything a milter sends is bounded and checked: a packet over
MAX_PACKET octets, a reply that is not a valid SMTP reply, or a
modification that was not negotiated is a protocol error, and the milter
gets --milter-default-action.  This module is the wire and the state of
one milter; netsmtp.filters applies what it returns to the message.
"""

import logging
import struct
import time

from .replies import FilterReply, parse_filter_reply, printable
from .transport import open_stream

log = logging.getLogger(__name__)

VERSION = 6
BODY_CHUNK = 65535          # MILTER_CHUNK_SIZE: body octets per 'B' packet
MAX_PACKET = 65535 + 4096   # a replaced body chunk and its command, or any other packet
MAX_EOM_SECONDS = 300.0     # one stage's answer, progress and changes, at most (Postfix's content timeout)
MAX_EDITS = 1 << 20         # octets of header and envelope changes at one end of message

# SMFIF_*: the modifications a milter may ask to make.
ADDHDRS, CHGBODY, ADDRCPT, DELRCPT, CHGHDRS, QUARANTINE, CHGFROM, ADDRCPT_PAR, SETSYMLIST = (
    0x01, 0x02, 0x04, 0x08, 0x10, 0x20, 0x40, 0x80, 0x100)
ACTIONS_OFFERED = 0x1FF

# SMFIP_*: stages a milter does not want (NO*) or will not answer (NR_*).
NOCONNECT, NOHELO, NOMAIL, NORCPT, NOBODY, NOHDRS, NOEOH, NR_HDR, NOUNKNOWN, NODATA = (
    0x01, 0x02, 0x04, 0x08, 0x10, 0x20, 0x40, 0x80, 0x100, 0x200)
SKIP, RCPT_REJ = 0x400, 0x800
NR_CONN, NR_HELO, NR_MAIL, NR_RCPT, NR_DATA, NR_UNKN, NR_EOH, NR_BODY = (
    0x1000, 0x2000, 0x4000, 0x8000, 0x10000, 0x20000, 0x40000, 0x80000)
HDR_LEADSPC = 0x100000
# Everything but RCPT_REJ (netsmtp does not show milters the recipients it
# refused itself) and the larger body chunks (MDS_256K, MDS_1M).
PROTOCOL_OFFERED = 0x1FFFFF & ~RCPT_REJ

# Stage: (command letter, NO* flag, NR_* flag, SETSYMLIST index, default macros).
# The macros are Postfix's defaults (global/mail_params.h), with the client's
# address and name at connect, as Sendmail sends them.
STAGES = {
    "connect": (b"C", NOCONNECT, NR_CONN, 0,
                ("j", "{daemon_name}", "v", "_", "{client_addr}", "{client_name}")),
    "helo": (b"H", NOHELO, NR_HELO, 1,
             ("{tls_version}", "{cipher}", "{cipher_bits}", "{cert_subject}", "{cert_issuer}")),
    "mail": (b"M", NOMAIL, NR_MAIL, 2,
             ("i", "{auth_type}", "{auth_authen}", "{auth_author}", "{mail_addr}",
              "{mail_host}", "{mail_mailer}")),
    "rcpt": (b"R", NORCPT, NR_RCPT, 3, ("i", "{rcpt_addr}", "{rcpt_host}", "{rcpt_mailer}")),
    "data": (b"T", NODATA, NR_DATA, 4, ("i",)),
    "header": (b"L", NOHDRS, NR_HDR, None, ()),
    "eoh": (b"N", NOEOH, NR_EOH, 6, ("i",)),
    "body": (b"B", NOBODY, NR_BODY, None, ()),
    "eom": (b"E", 0, 0, 5, ("i",)),
}

# The replies to a stage (SMFIR_*); progress only resets the timer.  The
# refusals are worded as Postfix words them (milter8.c).
CONTINUE, ACCEPT, REJECT, TEMPFAIL, DISCARD, REPLYCODE, SKIPBODY, PROGRESS = (
    b"c", b"a", b"r", b"t", b"d", b"y", b"s", b"p")
REJECTED = FilterReply(550, "5.7.1", "Command rejected")
TEMPFAILED = FilterReply(451, "4.7.1", "Service unavailable - try again later")
# The modifications allowed at end of message, and the action each needs.
MODIFICATIONS = {b"h": ADDHDRS, b"i": ADDHDRS, b"m": CHGHDRS, b"b": CHGBODY,
                 b"+": ADDRCPT, b"2": ADDRCPT_PAR, b"-": DELRCPT, b"e": CHGFROM,
                 b"q": QUARANTINE}


class MilterError(Exception):
    """The milter is down, slow, or broke the protocol."""


def packet(command, data=b""):
    return struct.pack("!I", len(data) + 1) + command + data


def strings(*values):
    """NUL-terminated strings; a NUL inside a value would split it, so it cannot be there."""
    out = b""
    for value in values:
        data = value.encode("utf-8", "surrogateescape") if isinstance(value, str) else value
        out += data.replace(b"\0", b"") + b"\0"
    return out


def split_strings(data, count=None):
    """The NUL-terminated strings of data, as text; MilterError if malformed."""
    if not data.endswith(b"\0"):
        raise MilterError("string without its NUL")
    parts = data[:-1].split(b"\0")
    if count is not None and len(parts) != count:
        raise MilterError("expected %d strings, got %d" % (count, len(parts)))
    return [part.decode("utf-8", "surrogateescape") for part in parts]


class Result:
    """How a stage ended: kind (continue, accept, reject, tempfail, discard), the reply
    to send for a refusal, and at end of message the modifications, in order."""

    def __init__(self, kind, reply=None):
        self.kind, self.reply, self.modifications = kind, reply, []
        self.body_replaced = False

    def __repr__(self):
        return "<Result %s %s>" % (self.kind, self.reply or "")


class Milter:
    """One milter for one session: its connection, what it negotiated, where it stands.

    Methods that run a stage (connect, helo, mail, rcpt, data, message)
    return a Result and raise MilterError when the milter fails; after a
    failure the milter is closed and failed is set, and its stages return
    the default action's Result.
    """

    def __init__(self, address, timeout, default_action):
        self.address = address  # ("inet", (host, port)) or ("unix", path)
        self.timeout = timeout
        self.default_action = default_action
        self.sock = None
        self.actions = self.protocol = 0
        self.macro_names = {}
        self.failed = False
        self.done_session = False   # accepted at connect or HELO: nothing more to ask
        self.done_message = False   # accepted or refused for this transaction
        self.in_transaction = False

    @property
    def name(self):
        kind, where = self.address
        return "unix:%s" % where if kind == "unix" else "inet:%s:%d" % where

    # -- the wire ---------------------------------------------------------------

    def open(self):
        """Connect and negotiate (SMFIC_OPTNEG); MilterError on failure."""
        try:
            sock = open_stream(self.address, self.timeout)
        except OSError as exc:
            raise MilterError("cannot connect: %s" % exc) from None
        self.sock = sock
        self.send(b"O", struct.pack("!III", VERSION, ACTIONS_OFFERED, PROTOCOL_OFFERED))
        command, data = self.read()
        if command != b"O" or len(data) < 12:
            raise MilterError("bad negotiation reply %r" % command)
        version, actions, protocol = struct.unpack("!III", data[:12])
        if not 2 <= version <= VERSION:
            raise MilterError("protocol version %d" % version)
        if actions & ~ACTIONS_OFFERED or protocol & ~PROTOCOL_OFFERED:
            # As Postfix: a milter may not ask for what was not offered.
            raise MilterError("asks for actions %#x, protocol %#x not offered" % (
                actions & ~ACTIONS_OFFERED, protocol & ~PROTOCOL_OFFERED))
        self.actions, self.protocol = actions, protocol
        rest = data[12:]
        while len(rest) >= 4 and actions & SETSYMLIST:
            (where,), rest = struct.unpack("!I", rest[:4]), rest[4:]
            names, _, rest = rest.partition(b"\0")
            self.macro_names[where] = names.decode("ascii", "replace").split()
        log.debug("milter %s: version %d actions %#x protocol %#x", self.name, version,
                  actions, protocol)

    def send(self, command, data=b""):
        try:
            self.sock.settimeout(self.timeout)
            self.sock.sendall(packet(command, data))
        except OSError as exc:
            raise MilterError("write failed: %s" % exc) from None

    def read_exact(self, count, deadline):
        data = bytearray()
        while len(data) < count:
            left = deadline - time.monotonic()
            if left <= 0:
                raise MilterError("timed out after %ss" % self.timeout)
            try:
                self.sock.settimeout(left)
                chunk = self.sock.recv(count - len(data))
            except OSError as exc:
                raise MilterError("read failed: %s" % exc) from None
            if not chunk:
                raise MilterError("closed the connection")
            data += chunk
        return bytes(data)

    def read(self):
        """One packet, within the timeout: (command, data).  Never more than MAX_PACKET."""
        deadline = time.monotonic() + self.timeout
        (length,) = struct.unpack("!I", self.read_exact(4, deadline))
        if length == 0 or length > MAX_PACKET:
            # E.g. 0x554e4b4e: text, not milter, as from a clamd port.
            raise MilterError("packet length %d" % length)
        data = self.read_exact(length, deadline)
        return data[:1], data[1:]

    def close(self, quit=True):
        if self.sock is None:
            return
        try:
            if quit:
                self.send(b"Q")
        except MilterError:
            pass
        finally:
            self.sock.close()
            self.sock = None

    def fail(self, exc):
        """Close a broken milter; its stages answer with the default action from now on."""
        log.error("milter %s failed: %s; default action %s", self.name, exc, self.default_action)
        self.failed = True
        self.close(quit=False)
        return self.default_result()

    def default_result(self):
        if self.default_action == "accept":
            return Result(ACCEPT)
        if self.default_action == "reject":
            return Result(REJECT, REJECTED)
        return Result(TEMPFAIL, TEMPFAILED)

    # -- the stages ---------------------------------------------------------

    def wants(self, stage):
        return not self.protocol & STAGES[stage][1]

    def macros(self, stage, values):
        """The 'D' packet of stage's macros (the milter's list if it sent one), or b""."""
        letter, _, _, index, default = STAGES[stage]
        names = self.macro_names.get(index, default) if index is not None else default
        pairs = [(name, values[name]) for name in names if values.get(name) not in (None, "")]
        if not pairs:
            return b""
        return packet(b"D", letter + strings(*(item for pair in pairs for item in pair)))

    def ask(self, stage, data, values=None):
        """Send one stage (its macros first) and read its reply; a Result."""
        letter, _, no_reply, _, _ = STAGES[stage]
        if values:
            macros = self.macros(stage, values)
            if macros:
                try:
                    self.sock.sendall(macros)
                except OSError as exc:
                    raise MilterError("write failed: %s" % exc) from None
        self.send(letter, data)
        if self.protocol & no_reply:
            return Result(CONTINUE)
        return self.reply(stage)

    def reply(self, stage, result=None, body_sink=None):
        """Read to the reply that ends a stage; at "eom" collect the modifications first.

        A replaced body is not kept here: each chunk goes to body_sink as it
        comes, and the other changes may hold MAX_EDITS octets at most.
        """
        started, edits = time.monotonic(), 0
        while True:
            command, data = self.read()
            # Progress and changes each come within the timeout; all of them within this.
            if time.monotonic() - started > MAX_EOM_SECONDS:
                raise MilterError("still answering after %ss" % MAX_EOM_SECONDS)
            if command == PROGRESS:
                continue
            if command in (CONTINUE, ACCEPT):
                return result or Result(command)
            if command == REJECT:
                return Result(REJECT, REJECTED)
            if command == TEMPFAIL:
                return Result(TEMPFAIL, TEMPFAILED)
            if command == DISCARD and stage not in ("connect", "helo"):
                return Result(DISCARD)
            if command == REPLYCODE:
                return self.reply_code(data)
            if command == SKIPBODY and stage == "body" and self.protocol & SKIP:
                return Result(SKIPBODY)
            if stage == "eom" and command in MODIFICATIONS:
                if not self.actions & MODIFICATIONS[command]:
                    raise MilterError("modification %r was not negotiated" % command)
                result = result or Result(CONTINUE)
                if command == b"b":
                    if body_sink is None:
                        raise MilterError("no body may be replaced here")
                    try:
                        body_sink(data)
                    except ValueError as exc:
                        raise MilterError("bad body replacement: %s" % exc) from None
                    result.body_replaced = True
                    continue
                edits += len(data)
                if edits > MAX_EDITS:
                    raise MilterError("over %d octets of changes" % MAX_EDITS)
                result.modifications.append((command, self.modification(command, data)))
                continue
            raise MilterError("unexpected reply %r at %s" % (command, stage))

    def reply_code(self, data):
        """SMFIR_REPLYCODE: a 4xx or 5xx reply, checked like any filter's (milter8.c).

        libmilter sends no enhanced code when the milter gave none (Postfix
        passes "554 text" on): X.7.1 is added, as netsmtp's replies carry one.
        """
        (text,) = split_strings(data, 1)
        try:
            reply = parse_filter_reply(text.replace("%%", "%"), default_enhanced="7.1")
        except ValueError as exc:
            raise MilterError("invalid reply code: %s" % exc) from None
        return Result(TEMPFAIL if reply.code < 500 else REJECT, reply)

    def modification(self, command, data):
        """The arguments of one modification packet, decoded; MilterError if malformed."""
        if command in (b"i", b"m"):
            if len(data) < 4:
                raise MilterError("short header modification")
            (index,) = struct.unpack("!I", data[:4])
            return (index, *split_strings(data[4:], 2))
        if command == b"h":
            return tuple(split_strings(data, 2))
        if command in (b"+", b"-", b"q"):
            return tuple(split_strings(data, 1))
        return tuple(split_strings(data))  # "2" and "e": an address, then ESMTP arguments

    def run(self, stage, data=b"", values=None):
        """Run a stage unless the milter skips it; failures give the default action."""
        if self.failed:
            return self.default_result()
        if self.done_session or (self.done_message and stage not in ("connect", "helo")):
            return Result(CONTINUE)
        if not self.wants(stage):
            return Result(CONTINUE)
        try:
            if self.sock is None:
                self.open()
            result = self.ask(stage, data, values)
        except MilterError as exc:
            return self.fail(exc)
        if result.kind == ACCEPT:
            if stage in ("connect", "helo"):
                self.done_session = True
            else:
                self.done_message = True
        elif result.kind == DISCARD or result.kind in (REJECT, TEMPFAIL) and stage != "rcpt":
            self.done_message = True  # a refused recipient alone lets the transaction go on
        return result

    def connect(self, hostname, peer, values):
        if peer is None:
            data = strings(hostname) + b"U"
        else:
            family = b"6" if ":" in peer else b"4"
            data = strings(hostname) + family + struct.pack("!H", 0) + strings(peer)
        return self.run("connect", data, values)

    def helo(self, name, values):
        return self.run("helo", strings(name), values)

    def mail(self, sender, args, values):
        self.done_message = False
        self.in_transaction = True
        return self.run("mail", strings("<%s>" % sender, *args), values)

    def rcpt(self, recipient, args, values):
        return self.run("rcpt", strings("<%s>" % recipient, *args), values)

    def data(self, values):
        return self.run("data", b"", values)

    def message(self, headers, body_chunks, values, body_sink=None):
        """Headers, end of headers, body and end of message; the EOM Result with its
        modifications.  headers is [(name, value)], values as the milter sees them;
        body_chunks yields the body in pieces of at most BODY_CHUNK octets;
        body_sink(chunk) takes a replaced body as it arrives."""
        for name, value in headers:
            result = self.run("header", strings(name, value))
            if result.kind not in (CONTINUE,):
                return self.finish(result)
        result = self.run("eoh", b"", values)
        if result.kind != CONTINUE:
            return self.finish(result)
        for chunk in body_chunks:
            result = self.run("body", chunk)
            if result.kind == SKIPBODY:
                break
            if result.kind != CONTINUE:
                return self.finish(result)
        if self.failed:
            return self.finish(self.default_result())
        if self.done_session or self.done_message:
            return self.finish(Result(ACCEPT))
        try:
            macros = self.macros("eom", values)
            if macros:
                self.sock.sendall(macros)
            self.send(b"E")
            result = self.reply("eom", body_sink=body_sink)
        except (MilterError, OSError) as exc:
            return self.finish(self.fail(exc))
        return self.finish(result)

    def finish(self, result):
        """The message is over for this milter."""
        self.in_transaction = False
        self.done_message = True
        return result

    def abort(self):
        """SMFIC_ABORT: the transaction ended without an end of message (RSET, refusal)."""
        if self.in_transaction and self.sock is not None and not self.failed:
            try:
                self.send(b"A")
            except MilterError as exc:
                self.fail(exc)
        self.in_transaction = False
        self.done_message = False


def describe(result):
    return printable(result.reply) if result.reply else result.kind.decode()
