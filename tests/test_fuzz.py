"""Property tests: random byte streams never crash a session or sneak into the spool."""

import io
import os
import re
import tracemalloc

from hypothesis import HealthCheck, given, settings, strategies as st

from conftest import make_options, spooled
from netsmtp.session import Session
from netsmtp.spool import Spool

REPLY_LINE = re.compile(rb"[2-5][0-9][0-9]([ -][\x20-\x7e]*)?\Z")

# Pieces of real commands mixed with noise, so the streams reach every state.
FRAGMENTS = [
    b"EHLO c.test\r\n", b"HELO c.test\r\n", b"MAIL FROM:<a@c.test>\r\n",
    b"MAIL FROM:<a@c.test> SIZE=10 BODY=8BITMIME AUTH=<>\r\n", b"RCPT TO:<u@mx.test>\r\n",
    b"RCPT TO:<x@far.test>\r\n", b"DATA\r\n", b".\r\n", b"\r\n.\r\n", b"Subject: x\r\n\r\n",
    b"Received: x\r\n", b"RSET\r\n", b"NOOP\r\n", b"STARTTLS\r\n", b"AUTH PLAIN\r\n",
    b"AUTH PLAIN AHUAcA==\r\n", b"AUTH LOGIN dQ==\r\n", b"*\r\n", b"=\r\n", b"QUIT\r\n",
    b"\r\n", b"\n", b"\r", b"\0", b"\xff\xfe", b"VRFY <\x1b[31m>\r\n", b"x" * 2000,
]

noise = st.lists(st.one_of(st.sampled_from(FRAGMENTS), st.binary(max_size=64)),
                 max_size=40).map(b"".join)
# Half the streams open a transaction, so random message text reaches DATA.
TRANSACTION = b"EHLO c.test\r\nMAIL FROM:<a@c.test>\r\nRCPT TO:<u@mx.test>\r\nDATA\r\n"
stream = st.one_of(noise, st.tuples(noise, noise).map(
    lambda parts: TRANSACTION + parts[0] + b"\r\n.\r\n" + parts[1]))


class FuzzSession(Session):
    """AUTH without the cost of scrypt: the password is "p"."""

    def authenticate(self, user, password):
        return password == "p"


def run(options, data):
    out = io.BytesIO()
    session = FuzzSession(io.BytesIO(data), out, peer="192.0.2.1", options=options)
    session.handle()  # must never raise
    return session, out.getvalue()


@settings(max_examples=300, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(data=stream)
def test_random_streams(tmp_path_factory, data):
    """Any byte stream: no exception escapes, every reply line is well-formed
    printable ASCII, and the spool holds exactly the messages answered 250 2.6.0."""
    tmp_path = tmp_path_factory.mktemp("fuzz")
    options = make_options(tmp_path, auth_file=os.devnull, auth_plaintext=True,
                           auth_fail_delay=0, max_size=5000)
    spool = Spool(options.spool)
    spool.prepare()
    session, output = run(options, data)
    lines = output.split(b"\r\n")
    assert lines[-1] == b""
    for line in lines[:-1]:
        assert REPLY_LINE.match(line), line
    accepted = len(re.findall(rb"(?m)^250 2\.6\.0 ", output))
    assert len(spooled(spool)) == accepted
    assert accepted == 0 or b"DATA" in data.upper()
    assert os.listdir(spool.tmp) == []


def test_memory_stays_bounded(tmp_path):
    """Megabytes without a line end, a huge message and header flood: the session's
    memory stays far below the input size."""
    options = make_options(tmp_path, max_size=10_000_000)
    Spool(options.spool).prepare()
    data = (b"EHLO c.test\r\n" + b"A" * 4_000_000 + b"\r\n"
            + b"MAIL FROM:<a@c.test>\r\nRCPT TO:<u@mx.test>\r\nDATA\r\n"
            + b"X-H: v\r\n" * 200_000 + b"\r\n" + b"body\r\n" * 200_000 + b".\r\nQUIT\r\n")
    rfile = io.BufferedReader(io.BytesIO(data), buffer_size=65536)
    tracemalloc.start()
    try:
        session = FuzzSession(rfile, io.BytesIO(), peer="192.0.2.1", options=options)
        session.handle()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 2_000_000, peak
    assert spooled(Spool(options.spool)) == []
