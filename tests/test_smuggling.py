"""SMTP smuggling: only CRLF.CRLF ends a message (RFC 5321 sections 2.3.8, 4.1.1.4).

Each vector hides a second transaction behind a fake end of data.  netsmtp
reads to the real CRLF.CRLF, refuses the whole message with 554 and never
answers the smuggled commands.
"""

import io

import pytest

from conftest import replies_of, spooled
from netsmtp.session import Session

VECTORS = {
    "lf-dot-lf": b"\n.\n",
    "lf-dot-crlf": b"\n.\r\n",
    "crlf-dot-lf": b"\r\n.\n",
    "cr-dot-cr": b"\r.\r",
    "crlf-dot-cr": b"\r\n.\r",
    "cr-dot-crlf": b"\r.\r\n",
    "lf-dot-cr": b"\n.\r",
    "nul-dot": b"\r\n\x00.\r\n",
}

SMUGGLED = (b"MAIL FROM:<admin@bank.test>\r\nRCPT TO:<victim@mx.test>\r\nDATA\r\n"
            b"From: admin@bank.test\r\nSubject: smuggled\r\n\r\nsend money")


def session_bytes(vector):
    return (b"EHLO evil.test\r\nMAIL FROM:<a@evil.test>\r\nRCPT TO:<u@mx.test>\r\nDATA\r\n"
            b"Subject: cover\r\n\r\nhello" + vector + SMUGGLED + b"\r\n.\r\nQUIT\r\n")


@pytest.mark.parametrize("vector", VECTORS.values(), ids=VECTORS.keys())
def test_smuggling_vector_is_refused_whole(converse, spool, vector):
    """The fake end is message text; the message is refused and no smuggled command runs."""
    replies = converse(session_bytes(vector))
    assert [code for code, _ in replies] == [220, 250, 250, 250, 354, 554, 221]
    assert spooled(spool) == []


class Dribble:
    """A client that sends one byte per packet."""

    def __init__(self, data):
        self.data = data

    def read1(self, size):
        byte, self.data = self.data[:1], self.data[1:]
        return byte


@pytest.mark.parametrize("vector", [b"\r\n.\r\n", *VECTORS.values()],
                         ids=["honest", *VECTORS.keys()])
def test_byte_by_byte_delivery_changes_nothing(options, spool, converse, vector):
    """Splitting the stream at every byte gives the same replies as one packet."""
    whole = [code for code, _ in converse(session_bytes(vector))]
    out = io.BytesIO()
    Session(Dribble(session_bytes(vector)), out, peer="192.0.2.1",
            options=options, spool=spool).handle()
    assert [code for code, _ in replies_of(out.getvalue())] == whole


def test_honest_crlf_message_around_the_vectors_is_accepted(converse, spool):
    """Dots, CRs and LFs inside proper CRLF lines are fine: only bare ones are refused."""
    body = b"Subject: ok\r\n\r\n..\r\na.b\r\n\r\n..x\r\n"
    replies = converse([b"EHLO c.test", b"MAIL FROM:<a@c.test>", b"RCPT TO:<u@mx.test>",
                        b"DATA", body + b"."])
    assert replies[-1][0] == 250 and len(spooled(spool)) == 1
