"""CHUNKING (RFC 3030): BDAT on the wire, rule by rule, and what reaches the spool."""

import io
import os
import socket

import pytest

from conftest import Conversation, make_options, spooled
from netsmtp.envelope import Envelope
from netsmtp.session import Session
from netsmtp.spool import Spool
from netsmtp.wire import READ_SIZE, LineReader

HELLO = b"EHLO client.test\r\n"
TRANSACTION = HELLO + b"MAIL FROM:<a@client.test>\r\nRCPT TO:<u@mx.test>\r\n"


def talk(converse, data):
    """The replies to one pipelined write (greeting dropped) as [(code, last line)]."""
    return [(code, lines[-1]) for code, lines in converse(data)[1:]]


def codes(converse, data):
    return [code for code, _ in talk(converse, data)]


def body_of(spool, index=0):
    """The spooled message without its Received header."""
    with Envelope.thaw(os.path.join(spool.path, spooled(spool)[index])).open() as f:
        data = f.read()
    start = data.index(b";\r\n\t") + 3
    return data[data.index(b"\r\n", start) + 2:]


def debris(spool):
    return os.listdir(spool.tmp)


def test_ehlo_offers_chunking_but_not_binarymime(converse):
    """CHUNKING is advertised; BINARYMIME is not, and BODY=BINARYMIME is refused."""
    keywords = [line[4:] for line in converse([HELLO])[1][1]]
    assert "CHUNKING" in keywords and "BINARYMIME" not in keywords
    replies = talk(converse, HELLO + b"MAIL FROM:<a@client.test> BODY=BINARYMIME\r\n")
    assert replies[1][0] == 501 and replies[1][1].startswith("501 5.5.4")


def test_one_last_chunk_is_a_message(converse, spool):
    """B1: MAIL, RCPT, BDAT 12 LAST in one write: 250 2.6.0 and exactly those 12 octets."""
    replies = talk(converse, TRANSACTION + b"BDAT 12 LAST\r\nX: y\r\n\r\nHi\r\n")
    assert [c for c, _ in replies] == [250, 250, 250, 250]
    assert replies[-1][1].startswith("250 2.6.0 Message accepted, queued as ")
    assert len(spooled(spool)) == 1
    assert body_of(spool) == b"X: y\r\n\r\nHi\r\n"


def test_each_chunk_is_answered_with_its_octet_count(converse, spool):
    """B2: every chunk but the last gets "250 2.0.0 <n> octets received"."""
    replies = talk(converse, TRANSACTION + b"BDAT 6\r\nX: y\r\nBDAT 6 LAST\r\n\r\nHi\r\n")
    assert replies[3] == (250, "250 2.0.0 6 octets received")
    assert replies[4][1].startswith("250 2.6.0 ")
    assert len(spooled(spool)) == 1 and body_of(spool) == b"X: y\r\n\r\nHi\r\n"


def test_bdat_0_last_ends_a_message_and_alone_is_an_empty_message(converse, spool):
    """B3: BDAT 0 LAST after a chunk ends the message; as the only chunk, an empty one."""
    assert codes(converse, TRANSACTION + b"BDAT 6\r\nX: y\r\nBDAT 0 LAST\r\n") == [250] * 5
    assert body_of(spool) == b"X: y\r\n"
    os.unlink(os.path.join(spool.path, spooled(spool)[0]))
    assert codes(converse, TRANSACTION + b"BDAT 0 LAST\r\n") == [250] * 4
    assert body_of(spool) == b""


def test_bdat_without_a_transaction_is_read_and_refused(converse, spool):
    """B4: no MAIL: the 4 octets are read and dropped, 503, and NOOP is still a command."""
    replies = talk(converse, HELLO + b"BDAT 4 LAST\r\nabcdNOOP\r\n")
    assert replies[1:] == [(503, "503 5.5.1 Bad sequence of commands"), (250, "250 2.0.0 OK")]
    assert spooled(spool) == []


