import smtplib

from conftest import spooled


def test_conversation_queues_a_message(converse, spool):
    """A whole transaction over BytesIO ends with 250 and one spool entry."""
    codes = converse.codes([b"EHLO c.test", b"MAIL FROM:<a@b.test>", b"RCPT TO:<u@mx.test>",
                            b"DATA", b"Subject: x", b"", b"hi", b".", b"QUIT"])
    assert codes == [220, 250, 250, 250, 354, 250, 221]
    assert len(spooled(spool)) == 1


def test_smtplib_against_forking_server(server):
    """Python's smtplib sends a message through the forking server."""
    with smtplib.SMTP("127.0.0.1", server.port, timeout=10) as client:
        client.sendmail("a@b.test", ["u@mx.test"], b"Subject: x\r\n\r\nhello\r\n")
    assert server.stop() == 0
