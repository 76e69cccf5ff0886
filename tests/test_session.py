"""Conversations with a Session over BytesIO: every verb and every error class."""

import errno
import io
import logging
import os
import signal
import stat

import pytest

from conftest import Conversation, entries_of, make_options, replies_of, spooled
from netsmtp.replies import SMTPError
from netsmtp.session import Session
from netsmtp.spool import INCOMPLETE, Spool

HELLO = [b"EHLO client.test"]
SENDER = HELLO + [b"MAIL FROM:<a@client.test>"]
RECIPIENT = SENDER + [b"RCPT TO:<u@mx.test>"]


def last(replies):
    return replies[-1][1][-1]


# -- greeting, HELO/EHLO, simple verbs ----------------------------------------

def test_greeting_names_the_host(converse):
    """The session opens with 220 and the configured hostname."""
    assert converse([]) == [(220, ["220 mx.test ESMTP netsmtp ready"])]


def test_ehlo_advertises_the_extensions(converse):
    """EHLO lists PIPELINING, SIZE, 8BITMIME, SMTPUTF8, ENHANCEDSTATUSCODES, CHUNKING, DSN, HELP."""
    code, lines = converse(HELLO)[1]
    assert code == 250
    assert lines[0] == "250-mx.test greets client.test"
    assert [line[4:] for line in lines[1:]] == [
        "PIPELINING", "SIZE 20000000", "8BITMIME", "SMTPUTF8", "ENHANCEDSTATUSCODES",
        "CHUNKING", "DSN", "HELP"]
    assert lines[-1].startswith("250 ") and all(line.startswith("250-") for line in lines[:-1])


def test_helo_is_one_line_and_plain_smtp(converse):
    """HELO gets a single 250 line and no extensions."""
    assert converse([b"HELO client.test"])[1] == (250, ["250 mx.test greets client.test"])
    assert converse.session.protocol == "SMTP"


@pytest.mark.parametrize("line", [b"HELO", b"EHLO", b"EHLO \x01bad"])
def test_greeting_needs_a_printable_name(converse, line):
    """HELO/EHLO without a (printable) name is a syntax error, 501."""
    assert converse([line])[1][0] == 501


def test_ehlo_resets_the_transaction(converse):
    """A second EHLO drops the open transaction, so DATA is out of sequence."""
    codes = converse.codes(RECIPIENT + HELLO + [b"DATA"])
    assert codes[-1] == 503


@pytest.mark.parametrize("verb", [b"noop", b"NoOp", b"NOOP"])
def test_verbs_are_case_insensitive(converse, verb):
    """Verbs match whatever their case."""
    assert converse.codes([verb]) == [220, 250]


def test_unknown_verb_is_500(converse):
    """An unknown verb gets 500 5.5.2 and the session goes on."""
    replies = converse([b"FROB x", b"NOOP"])
    assert replies[1] == (500, ["500 5.5.2 Command not recognized"])
    assert replies[2][0] == 250


@pytest.mark.parametrize("line,verb", [(b"TURN", "TURN"), (b"ETRN mx.test", "ETRN"),
                                       (b"EXPN staff", "EXPN"), (b"SAML FROM:<a@b>", "SAML")])
def test_known_but_unimplemented_is_502(converse, line, verb):
    """Verbs netsmtp knows but does not offer get 502 5.5.1."""
    assert converse([line])[1] == (502, ["502 5.5.1 %s not implemented" % verb])


def test_vrfy_never_claims_to_verify(converse):
    """VRFY answers 252 (RFC 5321 section 3.5.3), never 250; without an argument 501."""
    codes = converse.codes([b"VRFY u@mx.test", b"VRFY <nobody@mx.test>", b"VRFY"])
    assert codes == [220, 252, 252, 501]


def test_help_is_multiline_214(converse):
    """HELP answers a multi-line 214 that lists the verbs of the predecessor table."""
    code, lines = converse([b"HELP"])[1]
    assert code == 214 and len(lines) > 1 and lines[-1].startswith("214 2.0.0 ")
    assert lines[1] == ("214-2.0.0 Commands: HELO EHLO MAIL RCPT DATA BDAT RSET NOOP QUIT HELP VRFY"
                        " STARTTLS AUTH")