def test_chunks_after_a_failed_recipient_set_are_read_and_refused(converse, spool):
    """B7: relay denied, then two pipelined chunks: 5xx each, and NOOP stays in step."""
    data = (HELLO + b"MAIL FROM:<a@client.test>\r\nRCPT TO:<b@remote.test>\r\n"
            b"BDAT 4\r\nabcdBDAT 4 LAST\r\nwxyzNOOP\r\n")
    replies = codes(converse, data)
    assert replies[:3] == [250, 250, 550]
    assert 500 <= replies[3] < 600 and 500 <= replies[4] < 600
    assert replies[5:] == [250]
    assert spooled(spool) == [] and debris(spool) == []


@pytest.mark.parametrize("verb", [b"DATA", b"MAIL FROM:<b@client.test>", b"RCPT TO:<v@mx.test>"])
def test_data_mail_and_rcpt_do_not_follow_a_chunk(converse, spool, verb):
    """B5: DATA (or MAIL, RCPT) after a BDAT is 503 5.5.1; the chunks go on."""
    replies = talk(converse, TRANSACTION + b"BDAT 6\r\nX: y\r\n" + verb + b"\r\n"
                   b"BDAT 0 LAST\r\n")
    assert replies[4] == (503, "503 5.5.1 Bad sequence of commands")
    assert replies[5][1].startswith("250 2.6.0") and body_of(spool) == b"X: y\r\n"


def test_data_and_bdat_mix_in_one_session(converse, spool):
    """B6, B9: one transaction with DATA, the next with BDAT, both queued."""
    data = (TRANSACTION + b"DATA\r\nX: 1\r\n\r\nA\r\n.\r\n"
            b"MAIL FROM:<a@client.test>\r\nRCPT TO:<u@mx.test>\r\nBDAT 11 LAST\r\nX: 2\r\n\r\nB\r\n")
    assert codes(converse, data) == [250, 250, 250, 354, 250, 250, 250, 250]
    assert sorted(body_of(spool, i) for i in range(2)) == [b"X: 1\r\n\r\nA\r\n",
                                                         b"X: 2\r\n\r\nB\r\n"]


@pytest.mark.parametrize("verb", [b"RSET", b"EHLO again.test"])
def test_rset_between_chunks_drops_everything(converse, spool, verb):
    """B8: RSET (or EHLO) between chunks: nothing is spooled, tmp/ is empty."""
    replies = codes(converse, TRANSACTION + b"BDAT 6\r\nX: y\r\n" + verb + b"\r\n")
    assert replies[-2:] == [250, 250]
    assert converse.session.state.name == "READY"
    assert spooled(spool) == [] and debris(spool) == []


