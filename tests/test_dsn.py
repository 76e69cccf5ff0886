"""DSN (RFC 3461) parameters on the wire: RET, ENVID, NOTIFY, ORCPT, checked and stored."""

import json
import smtplib

import pytest

from conftest import Conversation, make_options, spooled, wait_for
from netsmtp import dsn
from netsmtp.envelope import Envelope
from netsmtp.queue_cli import queue_main
from netsmtp.spool import Spool

HELLO = [b"EHLO client.test"]
SENDER = HELLO + [b"MAIL FROM:<a@client.test>"]


def last(converse, lines):
    return converse(lines)[-1]


def thawed(spool, index=0):
    return Envelope.thaw(spool.entry_path(spooled(spool)[index][:-4]))


def test_ehlo_offers_dsn(converse):
    """DSN is an EHLO keyword (RFC 3461 section 3)."""
    assert "250-DSN" in converse(HELLO)[1][1]


def test_ret_and_envid_are_accepted_and_kept(converse):
    """D1: RET=HDRS ENVID=QQ314159 get the same 250 2.1.0; the envelope keeps them."""
    assert last(converse, HELLO + [b"MAIL FROM:<a@client.test> RET=hdrs ENVID=QQ314159"]) == (
        250, ["250 2.1.0 Sender <a@client.test> OK"])
    assert converse.session.envelope.params == {"RET": "HDRS", "ENVID": "QQ314159"}


@pytest.mark.parametrize("params", [
    b"RET=FULL RET=HDRS", b"RET=PARTIAL", b"RET", b"ENVID=ab+2", b"ENVID=+00", b"ENVID=+2b",
    b"ENVID=QQ+0D+0AX-Evil:+201", b"ENVID=" + b"x" * 101, b"ENVID=a ENVID=b", b"ENVID",
])
def test_bad_or_repeated_mail_dsn_parameters_are_501_5_5_4(converse, params):
    """D2: a duplicate or invalid RET or ENVID is 501 5.5.4; no transaction starts."""
    code, lines = last(converse, HELLO + [b"MAIL FROM:<a@client.test> " + params])
    assert code == 501 and lines[0].startswith("501 5.5.4 ")
    assert converse.session.envelope is None


def test_notify_and_orcpt_are_accepted_and_kept(converse, spool):
    """D3: NOTIFY=success,DELAY ORCPT=rfc822;... get 250 2.1.5 and reach the spool."""
    replies = converse(SENDER + [b"RCPT TO:<u@mx.test> NOTIFY=success,DELAY ORCPT=rfc822;U+2B1@mx.test",
                                 b"RCPT TO:<v@mx.test>", b"DATA", b"Subject: x\r\n\r\nhi\r\n."])
    assert replies[3] == (250, ["250 2.1.5 Recipient <u@mx.test> OK"])
    envelope = thawed(spool)
    assert envelope.status["u@mx.test"].notify == ("SUCCESS", "DELAY")
    assert envelope.status["u@mx.test"].orcpt == "rfc822;U+2B1@mx.test"
    assert envelope.status["v@mx.test"].notify is None and envelope.status["v@mx.test"].orcpt is None


def test_notify_never_is_kept_apart_from_not_given(converse, spool):
    """NOTIFY=NEVER is ("NEVER",), distinct from no NOTIFY at all (None)."""
    converse(SENDER + [b"RCPT TO:<u@mx.test> NOTIFY=never", b"DATA", b"x\r\n."])
    assert thawed(spool).status["u@mx.test"].notify == ("NEVER",)