def test_quit_closes(converse):
    """QUIT answers 221 and nothing after it is read."""
    assert converse.codes([b"QUIT", b"NOOP", b"NOOP"]) == [220, 221]


def test_rset_ends_the_transaction(converse, spool):
    """RSET answers 250 and forgets sender and recipients."""
    assert converse.codes(RECIPIENT + [b"RSET", b"DATA"])[-2:] == [250, 503]


# -- MAIL and RCPT syntax -------------------------------------------------------

@pytest.mark.parametrize("line,sender", [
    (b"MAIL FROM:<>", ""),
    (b"MAIL FROM: <a@client.test>", "a@client.test"),
    (b"mail from:<A.B+tag@Client.Test>", "A.B+tag@Client.Test"),
    (b'MAIL FROM:<"john doe"@client.test>', '"john doe"@client.test'),
    (b"MAIL FROM:<@relay.test,@hop.test:a@client.test>", "a@client.test"),
    (b"MAIL FROM:<a@[192.0.2.7]>", "a@[192.0.2.7]"),
    (b"MAIL FROM:<a@[IPv6:2001:db8::1]>", "a@[IPv6:2001:db8::1]"),
    (b"MAIL FROM:<a@client.test.>", "a@client.test"),
], ids=["null", "space", "case", "quoted", "source-route", "literal", "ipv6", "trailing-dot"])
def test_mail_from_paths(converse, line, sender):
    """RFC 5321 paths: null path, quoted local parts, source routes dropped, literals."""
    assert converse.codes(HELLO + [line]) == [220, 250, 250]
    assert converse.session.envelope.sender == sender


@pytest.mark.parametrize("line", [
    b"MAIL FROM:a@client.test", b"MAIL FROM:<a@client.test", b"MAIL FROM:<a b@client.test>",
    b"MAIL FROM:<a@@client.test>", b"MAIL FROM:<postmaster>", b"MAIL FROM:<a..b@client.test>",
    b"MAIL FROM:<" + b"x" * 65 + b"@client.test>", b"MAIL FROM:<a@-bad.test>",
], ids=["no-brackets", "unclosed", "space", "double-at", "postmaster", "double-dot",
        "long-local", "bad-label"])
def test_bad_sender_syntax_is_501(converse, line):
    """A malformed reverse path gets 501 5.1.7 and no transaction starts."""
    assert converse([*HELLO, line])[-1] == (501, ["501 5.1.7 Bad sender address syntax"])
    assert converse.session.envelope is None


@pytest.mark.parametrize("line", [b"MAIL", b"MAIL TO:<a@client.test>", b"MAIL FROM"])
def test_mail_needs_from(converse, line):
    """MAIL without FROM: gets 501 with the usage."""
    assert converse([*HELLO, line])[-1] == (501, ["501 5.5.2 Syntax error: MAIL FROM:<address>"])


def test_rcpt_postmaster_without_domain(converse):
    """<postmaster> with no domain is always a valid recipient (RFC 5321 section 4.5.1)."""
    assert converse.codes(SENDER + [b"RCPT TO:<Postmaster>"])[-1] == 250


@pytest.mark.parametrize("line", [b"RCPT TO:<>", b"RCPT TO:u@mx.test", b"RCPT FROM:<u@mx.test>",
                                  b"RCPT TO:<u@>"])
def test_bad_recipient_syntax(converse, line):
    """A malformed forward path gets 501."""
    assert converse.codes(SENDER + [line])[-1] == 501


@pytest.mark.parametrize("params,code", [
    (b"SIZE=1000", 250), (b"BODY=8BITMIME", 250), (b"BODY=7bit", 250), (b"SMTPUTF8", 250),
    (b"SIZE=1000 BODY=8BITMIME SMTPUTF8", 250), (b"SIZE=abc", 501), (b"SIZE", 501),
    (b"BODY=BINARYMIME", 501), (b"SMTPUTF8=yes", 501), (b"RET=FULL", 250), (b"X-FOO", 555),
    (b"SIZE=1 SIZE=2", 501), (b"SIZE=99999999999", 552),
    ("SIZE=\u00b2".encode(), 501), ("SIZE=\u0661\u0662".encode(), 501),
])
def test_mail_parameters(converse, params, code):
    """SIZE, BODY and SMTPUTF8 are parsed; an unknown parameter is 555 5.5.4.

    SIZE is ASCII digits only (RFC 1870 section 3): a superscript two or an
    Arabic-Indic digit is a 501, not an internal error or a number.
    """
    assert converse.codes(HELLO + [b"MAIL FROM:<a@client.test> " + params])[-1] == code