def test_pipelined_chunks_over_a_socket(server):
    """B10: MAIL, RCPT, BDAT, BDAT 0 LAST, QUIT in one write to a real server: in order."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as s:
        f = s.makefile("rb")
        assert f.readline().startswith(b"220")
        s.sendall(b"EHLO client.test\r\n")
        while f.readline()[3:4] == b"-":
            pass
        s.sendall(b"MAIL FROM:<a@client.test>\r\nRCPT TO:<u@mx.test>\r\n"
                  b"BDAT 6\r\nX: y\r\nBDAT 0 LAST\r\nQUIT\r\n")
        replies = [f.readline() for _ in range(5)]
        assert f.readline() == b""
    assert [r[:3] for r in replies] == [b"250", b"250", b"250", b"250", b"221"]
    assert replies[2] == b"250 2.0.0 6 octets received\r\n"
    assert replies[3].startswith(b"250 2.6.0 ")
    assert len(spooled(Spool(server.spool))) == 1


def test_miscounted_chunk_leaves_the_rest_as_a_command_line(converse, spool):
    """B11: two octets too many after a LAST chunk are a (bad) command, and the session lives."""
    assert codes(converse, TRANSACTION + b"BDAT 5 LAST\r\nabcdefg\r\nNOOP\r\n") == \
        [250, 250, 250, 250, 500, 250]
    assert body_of(spool) == b"abcde\r\n"


@pytest.mark.parametrize("line", [b"BDAT", b"BDAT x", b"BDAT 10 FIRST", b"BDAT -1",
                                  b"BDAT \xc2\xb2", b"BDAT \xd9\xa3", b"BDAT " + b"1" * 21,
                                  b"BDAT 1 LAST more", b"BDAT +1", b"BDAT 1\xff",
                                  b"BDAT 1\x00", b"BDAT 1 LAST\x00"])
def test_a_malformed_bdat_line_is_refused_and_closes(converse, spool, line):
    """No framing is possible: 501 5.5.4, then the connection ends; NOOP is never answered."""
    replies = talk(converse, TRANSACTION + line + b"\r\nNOOP\r\n")
    assert replies[3][0] == 501 and replies[3][1].startswith("501 5.5.4")
    assert len(replies) == 4
    assert spooled(spool) == [] and debris(spool) == []


def test_a_malformed_bdat_line_closes_outside_a_transaction_too(converse):
    """Even with no transaction to refuse, BDAT x cannot be framed: 501 5.5.4 and close."""
    assert codes(converse, HELLO + b"BDAT x\r\nNOOP\r\n") == [250, 501]


def test_twenty_digits_are_a_size(converse):
    """1*20DIGIT as SIZE: a 20-digit count is well formed (and read: here, cut by EOF)."""
    assert codes(converse, HELLO + b"BDAT 00000000000000000000\r\nNOOP\r\n") == [250, 503, 250]


def test_bdat_0_without_last_is_504_and_counted(converse, spool):
    """BDAT 0 alone is 504 5.5.4 and a bad command; the transaction goes on."""
    replies = talk(converse, TRANSACTION + b"BDAT 0\r\nBDAT 2 LAST\r\nHi")
    assert replies[3] == (504, "504 5.5.4 BDAT 0 needs LAST")
    assert converse.session.bad_commands == 1
    assert replies[4][1].startswith("250 2.6.0") and body_of(spool) == b"Hi\r\n"


def test_size_limit_counts_all_chunks(tmp_path):
    """Over --max-size, the chunks are still read; the LAST gets 552 5.3.4, and NOOP works."""
    options = make_options(tmp_path, max_size=100)
    spool = Spool(options.spool)
    spool.prepare()
    converse = Conversation(options, spool)
    chunk = b"x" * 58 + b"\r\n"
    replies = talk(converse, TRANSACTION + (b"BDAT 60\r\n" + chunk) * 2 + b"BDAT 60 LAST\r\n"
                   + chunk + b"NOOP\r\n")
    assert replies[3:5] == [(250, "250 2.0.0 60 octets received")] * 2
    assert replies[5][1].startswith("552 5.3.4") and replies[6] == (250, "250 2.0.0 OK")
    assert spooled(spool) == [] and debris(spool) == []


def test_bare_lf_is_stored_as_crlf(converse, spool):
    """A bare LF in a chunk is stored as CRLF, as Exchange and Gmail expect."""
    assert codes(converse, TRANSACTION + b"BDAT 9 LAST\r\nX: y\n\nHi\n")[-1] == 250
    assert body_of(spool) == b"X: y\r\n\r\nHi\r\n"


def test_a_crlf_split_across_chunks_is_a_crlf(converse, spool):
    """A CR ending one chunk and an LF starting the next are one CRLF."""
    assert codes(converse, TRANSACTION + b"BDAT 5\r\nX: y\rBDAT 7 LAST\r\n\n\r\nHi\r\n")[-1] == 250
    assert body_of(spool) == b"X: y\r\n\r\nHi\r\n"


@pytest.mark.parametrize("chunks", [
    [b"X: y\r\n\r\nH\ri\r\n"],          # a bare CR
    [b"X: y\r\n\r\nHi\r"],              # a last chunk ending in a lone CR
    [b"X: y\r", b"\r\nHi\r\n"],         # a held CR followed by a CR
    [b"X: y\r\n\r\nH\0i\r\n"],          # a NUL
])
def test_bare_cr_or_nul_is_refused_at_last(converse, spool, chunks):
    """A bare CR or a NUL: each chunk gets 250, the LAST 554 5.6.0; nothing is kept."""
    data = b"".join(b"BDAT %d\r\n%s" % (len(c), c) for c in chunks[:-1])
    data += b"BDAT %d LAST\r\n%s" % (len(chunks[-1]), chunks[-1])
    replies = talk(converse, TRANSACTION + data + b"NOOP\r\n")
    assert [c for c, _ in replies[3:-2]] == [250] * (len(chunks) - 1)
    assert replies[-2][0] == 554 and replies[-2][1].startswith("554 5.6.0")
    assert replies[-1][0] == 250
    assert spooled(spool) == [] and debris(spool) == []


def test_line_limit_applies_across_chunks(converse, spool):
    """998 octets and CRLF are a line; one more, split over two chunks, is 554 5.6.0."""
    assert codes(converse, TRANSACTION + b"BDAT 500\r\n" + b"a" * 500 + b"BDAT 500 LAST\r\n"
                 + b"a" * 498 + b"\r\n")[-1] == 250
    assert body_of(spool) == b"a" * 998 + b"\r\n"
    replies = talk(converse, TRANSACTION + b"BDAT 500\r\n" + b"a" * 500 + b"BDAT 501 LAST\r\n"
                   + b"a" * 499 + b"\r\n")
    assert replies[-1][0] == 554 and "line over" in replies[-1][1]


def test_a_last_chunk_gets_its_final_crlf(converse, spool):
    """A message whose last chunk does not end in CRLF is accepted and gets one."""
    assert codes(converse, TRANSACTION + b"BDAT 2 LAST\r\nHi")[-1] == 250
    assert body_of(spool) == b"Hi\r\n"


def test_a_dot_line_in_a_chunk_is_data_not_an_end(converse, spool):
    """B-smuggle: CRLF.CRLF and a MAIL line inside a chunk are one message's text."""
    text = b"X: y\r\n\r\nA\r\n.\r\nMAIL FROM:<e@x.test>\r\n"
    assert codes(converse, TRANSACTION + b"BDAT %d LAST\r\n" % len(text) + text) == [250] * 4
    assert len(spooled(spool)) == 1 and body_of(spool) == text