@pytest.mark.parametrize("params", [
    b"NOTIFY=NEVER,SUCCESS", b"NOTIFY=", b"NOTIFY=sometimes", b"NOTIFY=SUCCESS NOTIFY=FAILURE",
    b"NOTIFY=SUCCESS,SUCCESS", b"NOTIFY", b"ORCPT=b@x.test", b"ORCPT=rfc822;a+zzb",
    b"ORCPT=rfc822;", b"ORCPT=;a@b", b"ORCPT=rfc822;a+0Ab", b"ORCPT=rfc822;" + b"a" * 500,
    "ORCPT=rfc822;j\u00f6ran@x.test".encode(),
])
def test_bad_or_repeated_rcpt_dsn_parameters_are_501_5_5_4(converse, params):
    """D4: an invalid or repeated NOTIFY or ORCPT is 501 5.5.4; the recipient is not added."""
    code, lines = last(converse, SENDER + [b"RCPT TO:<u@mx.test> " + params])
    assert code == 501 and lines[0].startswith("501 5.5.4 ")
    assert converse.session.envelope.recipients == []


def test_the_longest_values_fit_a_1036_octet_line(converse, spool):
    """D5: ENVID of 100, ORCPT of 500 characters; a RCPT line of 1036 octets is accepted."""
    envid = b"E" * 100
    orcpt = b"rfc822;" + b"o" * 480 + b"@mx.test"
    mail = b"MAIL FROM:<a@client.test> RET=FULL ENVID=" + envid
    rcpt = b"RCPT TO:<" + b"u" * 40 + b"@mx.test> NOTIFY=SUCCESS,FAILURE,DELAY ORCPT=" + orcpt
    rcpt += b" " * (1034 - len(rcpt))
    assert len(rcpt) + 2 == 1036
    codes = converse.codes(HELLO + [mail, rcpt, b"DATA", b"x\r\n."])
    assert codes == [220, 250, 250, 250, 354, 250]
    assert thawed(spool).params["ENVID"] == envid.decode()


@pytest.mark.parametrize("rcpt", [b"<b@remote.test>", b"<u@mx.test>"])
def test_valid_dsn_parameters_never_change_the_reply(converse, rcpt):
    """D6: relay denied or accepted, the reply is the same with DSN parameters as without."""
    plain = converse.codes(SENDER + [b"RCPT TO:" + rcpt])
    with_dsn = converse.codes(HELLO + [b"MAIL FROM:<a@client.test> RET=FULL ENVID=x",
                                       b"RCPT TO:" + rcpt + b" NOTIFY=FAILURE ORCPT=rfc822;" + rcpt[1:-1]])
    assert plain == with_dsn


def test_utf8_orcpt_needs_smtputf8(converse, spool):
    """ORCPT=utf-8;<raw UTF-8> (RFC 6533) is taken in an SMTPUTF8 transaction only."""
    rcpt = "RCPT TO:<j\u00f6ran@mx.test> ORCPT=utf-8;j\u00f6ran@mx.test".encode()
    assert last(converse, HELLO + [b"MAIL FROM:<a@client.test>", b"RCPT TO:<u@mx.test> "
                                   + "ORCPT=utf-8;j\u00f6ran@mx.test".encode()])[0] == 501
    assert converse.codes(HELLO + [b"MAIL FROM:<a@client.test> SMTPUTF8", rcpt, b"DATA",
                                   b"x\r\n."])[-1] == 250
    assert thawed(spool).status["j\u00f6ran@mx.test"].orcpt == "utf-8;j\u00f6ran@mx.test"
    assert converse.codes(HELLO + [b"MAIL FROM:<a@client.test>",
                                   b"RCPT TO:<u@mx.test> ORCPT=utf-8;j\\x{F6}ran@mx.test"])[-1] == 250


def test_dsn_networks_limits_who_is_offered_dsn(tmp_path):
    """--dsn-networks: outside it, no DSN keyword, and DSN parameters are 555 5.5.4."""
    options = make_options(tmp_path, dsn_networks="10.0.0.0/8")
    spool = Spool(options.spool)
    spool.prepare()
    outside = Conversation(options, spool, peer="192.0.2.1")
    assert "250-DSN" not in outside(HELLO)[1][1]
    assert outside.codes(SENDER + [b"RCPT TO:<u@mx.test> NOTIFY=NEVER"])[-1] == 555
    assert outside.codes(HELLO + [b"MAIL FROM:<a@client.test> RET=FULL"])[-1] == 555
    inside = Conversation(options, spool, peer="10.1.2.3")
    assert "250-DSN" in inside(HELLO)[1][1]
    assert inside.codes(SENDER + [b"RCPT TO:<u@mx.test> NOTIFY=NEVER"])[-1] == 250