def test_mail_parameters_are_typed(converse):
    """The envelope keeps SIZE as a number and BODY upper-cased."""
    converse(HELLO + [b"MAIL FROM:<a@client.test> size=12 body=8bitmime smtputf8"])
    assert converse.session.envelope.params == {"SIZE": 12, "BODY": "8BITMIME", "SMTPUTF8": True}


def test_parameters_need_ehlo(converse):
    """After plain HELO, ESMTP parameters are refused with 555."""
    assert converse.codes([b"HELO c.test", b"MAIL FROM:<a@client.test> SIZE=10"])[-1] == 555


def test_parameter_with_a_control_character_is_a_syntax_error(converse):
    """A control character in a MAIL parameter is a malformed parameter (501 5.5.4) that is
    never echoed; a well-formed unknown parameter is named in the 555."""
    replies = converse([*HELLO, b"MAIL FROM:<a@client.test> X-\x7fBAD",
                        b"MAIL FROM:<a@client.test> X-FOO=1"])
    assert replies[2] == (501, ["501 5.5.4 Invalid value for parameter (malformed)"])
    assert replies[3] == (555, ["555 5.5.4 Unsupported parameter X-FOO"])


def test_echoed_text_is_escaped(converse):
    """Text a reply echoes (here VRFY's argument) reaches the client with its control
    characters escaped, never raw."""
    reply = converse([b"VRFY <\x1b[31m>"])[1]
    assert reply == (252, ["252 2.1.5 Cannot VRFY <\\x1b[31m>; send mail to it and "
                           "delivery will be attempted"])


def test_unknown_rcpt_parameters_are_refused(converse):
    """RCPT parameters other than DSN's get 555 5.5.4."""
    assert converse([*SENDER, b"RCPT TO:<u@mx.test> X-FOO=1"])[-1] == (
        555, ["555 5.5.4 Unsupported parameter X-FOO"])


def test_utf8_addresses_need_smtputf8(converse):
    """A non-ASCII address is 553 5.6.7 without SMTPUTF8 and accepted with it (RFC 6531)."""
    mail = "MAIL FROM:<jöran@client.test>".encode()
    rcpt = "RCPT TO:<ünïcode@mx.test>".encode()
    assert converse.codes(HELLO + [mail])[-1] == 553
    assert converse.codes(HELLO + [b"MAIL FROM:<a@client.test>", rcpt])[-1] == 553
    assert converse.codes(HELLO + [mail + b" SMTPUTF8", rcpt]) == [220, 250, 250, 250]


def test_invalid_utf8_is_501(converse):
    """Bytes that are not UTF-8 in an argument get 501, not a crash."""
    assert converse.codes(HELLO + [b"MAIL FROM:<\xff@client.test>", b"NOOP"])[-2:] == [501, 250]


def test_too_many_recipients(tmp_path):
    """Past max_recipients, RCPT gets 452 4.5.3 (RFC 5321 section 4.5.3.1.10)."""
    options = make_options(tmp_path, max_recipients=2)
    spool = Spool(options.spool)
    converse = Conversation(options, spool)
    codes = converse.codes(SENDER + [b"RCPT TO:<%d@mx.test>" % i for i in range(3)])
    assert codes[-3:] == [250, 250, 452]


# -- limits on lines and bytes --------------------------------------------------

def test_long_command_line_is_refused_and_session_continues(converse):
    """A command line over 512 octets gets 500 5.5.0; the next command works."""
    replies = converse([b"NOOP " + b"x" * 600, b"NOOP"])
    assert replies[1] == (500, ["500 5.5.0 Line too long (limit 512 octets)"])
    assert replies[2][0] == 250


