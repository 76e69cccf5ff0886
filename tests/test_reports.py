"""DSN reports (RFC 3461, RFC 3464) from netsmtp-send, and the DSN request passed on."""

import email
import email.policy
import time

import flufl.bounce
import pytest
from smarthost import CaptureServer, run_cli
from test_send import dumped, start_sink

from netsmtp import bounce
from netsmtp.envelope import Envelope, Result, Status
from netsmtp.queue_cli import send_main
from netsmtp.spool import new_queue_id

BODY = b"Subject: report me\r\nX-Tag: 7\r\n\r\nthe body\r\n"


def put(spool, recipients=("u@x.test",), params=None, dsn=None, expanded=(), arrival=None,
        sender="a@b.test", body=BODY):
    envelope = Envelope(sender=sender, recipients=recipients, helo="c.test", client="192.0.2.1",
                        protocol="ESMTP", params=params, id=new_queue_id(),
                        arrival=time.time() if arrival is None else arrival, dsn=dsn,
                        expanded=expanded)
    spool.add(envelope, b"Received: from c.test\r\n" + body)
    return envelope.id


def send(spool, where, *args):
    address = where if isinstance(where, str) else where.address
    return run_cli(send_main, ["--smarthost", address, "--hostname", "mx.test",
                               "--smarthost-tls", "off", *args, spool.path])


def reports(spool):
    """The reports in the spool: [(envelope, raw bytes, parsed message)]."""
    found = []
    for queue_id in spool.queue_ids():
        envelope = Envelope.thaw(spool.entry_path(queue_id))
        if envelope.sender == "":
            with envelope.open() as f:
                raw = f.read()
            found.append((envelope, raw, email.message_from_bytes(raw, policy=email.policy.default)))
    return found


def sent_reports(spool, smarthost):
    """How many reports exist: still in the spool, or already sent on by a later run."""
    return len(reports(spool)) + sum(1 for m in smarthost.messages if m.sender == "")


def fields(report):
    """The delivery-status part: (per-message fields, [per-recipient fields])."""
    status = report.get_payload()[1]
    assert status.get_content_type() == "message/delivery-status"
    blocks = status.get_payload()
    return blocks[0], blocks[1:]


@pytest.fixture
def smarthost():
    with CaptureServer() as server:
        yield server


@pytest.fixture
def sink(tmp_path):
    started = []

    def start(*flags):
        process, address = start_sink(tmp_path, *flags)
        started.append(process)
        return address

    yield start
    for process in started:
        process.kill()
        process.wait()


def test_failed_report_carries_the_rfc_3464_fields(spool, smarthost):
    """ENVID, ORCPT, Final-Recipient, Action, Status, Remote-MTA, Diagnostic-Code; headers only."""
    put(spool, params={"RET": "HDRS", "ENVID": "QQ+2B314159"},
        dsn={"u@x.test": {"notify": ["FAILURE"], "orcpt": "rfc822;Orig+2B1@x.test"}})
    smarthost.rcpt_replies["u@x.test"] = "550 5.1.1 no such user"
    assert send(spool, smarthost) == 0
    [(envelope, raw, report)] = reports(spool)
    assert envelope.sender == "" and envelope.recipients == ["a@b.test"]
    assert envelope.status["a@b.test"].notify == ("NEVER",)  # RFC 3461 section 6.1
    assert report.get_content_type() == "multipart/report"
    assert report.get_param("report-type") == "delivery-status"
    per_message, [per_recipient] = fields(report)
    assert per_message["Reporting-MTA"] == "dns; mx.test"
    assert per_message["Original-Envelope-Id"] == "QQ+314159"
    assert per_recipient["Original-Recipient"] == "rfc822;Orig+1@x.test"
    assert per_recipient["Final-Recipient"] == "rfc822; u@x.test"
    assert per_recipient["Action"] == "failed" and per_recipient["Status"] == "5.1.1"
    assert per_recipient["Remote-MTA"] == "dns; 127.0.0.1"
    assert per_recipient["Diagnostic-Code"] == "smtp; 550 5.1.1 no such user"
    returned = report.get_payload()[2]
    assert returned.get_content_type() == "text/rfc822-headers"
    assert b"X-Tag: 7" in raw and b"the body" not in raw