def test_dsn_parameters_need_ehlo(converse):
    """After HELO there are no ESMTP parameters: NOTIFY is 555."""
    assert converse.codes([b"HELO c.test", b"MAIL FROM:<a@client.test>",
                           b"RCPT TO:<u@mx.test> NOTIFY=NEVER"])[-1] == 555


def test_an_alias_passes_the_request_to_each_target(tmp_path):
    """RFC 3461 5.2.7.3 (c): the targets lose SUCCESS and get ORCPT=the alias; it is owed "expanded"."""
    table = tmp_path / "recipients"
    table.write_text("sales@mx.test  ann@mx.test, bob@mx.test\nann@mx.test\nbob@mx.test\n")
    options = make_options(tmp_path, recipients=str(table))
    spool = Spool(options.spool)
    spool.prepare()
    converse = Conversation(options, spool)
    assert converse.codes(SENDER + [b"RCPT TO:<sales@mx.test> NOTIFY=SUCCESS,FAILURE", b"DATA",
                                    b"x\r\n."])[-1] == 250
    envelope = thawed(spool)
    for target in ("ann@mx.test", "bob@mx.test"):
        assert envelope.status[target].notify == ("FAILURE",)
        assert envelope.status[target].orcpt == "rfc822;sales@mx.test"
    assert envelope.expanded == [{"address": "sales@mx.test", "notify": ["SUCCESS", "FAILURE"]}]


def test_smtplib_mail_and_rcpt_options_reach_the_spool(server, capsys):
    """A real client: smtplib's mail_options and rcpt_options end up in the spool and --json."""
    with smtplib.SMTP("127.0.0.1", server.port, timeout=10) as client:
        client.ehlo("client.test")
        assert client.has_extn("dsn")
        refused = client.sendmail("a@client.test", ["u@mx.test"], b"Subject: x\r\n\r\nhi\r\n",
                                  mail_options=["RET=HDRS", "ENVID=QQ314159"],
                                  rcpt_options=["NOTIFY=SUCCESS,FAILURE", "ORCPT=rfc822;u@mx.test"])
    assert refused == {}
    assert queue_main(["--spool", server.spool, "--json"]) == 0
    [entry] = json.loads(capsys.readouterr().out)
    assert entry["params"]["RET"] == "HDRS" and entry["params"]["ENVID"] == "QQ314159"
    assert entry["recipients"][0]["notify"] == ["SUCCESS", "FAILURE"]
    assert entry["recipients"][0]["orcpt"] == "rfc822;u@mx.test"


def test_xtext_round_trip():
    """encode_xtext and decode_xtext invert each other; "+" and "=" are always encoded."""
    for text in ["a+b=c@x.test", "plain", "~!*"]:
        assert dsn.decode_xtext(dsn.encode_xtext(text)) == text
    assert dsn.encode_xtext("a+b=c") == "a+2Bb+3Dc"


def test_postfix_sendmail_n_v_sends_dsn_parameters_through_its_relayhost(server):
    """A real DSN client: Postfix's sendmail -N success,delay,failure -V ENVID via relayhost."""
    from postfix import PrivatePostfix
    postfix = PrivatePostfix(relayhost=("127.0.0.1", server.port))
    try:
        assert postfix.sendmail(["-N", "success,delay,failure", "-V", "QQ314159",
                                 "-f", "a@client.test", "u@mx.test"],
                                b"Subject: dsn\n\nhello\n") == 0
        spool = Spool(server.spool)
        wait_for(lambda: spool.queue_ids(), what="the message from Postfix")
    finally:
        postfix.stop()
    envelope = Envelope.thaw(spool.entry_path(spool.queue_ids()[0]))
    assert envelope.params["ENVID"] == "QQ314159"
    record = envelope.status["u@mx.test"]
    assert set(record.notify) == {"SUCCESS", "DELAY", "FAILURE"}
    assert record.orcpt == "rfc822;u@mx.test"