def test_huge_command_line_is_bounded(converse):
    """A megabyte without a newline is thrown away, not buffered whole, then refused."""
    replies = converse([b"NOOP " + b"x" * 1_000_000, b"NOOP"])
    assert [code for code, _ in replies] == [220, 500, 250]
    assert len(converse.session.reader.buf) == 0


def test_mail_line_may_carry_extension_parameters(converse):
    """MAIL may exceed 512 octets by what its parameters add (RFC 1870 section 3)."""
    line = b"MAIL FROM:<" + b"a" * 64 + b"@" + b"d" * 180 + b">" + b" " * 300 + b"SIZE=10"
    assert 512 < len(line) + 2 < 512 + 600
    assert converse.codes(HELLO + [line, b"NOOP " + b"x" * len(line)])[-2:] == [250, 500]


def test_nul_byte_in_command(converse):
    """A NUL byte in a command is refused with 501 and the session goes on."""
    assert converse.codes([b"NOOP \x00", b"NOOP"]) == [220, 501, 250]


def test_bad_command_budget_closes(converse):
    """After too many bad commands the session says 421 and closes."""
    codes = converse.codes([b"FROB"] * 30)
    assert codes[-1] == 421 and codes.count(500) == 20


# -- DATA -----------------------------------------------------------------------

def test_dot_stuffing_is_removed(converse, spool):
    """Leading dots are unstuffed (RFC 5321 section 4.5.2); the rest is byte-exact."""
    body = b"Subject: dots\r\n\r\n..one\r\n...two\r\n.\xc3\xa9\r\nmid.dle\r\n"
    converse(RECIPIENT + [b"DATA", body + b"."])
    envelope, message = entries_of(spool)[0]
    assert message.endswith(b"\r\n\r\n.one\r\n..two\r\n\xc3\xa9\r\nmid.dle\r\n")
    assert envelope.recipients == ["u@mx.test"] and envelope.sender == "a@client.test"


def test_empty_message(converse, spool):
    """A message of no lines at all is accepted (the terminator right after 354)."""
    assert converse.codes(RECIPIENT + [b"DATA", b"."])[-1] == 250
    assert entries_of(spool)[0][1].startswith(b"Received: ")


def test_message_over_size_limit(tmp_path):
    """Over max_size: read to the final dot, 552 5.3.4, nothing kept, session goes on."""
    options = make_options(tmp_path, max_size=1000)
    spool = Spool(options.spool)
    spool.prepare()
    converse = Conversation(options, spool)
    big = b"Subject: big\r\n\r\n" + b"x" * 70 + b"\r\n"
    replies = converse(RECIPIENT + [b"DATA", big * 20 + b".", b"NOOP"])
    assert replies[-2] == (552, ["552 5.3.4 Message too big (limit 1000 octets)"])
    assert replies[-1][0] == 250
    assert spooled(spool) == [] and os.listdir(spool.tmp) == []


def test_long_text_line_is_refused(converse, spool):
    """A text line over 1000 octets: 554 after the final dot, nothing kept."""
    replies = converse(RECIPIENT + [b"DATA", b"Subject: x\r\n\r\n" + b"y" * 1200, b".", b"NOOP"])
    assert replies[-2][0] == 554 and "1000" in last(replies[:-1])
    assert replies[-1][0] == 250 and spooled(spool) == []


def test_line_of_exactly_1000_octets_is_accepted(converse, spool):
    """998 octets plus CRLF is the longest legal line and is kept."""
    assert converse.codes(RECIPIENT + [b"DATA", b"z" * 998, b"."])[-1] == 250


def test_data_with_argument(converse):
    """DATA takes no argument."""
    assert converse.codes(RECIPIENT + [b"DATA now"])[-1] == 501


def test_eof_during_data_keeps_nothing(converse, spool):
    """A connection lost mid-message leaves neither an entry nor debris."""
    converse(RECIPIENT + [b"DATA", b"Subject: cut\r\n\r\nhalf a mess"])
    assert spooled(spool) == [] and os.listdir(spool.tmp) == []


def test_two_messages_in_one_session(converse, spool):
    """The end of DATA starts a fresh transaction."""
    one = [b"MAIL FROM:<a@client.test>", b"RCPT TO:<u@mx.test>", b"DATA", b"one\r\n."]
    assert converse.codes(HELLO + one + one).count(250) == 7
    assert len(spooled(spool)) == 2