def test_no_envid_no_orcpt_means_no_such_fields(spool, smarthost):
    """Original-Envelope-Id and Original-Recipient appear only when they were given."""
    put(spool)
    smarthost.rcpt_replies["u@x.test"] = "550 5.1.1 no such user"
    assert send(spool, smarthost) == 0
    [(_, _, report)] = reports(spool)
    per_message, [per_recipient] = fields(report)
    assert "Original-Envelope-Id" not in per_message
    assert "Original-Recipient" not in per_recipient


def test_flufl_bounce_reads_the_failed_recipients(spool, smarthost):
    """An independent parser (Mailman's flufl.bounce) finds the failed recipient."""
    put(spool, recipients=["u@x.test", "ok@x.test"])
    smarthost.rcpt_replies["u@x.test"] = "550 5.1.1 no such user"
    assert send(spool, smarthost) == 0
    [(_, raw, _)] = reports(spool)
    found = flufl.bounce.scan_message(email.message_from_bytes(raw))
    assert {a.decode() if isinstance(a, bytes) else a for a in found} == {"u@x.test"}


def test_ret_full_returns_the_message_up_to_the_limit(spool, smarthost):
    """RET=FULL: the whole message as message/rfc822; over --bounce-size-limit, headers only."""
    put(spool, params={"RET": "FULL"})
    smarthost.rcpt_replies["u@x.test"] = "550 5.1.1 no such user"
    assert send(spool, smarthost) == 0
    [(_, raw, report)] = reports(spool)
    returned = report.get_payload()[2]
    assert returned.get_content_type() == "message/rfc822"
    assert b"\r\n\r\nReceived: from c.test\r\n" + BODY in raw
    for envelope, _, _ in reports(spool):
        spool.unlink_message(envelope.id)
    put(spool, params={"RET": "FULL"}, body=BODY + b"x" * 200 + b"\r\n")
    assert send(spool, smarthost, "--bounce-size-limit", "100") == 0
    [(_, raw, report)] = reports(spool)
    assert report.get_payload()[2].get_content_type() == "text/rfc822-headers"
    assert b"the body" not in raw


@pytest.mark.parametrize("notify", [["NEVER"], ["SUCCESS"], ["DELAY"]])
def test_no_failure_report_unless_notify_asks(spool, smarthost, notify):
    """NOTIFY without FAILURE: the recipient is dropped, no report, the entry goes."""
    queue_id = put(spool, dsn={"u@x.test": {"notify": notify}})
    smarthost.rcpt_replies["u@x.test"] = "550 5.1.1 no such user"
    assert send(spool, smarthost) == 0
    assert reports(spool) == [] and queue_id not in spool.queue_ids()


def test_one_delay_report_after_delay_warning(spool, smarthost):
    """--delay-warning: one "delayed" report with Will-Retry-Until, never a second."""
    queue_id = put(spool, recipients=["u@x.test", "quiet@x.test"], arrival=time.time() - 7200,
                   dsn={"quiet@x.test": {"notify": ["FAILURE"]}})
    smarthost.rcpt_replies["u@x.test"] = "451 4.7.1 greylisted"
    smarthost.rcpt_replies["quiet@x.test"] = "451 4.7.1 greylisted"
    assert send(spool, smarthost, "--delay-warning", "1h") == 75
    [(_, _, report)] = reports(spool)
    assert report["Subject"].startswith("Delayed Mail")
    _, [per_recipient] = fields(report)
    assert per_recipient["Action"] == "delayed" and per_recipient["Status"] == "4.7.1"
    assert per_recipient["Final-Recipient"] == "rfc822; u@x.test"
    assert "Will-Retry-Until" in per_recipient
    assert Envelope.thaw(spool.entry_path(queue_id)).status["u@x.test"].reports == {"delayed"}
    assert send(spool, smarthost, "--delay-warning", "1h") == 75
    assert sent_reports(spool, smarthost) == 1


def test_no_delay_report_without_the_option_or_before_its_time(spool, smarthost):
    """Delay reports are off by default, and not sent before --delay-warning has passed."""
    put(spool, arrival=time.time() - 7200)
    smarthost.rcpt_replies["u@x.test"] = "451 4.7.1 greylisted"
    assert send(spool, smarthost) == 75
    assert send(spool, smarthost, "--delay-warning", "4h") == 75
    assert reports(spool) == []


