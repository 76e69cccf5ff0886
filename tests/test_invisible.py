"""Addresses cannot carry line breaks or invisible controls, and routing is relaying.

Security review 2: M3 (U+2028 in a bounce's headers), M5 (%-hack, bang paths,
quoted @), L9 (printable() let separators and format controls through).
"""

import socket

import pytest

from conftest import read_reply
from netsmtp.address import AddressError, parse_path
from netsmtp.bounce import build_report
from netsmtp.envelope import Envelope, Recipient, Result, Status
from netsmtp.replies import printable
from smarthost import put, run_cli

# Every character str.splitlines() breaks at but CR and LF, and format controls.
BREAKERS = ["\x0b", "\x0c", "\x1c", "\x1d", "\x1e", "\x85", "\u2028", "\u2029"]
INVISIBLE = BREAKERS + ["\u202e", "\u200b", "\u2066", "\ufeff", "\U000e0001"]


@pytest.mark.parametrize("char", INVISIBLE, ids=[hex(ord(c)) for c in INVISIBLE])
@pytest.mark.parametrize("shape", ['<"a%sb"@x.test>', "<a%sb@x.test>", "<a@x%sy.test>",
                                   "<a@x.test> X-P=a%sb"], ids=["quoted", "atom", "domain",
                                                                "param"])
def test_paths_holding_invisible_characters_are_refused(char, shape):
    """No part of a path or its parameters may hold a Cc, Cf, Zl or Zp character."""
    with pytest.raises(AddressError):
        parse_path(shape % char)


def test_printable_escapes_separators_and_format_controls():
    """U+2028, U+2029, bidi overrides and zero-width characters are escaped; other
    non-ASCII text is kept."""
    assert printable("a\u2028b\u2029c\u202ed\u200be\x85f\U000e0001 é 日本") == (
        "a\\u2028b\\u2029c\\u202ed\\u200be\\x85f\\U000e0001 é 日本")
    for char in INVISIBLE:
        assert len(("x" + printable(char) + "x").splitlines()) == 1
        assert printable(char).isascii()


def session_replies(server, lines):
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=10)
    reader = sock.makefile("rb")
    replies = [read_reply(reader)]
    for line in lines:
        sock.sendall(line + b"\r\n")
        replies.append(read_reply(reader))
    sock.close()
    return replies


def test_real_server_refuses_line_separators_in_addresses(server_factory):
    """Over the wire, with SMTPUTF8: U+2028 in a quoted local part is 501 5.1.7 at MAIL
    and 501 5.1.3 at RCPT, and nothing is queued."""
    server = server_factory()
    evil = '"a\u2028Subject: pwned\u2028\u2028Hi"@attacker.example'.encode()
    replies = session_replies(server, [
        b"EHLO attacker.example", b"MAIL FROM:<" + evil + b"> SMTPUTF8",
        b"MAIL FROM:<a@attacker.example> SMTPUTF8",
        b'RCPT TO:<"b\xe2\x80\xa8Action: delivered"@mx.test>'])
    assert replies[2][1][0] == "501 5.1.7 Bad sender address syntax"
    assert replies[4][1][0] == "501 5.1.3 Bad recipient address syntax"


def test_bounce_cannot_carry_a_line_break(tmp_path, spool):
    """Whatever an older entry's addresses and the smarthost's error text hold, each
    header and delivery-status field of the bounce stays one field: the header section
    has exactly its own fields, Auto-Submitted among them."""
    sender = '"a\u2028Subject: pwned\u2028\u2028Hi from MAILER-DAEMON"@attacker.example'
    recipient = '"b\u2028Action: delivered"@mx.test'
    queue_id = put(spool, sender=sender, recipients=[recipient], params={"SMTPUTF8": True})
    envelope = Envelope.thaw(spool.entry_path(queue_id))
    failure = Result(550, "5.1.1 no such user\u2028X-Injected: yes\r\nAction: delivered\x85Z: z")
    record = Recipient(recipient, Status.FAILED, failure,
                       orcpt="utf-8;c\u2028Action: delivered", remote="smart\u2029host")
    data = build_report(envelope, "failed", [record], "mx.test")
    head, _, _ = data.partition(b"\r\n\r\n")
    names = [line.split(b":")[0] for line in head.split(b"\r\n") if line[:1] not in (b" ", b"\t")]
    assert sorted(names) == sorted([b"Content-Type", b"MIME-Version", b"From", b"To", b"Subject",
                                    b"Date", b"Message-ID", b"Auto-Submitted"])
    assert "\u2028".encode() not in data and b"\x85" not in data.replace(b"\\x85", b"")
    status = data.split(b"Content-Type: message/global-delivery-status")[1].split(b"\r\n--")[0]
    blocks = [dict(line.split(": ", 1) for line in block.split("\r\n"))
              for block in status.decode().strip("\r\n").split("\r\n\r\n")[1:]]
    [per_message, per_recipient] = blocks
    assert sorted(per_message) == ["Arrival-Date", "Reporting-MTA", "X-Netsmtp-Queue-ID"]
    assert sorted(per_recipient) == ["Action", "Diagnostic-Code", "Final-Recipient",
                                     "Last-Attempt-Date", "Original-Recipient",
                                     "Remote-MTA", "Status"]
    assert per_recipient["Action"] == "failed"


def test_queue_listing_escapes_invisible_characters(spool, capsys):
    """netsmtp-queue prints an entry's addresses with separators and bidi controls escaped."""
    from netsmtp.queue_cli import queue_main
    put(spool, sender="a\u202eb@x.test", recipients=["c\u2028d@x.test"])
    assert run_cli(queue_main, ["--spool", spool.path]) == 0
    out = capsys.readouterr().out
    assert "\u2028" not in out and "\u202e" not in out
    assert "a\\u202eb@x.test" in out and "c\\u2028d@x.test" in out


ROUTED = [b"victim%elsewhere.example@mx.test", b"elsewhere.example!victim@mx.test",
          b'"victim@elsewhere.example"@mx.test']


@pytest.mark.parametrize("rcpt", ROUTED, ids=["percent-hack", "bang-path", "quoted-at"])
def test_routing_local_parts_are_relay_attempts(server_factory, rcpt):
    """From a client that may not relay, a local-domain recipient whose local part routes
    elsewhere gets 550 5.7.1; from a relay network it is accepted."""
    server = server_factory("--relay-networks", "none")
    replies = session_replies(server, [b"EHLO c.test", b"MAIL FROM:<a@c.test>",
                                       b"RCPT TO:<" + rcpt + b">", b"RCPT TO:<plain@mx.test>"])
    assert replies[3][0] == 550 and replies[3][1][0].startswith("550 5.7.1 Relaying denied")
    assert replies[4][0] == 250
    trusted = server_factory(spool=server.spool + "-trusted")
    replies = session_replies(trusted, [b"EHLO c.test", b"MAIL FROM:<a@c.test>",
                                        b"RCPT TO:<" + rcpt + b">"])
    assert replies[3][0] == 250