# -- the Received header ----------------------------------------------------------

def received_of(spool):
    """The first header field of the spooled message, folded lines included."""
    lines = entries_of(spool)[0][1].split(b"\r\n")
    end = next(i for i, line in enumerate(lines[1:], 1) if not line.startswith(b"\t"))
    return b"\r\n".join(lines[:end]).decode()


def test_received_header(converse, spool):
    """The trace header names HELO, the connection's address, host, protocol, id, recipient, date."""
    converse([b"EHLO [10.9.9.9]", b"MAIL FROM:<a@client.test>", b"RCPT TO:<u@mx.test>",
              b"DATA", b"Subject: r\r\n\r\nx\r\n."])
    header = received_of(spool)
    envelope = entries_of(spool)[0][0]
    assert header.startswith("Received: from [10.9.9.9] ([192.0.2.1])\r\n")
    assert "\tby mx.test (netsmtp) with ESMTP id %s\r\n" % envelope.id in header
    assert "\tfor <u@mx.test>;\r\n" in header
    assert header.rsplit("\t", 1)[1][:3] in ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")


def test_received_names_an_ipv6_client_as_an_address_literal(converse, spool):
    """An IPv6 client is [IPv6:...] in the trace header (RFC 5321 sections 4.1.3, 4.4)."""
    converse([b"EHLO c.test", b"MAIL FROM:<a@client.test>", b"RCPT TO:<u@mx.test>",
              b"DATA", b"x\r\n."], peer="2001:db8::25")
    assert received_of(spool).startswith("Received: from c.test ([IPv6:2001:db8::25])\r\n")


def test_received_hides_recipients_of_a_multi_recipient_message(converse, spool):
    """With several recipients the header has no "for" clause; HELO gives SMTP."""
    converse([b"HELO c.test", b"MAIL FROM:<a@client.test>", b"RCPT TO:<u@mx.test>",
              b"RCPT TO:<v@mx.test>", b"DATA", b"x\r\n."])
    header = received_of(spool)
    assert " for " not in header and "with SMTP id" in header


def test_client_text_cannot_inject_a_header(converse, spool):
    """Only Received and the client's own message lines are in the entry."""
    converse([b"EHLO evil.test\rX-Injected:1", b"EHLO ok.test", b"MAIL FROM:<a@client.test>",
              b"RCPT TO:<u@mx.test>", b"DATA", b"Subject: s\r\n\r\nx\r\n."])
    message = entries_of(spool)[0][1]
    assert b"X-Injected" not in message and message.count(b"Received:") == 1


# -- pipelining -------------------------------------------------------------------

class Packets:
    """A reader that returns one scripted packet per read, like a socket."""

    def __init__(self, *packets):
        self.packets = list(packets)

    def read1(self, size):
        return self.packets.pop(0) if self.packets else b""


class Writes(io.BytesIO):
    """A writer that records each write call."""

    def __init__(self):
        super().__init__()
        self.writes = []

    def write(self, data):
        self.writes.append(bytes(data))
        return super().write(data)


def test_pipelined_replies_come_in_order_in_one_write(options, spool):
    """MAIL, RCPT, RCPT, DATA in one packet get four replies, in order, in one write."""
    out = Writes()
    session = Session(Packets(
        b"EHLO c.test\r\n",
        b"MAIL FROM:<a@client.test>\r\nRCPT TO:<u@mx.test>\r\nRCPT TO:<v@mx.test>\r\nDATA\r\n",
        b"Subject: p\r\n\r\nx\r\n.\r\nQUIT\r\n"), out, peer="192.0.2.1", options=options, spool=spool)
    session.handle()
    groups = [[code for code, _ in replies_of(w)] for w in out.writes]
    assert groups == [[220], [250], [250, 250, 250, 354], [250, 221]]


def test_queued_replies_are_bounded(options, spool):
    """Thousands of pipelined EHLOs are answered in bounded writes, not one huge one."""
    from netsmtp.session import OUTPUT_LIMIT
    out = Writes()
    Session(Packets(b"EHLO c.test\r\n" * 5000), out, peer="192.0.2.1",
            options=options, spool=spool).handle()
    assert max(map(len, out.writes)) < OUTPUT_LIMIT + 1024
    assert sum(len(replies_of(w)) for w in out.writes) == 5001