def test_delivered_report_after_maildir_delivery(spool, smarthost, tmp_path):
    """NOTIFY=SUCCESS and a Maildir delivery: one "delivered" report; without SUCCESS, none."""
    (tmp_path / "mail" / "bob").mkdir(parents=True)
    (tmp_path / "mail" / "ann").mkdir(parents=True)
    put(spool, recipients=["bob@mx.test", "ann@mx.test"],
        dsn={"bob@mx.test": {"notify": ["SUCCESS", "FAILURE"], "orcpt": "rfc822;bob@mx.test"}})
    assert send(spool, smarthost, "--maildir-root", str(tmp_path / "mail")) == 0
    [(_, _, report)] = reports(spool)
    _, [per_recipient] = fields(report)
    assert per_recipient["Action"] == "delivered" and per_recipient["Status"] == "2.0.0"
    assert per_recipient["Final-Recipient"] == "rfc822; bob@mx.test"
    assert "Remote-MTA" not in per_recipient


def test_no_second_success_report_after_a_retry(spool, smarthost, tmp_path):
    """One recipient delivered (reported), one deferred: the retry sends no second report."""
    (tmp_path / "mail" / "bob").mkdir(parents=True)
    queue_id = put(spool, recipients=["bob@mx.test", "later@x.test"],
                   dsn={"bob@mx.test": {"notify": ["SUCCESS"]}})
    smarthost.rcpt_replies["later@x.test"] = "451 4.7.1 greylisted"
    for _ in range(2):
        assert send(spool, smarthost, "--maildir-root", str(tmp_path / "mail")) == 75
    assert sent_reports(spool, smarthost) == 1
    assert Envelope.thaw(spool.entry_path(queue_id)).status["bob@mx.test"].reports == {"delivered"}


def test_a_crash_while_spooling_a_report_never_makes_a_second(spool, smarthost, tmp_path,
                                                             monkeypatch):
    """The report is recorded before it is spooled: a crash there loses it, never doubles it."""
    (tmp_path / "mail" / "bob").mkdir(parents=True)
    queue_id = put(spool, recipients=["bob@mx.test", "later@x.test"],
                   dsn={"bob@mx.test": {"notify": ["SUCCESS"]}})
    smarthost.rcpt_replies["later@x.test"] = "451 4.7.1 greylisted"
    import netsmtp.runner

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(netsmtp.runner, "spool_report", crash)
    assert send(spool, smarthost, "--maildir-root", str(tmp_path / "mail")) == 1
    monkeypatch.undo()
    assert send(spool, smarthost, "--maildir-root", str(tmp_path / "mail")) == 75
    assert sent_reports(spool, smarthost) == 0
    record = Envelope.thaw(spool.entry_path(queue_id)).status["bob@mx.test"]
    assert record.status is Status.DELIVERED and record.reports == {"delivered"}


def test_expanded_report_for_an_alias(spool, smarthost):
    """An alias owed "expanded" gets one report naming it, with its ORCPT."""
    put(spool, recipients=["ann@x.test", "bob@x.test"],
        dsn={r: {"notify": ["FAILURE"], "orcpt": "rfc822;sales@x.test"}
             for r in ("ann@x.test", "bob@x.test")},
        expanded=[{"address": "sales@x.test", "notify": ["SUCCESS", "FAILURE"]}])
    assert send(spool, smarthost) == 0
    [(_, _, report)] = reports(spool)
    _, [per_recipient] = fields(report)
    assert per_recipient["Action"] == "expanded" and per_recipient["Status"] == "2.0.0"
    assert per_recipient["Final-Recipient"] == "rfc822; sales@x.test"


def test_no_report_about_a_message_from_the_null_sender(spool, smarthost, tmp_path):
    """A message from <> gets no success, delay or failure report."""
    (tmp_path / "mail" / "bob").mkdir(parents=True)
    queue_id = put(spool, sender="", recipients=["bob@mx.test", "later@x.test"],
                   arrival=time.time() - 7200,
                   dsn={r: {"notify": ["SUCCESS", "DELAY", "FAILURE"]}
                        for r in ("bob@mx.test", "later@x.test")})
    smarthost.rcpt_replies["later@x.test"] = "451 4.7.1 greylisted"
    assert send(spool, smarthost, "--maildir-root", str(tmp_path / "mail"),
                "--delay-warning", "1h") == 75
    assert spool.queue_ids() == [queue_id]


