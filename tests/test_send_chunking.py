"""netsmtp-send speaks BDAT (RFC 3030) to a smarthost that offers CHUNKING, DATA otherwise."""

import os
import re
import subprocess

from conftest import need_tool, spooled, wait_for
from postfix import PrivatePostfix
from smarthost import CaptureServer, run_cli
from test_reports import put

from netsmtp.envelope import Envelope
from netsmtp.queue_cli import send_main
from netsmtp.smarthost import BDAT_CHUNK
from netsmtp.spool import Spool


def send(spool, address, *args):
    return run_cli(send_main, ["--smarthost", address, "--hostname", "mx.test",
                               "--smarthost-tls", "off", *args, spool.path])


def test_bdat_to_netsmtp_itself_keeps_the_exact_octets(spool, server):
    """A netsmtp smarthost (CHUNKING): dots are not stuffed, the octets arrive exactly."""
    body = b"Subject: dots\r\n\r\n.leading dot\r\n..two\r\n.\r\nend\r\n"
    put(spool, recipients=["u@mx.test"], body=body)
    assert send(spool, "127.0.0.1:%d" % server.port) == 0
    target = Spool(server.spool)
    [entry] = spooled(target)
    envelope = Envelope.thaw(target.entry_path(entry[:-4]))
    with envelope.open() as f:
        data = f.read()
    assert data.endswith(b"Received: from c.test\r\n" + body)
    assert envelope.protocol == "ESMTP"


def test_a_large_message_goes_in_several_chunks(spool, server):
    """A message over one chunk is split; the parts reassemble byte for byte."""
    line = b"x" * 998 + b"\r\n"
    body = b"Subject: big\r\n\r\n" + line * (BDAT_CHUNK * 2 // len(line) + 5)
    put(spool, recipients=["u@mx.test"], body=body)
    assert send(spool, "127.0.0.1:%d" % server.port) == 0
    target = Spool(server.spool)
    [entry] = spooled(target)
    with Envelope.thaw(target.entry_path(entry[:-4])).open() as f:
        assert f.read().endswith(b"Received: from c.test\r\n" + body)


def test_a_message_without_a_final_crlf_gets_one(spool, server):
    """The last chunk ends in CRLF, as DATA's text would."""
    put(spool, recipients=["u@mx.test"], body=b"Subject: x\r\n\r\nno end")
    assert send(spool, "127.0.0.1:%d" % server.port) == 0
    target = Spool(server.spool)
    [entry] = spooled(target)
    with Envelope.thaw(target.entry_path(entry[:-4])).open() as f:
        assert f.read().endswith(b"no end\r\n")


def test_data_to_a_smarthost_without_chunking(spool):
    """No CHUNKING keyword, no BDAT: DATA as before."""
    put(spool)
    with CaptureServer() as smarthost:
        assert send(spool, smarthost.address) == 0
    assert "DATA" in smarthost.commands and not any(c.startswith("BDAT") for c in smarthost.commands)


def test_bdat_and_the_dsn_request_to_a_private_postfix(spool):
    """A private Postfix (CHUNKING, DSN) as smarthost: BDAT, no DATA; its queue file holds the
    DSN request as sent (ENVID, RET=HDRS, NOTIFY=SUCCESS,DELAY, ORCPT)."""
    postfix = PrivatePostfix(listen=True, hostname="relay.test", relay_domains="x.test",
                             extra="smtpd_recipient_restrictions = check_recipient_access "
                                   "static:HOLD")
    try:
        put(spool, params={"ENVID": "QQ314159", "RET": "HDRS"},
            dsn={"u@x.test": {"notify": ["SUCCESS", "DELAY"], "orcpt": "rfc822;Orig@x.test"}})
        assert send(spool, "127.0.0.1:%d" % postfix.port) == 0
        assert spool.queue_ids() == []
        found = wait_for(lambda: re.search(r"disconnect from \S+ (.*mail=.*)", postfix.log()),
                         what="Postfix's disconnect line of the delivery")
        assert re.search(r"\bbdat=1\b", found.group(1)) and "data=" not in found.group(1)
        [held] = os.listdir(os.path.join(postfix.dir, "queue", "hold"))
        records = subprocess.run([need_tool("postcat"), "-c", postfix.config, "-e", "-q", held],
                                 capture_output=True, text=True, check=True).stdout
    finally:
        postfix.stop()
    assert "envelope_id=QQ314159" in records
    assert "ret_flags=2" in records  # DSN_RET_HDRS
    assert "notify_flags=10" in records  # DSN_NOTIFY_SUCCESS | DSN_NOTIFY_DELAY
    assert "dsn_orig_rcpt=rfc822;Orig@x.test" in records