# -- relay policy and hooks ---------------------------------------------------------

@pytest.mark.parametrize("peer,rcpt,code", [
    ("192.0.2.1", b"u@mx.test", 250), ("192.0.2.1", b"u@Example.Test", 250),
    ("192.0.2.1", b"u@elsewhere.test", 550), ("127.0.0.1", b"u@elsewhere.test", 250),
    ("::1", b"u@elsewhere.test", 250), ("::ffff:127.0.0.1", b"u@elsewhere.test", 250),
    ("2001:db8::1", b"u@elsewhere.test", 550), (None, b"u@elsewhere.test", 550),
], ids=["local", "local-case", "relay-denied", "loopback", "v6-loopback", "mapped",
        "v6-outside", "local-pipe"])
def test_no_open_relay(converse, peer, rcpt, code):
    """Local domains from anyone; other domains only from the relay networks; a session
    with no client address is in none of them by default."""
    converse.peer = peer
    assert converse.codes(SENDER + [b"RCPT TO:<" + rcpt + b">"])[-1] == code


def test_relay_denied_reply(converse):
    """The refusal is 550 5.7.1 naming the recipient."""
    assert converse(SENDER + [b"RCPT TO:<x@elsewhere.test>"])[-1] == (
        550, ["550 5.7.1 Relaying denied for <x@elsewhere.test>"])


def test_relay_networks_none(tmp_path):
    """--relay-networks none: even the loopback may only send to local domains."""
    options = make_options(tmp_path, relay_networks="none")
    converse = Conversation(options, Spool(options.spool), peer="127.0.0.1")
    assert converse.codes(SENDER + [b"RCPT TO:<x@elsewhere.test>"])[-1] == 550


class Strict(Session):
    """A policy subclass: a client blocklist, a sender rule, aliases and a content rule."""

    def check_client(self, peer):
        if peer == "203.0.113.66":
            raise SMTPError("554 5.7.1", "blocked")

    def check_mail_from(self, address, params):
        if address.endswith("@spam.test"):
            raise SMTPError("550 5.7.1", address)

    def check_rcpt_to(self, address, params):
        if address == "staff@mx.test":
            return ["ann@mx.test", "bob@mx.test"]
        return super().check_rcpt_to(address, params)

    def check_message(self, envelope, headers):
        if not any(name and name.lower() == "subject" for name, _ in headers):
            raise SMTPError("554 5.6.0", "a Subject header is required")


@pytest.fixture
def strict(options, spool):
    return Conversation(options, spool, session_class=Strict)


def test_check_client_refuses_before_greeting(strict, spool):
    """A refused client gets 554 instead of 220, then 503 to all but QUIT (RFC 5321 3.1)."""
    replies = strict([b"EHLO c.test", b"MAIL FROM:<a@client.test>", b"QUIT", b"NOOP"],
                     peer="203.0.113.66")
    assert replies == [(554, ["554 5.7.1 Access denied: blocked"]),
                       (503, ["503 5.5.1 Bad sequence of commands"]),
                       (503, ["503 5.5.1 Bad sequence of commands"]),
                       (221, ["221 2.0.0 mx.test closing connection"])]


class Busy(Session):
    def check_client(self, peer):
        raise SMTPError("421 4.7.0", "mx.test", "too busy")


def test_a_421_refusal_closes_at_once(options, spool):
    """A 421 from check_client means closing: nothing more is read."""
    assert Conversation(options, spool, session_class=Busy).codes([b"EHLO c.test"]) == [421]


def test_check_mail_from_refusal(strict):
    """A sender hook's SMTPError becomes the reply; no transaction starts."""
    assert strict.codes(HELLO + [b"MAIL FROM:<x@spam.test>"])[-1] == 550
    assert strict.session.envelope is None


def test_check_rcpt_to_can_replace_the_recipient(strict, spool):
    """A list from check_rcpt_to delivers to those addresses instead."""
    strict(SENDER + [b"RCPT TO:<staff@mx.test>", b"DATA", b"Subject: s\r\n\r\nx\r\n."])
    assert entries_of(spool)[0][0].recipients == ["ann@mx.test", "bob@mx.test"]