def test_utf8_report_is_global_delivery_status(spool, smarthost):
    """A report naming a UTF-8 address is message/global-delivery-status (RFC 6533)."""
    put(spool, recipients=["j\u00f6ran@x.test"], params={"SMTPUTF8": True},
        dsn={"j\u00f6ran@x.test": {"orcpt": "utf-8;j\u00f6ran@x.test"}})
    smarthost.rcpt_replies["j\u00f6ran@x.test"] = "550 5.1.1 unknown"
    assert send(spool, smarthost) == 0
    [(envelope, raw, report)] = reports(spool)
    assert envelope.params == {"SMTPUTF8": True}
    assert report.get_param("report-type") == "global-delivery-status"
    assert report.get_payload()[1].get_content_type() == "message/global-delivery-status"
    assert "Original-Recipient: utf-8;j\u00f6ran@x.test\r\n".encode() in raw
    assert "Final-Recipient: utf-8; j\u00f6ran@x.test\r\n".encode() in raw


def test_dsn_request_is_relayed_to_a_dsn_smarthost(spool, sink, tmp_path):
    """smtp-sink offers DSN: RET, ENVID, NOTIFY and ORCPT go on unchanged (ORCPT added); no report."""
    address = sink()
    put(spool, recipients=["u@x.test", "v@x.test"], params={"RET": "HDRS", "ENVID": "QQ314159"},
        dsn={"u@x.test": {"notify": ["SUCCESS", "DELAY"], "orcpt": "rfc822;Orig@x.test"}})
    assert send(spool, address) == 0
    [dump] = dumped(tmp_path)
    assert b"X-Mail-Args: <a@b.test> RET=HDRS ENVID=QQ314159" in dump
    assert b"X-Rcpt-Args: <u@x.test> NOTIFY=SUCCESS,DELAY ORCPT=rfc822;Orig@x.test" in dump
    assert b"X-Rcpt-Args: <v@x.test> ORCPT=rfc822;v@x.test" in dump
    assert reports(spool) == []


def test_no_dsn_request_to_a_smarthost_without_dsn_and_a_relayed_report(spool, sink, tmp_path):
    """smtp-sink -N has no DSN: no parameters go out, and NOTIFY=SUCCESS gets "relayed"."""
    address = sink("-N")
    put(spool, params={"RET": "FULL", "ENVID": "QQ314159"},
        dsn={"u@x.test": {"notify": ["SUCCESS"], "orcpt": "rfc822;u@x.test"}})
    assert send(spool, address) == 0
    [dump] = dumped(tmp_path)
    assert b"RET=" not in dump and b"ENVID=" not in dump
    assert b"NOTIFY=" not in dump and b"ORCPT=" not in dump
    [(_, _, report)] = reports(spool)
    per_message, [per_recipient] = fields(report)
    assert per_message["Original-Envelope-Id"] == "QQ314159"
    assert per_recipient["Action"] == "relayed" and per_recipient["Remote-MTA"] == "dns; 127.0.0.1"
    assert per_recipient["Original-Recipient"] == "rfc822;u@x.test"


def test_report_builder_never_lets_a_reply_inject_a_field(spool):
    """A smarthost reply with CR LF cannot add a header field to the report."""
    queue_id = put(spool)
    envelope = Envelope.thaw(spool.entry_path(queue_id))
    record = envelope.status["u@x.test"]
    record.reply = Result(550, "5.1.1 x\r\nX-Evil: 1")
    data = bounce.build_report(envelope, "failed", [record], "mx.test")
    assert b"\r\nX-Evil" not in data


def test_a_hand_made_entry_cannot_put_a_line_break_in_a_report(spool):
    """ENVID and ORCPT are checked in the session; one written by hand is escaped, not trusted."""
    queue_id = put(spool, params={"ENVID": "a+0D+0AX-Evil:+201"},
                   dsn={"u@x.test": {"orcpt": "rfc822;b+0D+0AX-Evil:+202"}})
    envelope = Envelope.thaw(spool.entry_path(queue_id))
    record = envelope.status["u@x.test"]
    record.reply = Result(550, "5.1.1 gone")
    data = bounce.build_report(envelope, "failed", [record], "mx.test")
    assert b"\r\nX-Evil" not in data and b"\nX-Evil" not in data


def test_a_500_character_orcpt_comes_back_whole(spool, smarthost):
    """ORCPT may be 500 characters (RFC 3461 section 5.4); the report's Original-Recipient is it all."""
    orcpt = "rfc822;" + "o" * 480 + "@x.test"
    put(spool, dsn={"u@x.test": {"orcpt": orcpt}})
    smarthost.rcpt_replies["u@x.test"] = "550 5.1.1 no such user"
    assert send(spool, smarthost) == 0
    [(_, raw, _)] = reports(spool)
    assert b"\r\nOriginal-Recipient: " + orcpt.encode() + b"\r\n" in raw