def test_eof_mid_chunk_keeps_nothing(converse, spool):
    """The client goes away inside a chunk: no entry, no debris."""
    codes(converse, TRANSACTION + b"BDAT 6\r\nX: y\r\nBDAT 100 LAST\r\nsome")
    assert spooled(spool) == [] and debris(spool) == []


def test_eof_between_chunks_keeps_nothing(converse, spool):
    """The client goes away after a chunk: the half-written entry is removed."""
    codes(converse, TRANSACTION + b"BDAT 6\r\nX: y\r\n")
    assert spooled(spool) == [] and debris(spool) == []


class Trickle(io.RawIOBase):
    """A client stream that hands out at most READ_SIZE octets per read."""

    def __init__(self, data):
        self.data = memoryview(data)

    def readable(self):
        return True

    def read1(self, size=-1):
        piece, self.data = bytes(self.data[:min(size, READ_SIZE)]), self.data[READ_SIZE:]
        return piece


def test_a_large_chunk_streams_with_bounded_memory():
    """A 3 MB chunk never has more than one read's worth buffered."""
    size = 3 * 1024 * 1024
    reader = LineReader(Trickle(b"y" * size + b"NOOP\r\n"))
    seen = []

    def write(piece):
        seen.append(len(piece))
        assert len(reader.buf) <= READ_SIZE

    reader.read_exact(size, write)
    assert sum(seen) == size and max(seen) <= READ_SIZE
    assert reader.readline(512) == b"NOOP\r\n"


def test_check_message_sees_bdat_headers(tmp_path):
    """The policy hook gets the header section of a chunked message, as for DATA."""
    seen = []

    class Watching(Session):
        def check_message(self, envelope, headers):
            seen.append(headers)

    options = make_options(tmp_path)
    spool = Spool(options.spool)
    spool.prepare()
    converse = Conversation(options, spool, session_class=Watching)
    assert codes(converse, TRANSACTION + b"BDAT 4\r\nX: yBDAT 7 LAST\r\n\n\nZ: w\n")[-1] == 250
    assert ("X", "y") in seen[0] and ("Z", "w") not in seen[0]