def test_check_message_refusal_keeps_nothing(strict, spool):
    """A refusal from check_message comes after the final dot and nothing is spooled."""
    replies = strict(RECIPIENT + [b"DATA", b"No-Subject: here\r\n\r\nx\r\n."])
    assert replies[-1] == (554, ["554 5.6.0 Message refused: a Subject header is required"])
    assert spooled(spool) == [] and os.listdir(spool.tmp) == []


class Broken(Session):
    def check_mail_from(self, address, params):
        raise RuntimeError("secret internal detail")


class BrokenGreeting(Session):
    def check_client(self, peer):
        raise RuntimeError("secret internal detail")


def test_bug_before_the_greeting_is_421(options, spool, caplog):
    """An exception outside a command ends the session with 421 4.3.0, not silence."""
    replies = Conversation(options, spool, session_class=BrokenGreeting)([b"EHLO c.test"])
    assert replies == [(421, ["421 4.3.0 mx.test service not available, try again later"])]
    assert "secret internal detail" in caplog.text


def test_unexpected_error_is_451_without_detail(options, spool, caplog):
    """A bug in a hook answers 451 4.3.0, logs the traceback and leaks nothing."""
    converse = Conversation(options, spool, session_class=Broken)
    replies = converse(HELLO + [b"MAIL FROM:<a@client.test>", b"NOOP"])
    assert replies[-2] == (451, ["451 4.3.0 Local error in processing, try again later"])
    assert replies[-1][0] == 250
    assert "secret internal detail" in caplog.text


# -- durability -------------------------------------------------------------------

def commit_events(options, spool, monkeypatch):
    """What one accepted message costs the disk, in order: fsyncs, renames, the 250."""
    events = []
    real_fsync, real_rename = os.fsync, os.rename

    def fsync(fd):
        kind = "directory" if stat.S_ISDIR(os.fstat(fd).st_mode) else "file"
        [name] = spooled(spool)
        with open(os.path.join(spool.path, name), "rb") as f:
            first = f.read(len(INCOMPLETE))
        events.append("fsync %s (%s)" % (kind, "committed" if first != INCOMPLETE else
                                         "incomplete"))
        return real_fsync(fd)
    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "rename", lambda a, b: (events.append("rename"), real_rename(a, b))[1])

    class Out(io.BytesIO):
        def write(self, data):
            if b"250 2.6.0" in data:
                events.append("250")
            return super().write(data)

    Session(io.BytesIO(b"".join(line + b"\r\n" for line in RECIPIENT + [b"DATA", b"x\r\n."])),
            Out(), peer="192.0.2.1", options=options, spool=spool).handle()
    return events


def test_one_journal_commit_before_250(options, spool, monkeypatch):
    """The entry is written in place and committed by one file fsync: no rename, no dir fsync."""
    assert commit_events(options, spool, monkeypatch) == ["fsync file (committed)", "250"]
    assert len(spooled(spool)) == 1 and os.listdir(spool.tmp) == []


def test_spool_fsync_directory_adds_the_directory_fsync(options, tmp_path, monkeypatch):
    """--spool-fsync-directory: the file's fsync, then the directory's, then the 250."""
    options = options.replace(spool_fsync_directory=True)
    spool = Spool(options.spool, fsync_directory=options.spool_fsync_directory)
    spool.prepare()
    assert commit_events(options, spool, monkeypatch) == [
        "fsync file (committed)", "fsync directory (committed)", "250"]


def test_entry_removed_while_written_is_not_acknowledged(options, spool, monkeypatch):
    """If the entry was removed as debris before its commit, the client gets 452, not 250."""
    real_fsync = os.fsync

    def fsync(fd):
        for name in os.listdir(spool.path):
            if name.endswith(".msg"):
                os.unlink(os.path.join(spool.path, name))
        return real_fsync(fd)
    monkeypatch.setattr(os, "fsync", fsync)
    replies = Conversation(options, spool)(RECIPIENT + [b"DATA", b"x\r\n."])
    assert replies[-1][0] == 452 and spooled(spool) == []


class BrokenTrace(Session):
    def received_header(self, envelope):
        raise RuntimeError("bug in an override")


def test_bug_in_received_header_leaves_no_debris(options, spool):
    """An exception from an overridden received_header() is 451, and tmp/ stays empty."""
    replies = Conversation(options, spool, session_class=BrokenTrace)(RECIPIENT + [b"DATA"])
    assert replies[-1][0] == 451 and os.listdir(spool.tmp) == [] and spooled(spool) == []


class FullDisk(Spool):
    """A spool whose writes fail as on a full disk."""

    def __init__(self, path, good_writes):
        super().__init__(path)
        self.good_writes = good_writes

    def create(self, envelope):
        writer = super().create(envelope)
        real_write, budget = writer.write, [self.good_writes]

        def write(data):
            budget[0] -= 1
            if budget[0] < 0:
                raise OSError(errno.ENOSPC, "No space left on device")
            real_write(data)
        writer.write = write
        return writer


@pytest.mark.parametrize("good_writes,codes", [(0, [452, 500, 500, 250]), (1, [354, 452, 250])],
                         ids=["at-data", "mid-message"])
def test_full_disk_is_452_and_leaves_no_debris(options, good_writes, codes):
    """ENOSPC at DATA refuses before 354; mid-message answers 452 4.3.1 after the dot; no debris."""
    spool = FullDisk(options.spool, good_writes)
    spool.prepare()
    replies = Conversation(options, spool)(RECIPIENT + [b"DATA", b"x\r\n.", b"NOOP"])
    assert [code for code, _ in replies[4:]] == codes
    assert os.listdir(spool.tmp) == [] and spooled(spool) == []


class TimesOut:
    def read1(self, size):
        raise TimeoutError


class BreaksMidMessage:
    """A connection that fails mid-DATA as a TLS stream does on a bad record MAC
    (ssl.SSLError is an OSError but no ConnectionError)."""

    def __init__(self, data):
        self.chunks = [data]

    def read1(self, size):
        if self.chunks:
            return self.chunks.pop()
        raise OSError(errno.EPROTO, "decryption failed or bad record mac")


def test_broken_connection_mid_data_is_no_internal_error(options, spool, caplog):
    """A read error in DATA ends the session as a lost connection: no 451, no
    traceback, nothing spooled."""
    caplog.set_level(logging.INFO)
    data = b"".join(line + b"\r\n" for line in RECIPIENT + [b"DATA", b"half a message"])
    out = io.BytesIO()
    Session(BreaksMidMessage(data), out, options=options, spool=spool).handle()
    assert [code for code, _ in replies_of(out.getvalue())] == [220, 250, 250, 250, 354]
    assert "internal error" not in caplog.text and "connection error" in caplog.text
    assert spooled(spool) == [] and os.listdir(spool.tmp) == []


def test_idle_timeout_is_421(options, spool):
    """A read timeout ends the session with 421 4.4.2."""
    out = io.BytesIO()
    Session(TimesOut(), out, options=options, spool=spool).handle()
    assert replies_of(out.getvalue())[-1] == (421, ["421 4.4.2 mx.test idle for too long, closing connection"])


class SignalledWire(io.BytesIO):
    """A wfile that gets SIGTERM just as the 250 of a message is written."""

    def write(self, data):
        if b"250 2.6.0" in data and not self.getvalue().count(b"250 2.6.0"):
            signal.raise_signal(signal.SIGTERM)
        return super().write(data)


def test_sigterm_while_the_250_is_written_still_sends_it(options, spool):
    """A stop signal during the flush of a 250 lets the 250 out, then says 421:
    a lost 250 for a spooled message would make the client send it twice."""
    data = b"".join(line + b"\r\n" for line in RECIPIENT + [b"DATA", b"hi", b".", b"NOOP"])
    out = SignalledWire()
    session = Session(io.BytesIO(data), out, options=options, spool=spool)
    saved = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    session.stop_on_signals()
    try:
        session.handle()
    finally:
        signal.signal(signal.SIGTERM, saved[0])
        signal.signal(signal.SIGINT, saved[1])
    codes = [code for code, _ in replies_of(out.getvalue())]
    assert codes == [220, 250, 250, 250, 354, 250, 250, 421] and len(spooled(spool)) == 1
