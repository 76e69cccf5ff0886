"""netsmtp-send against real smarthosts: outcomes, backoff, bounces, TLS, AUTH, Maildir."""

import email
import email.policy
import os
import socket
import ssl
import subprocess
import time
import tracemalloc

import pytest
import trustme
from conftest import free_port, need_tool
from smarthost import CaptureServer, put, run_cli

from netsmtp.envelope import Envelope
from netsmtp.options import Options
from netsmtp.queue_cli import send_main
from netsmtp.runner import QueueRunner


@pytest.fixture
def smarthost():
    with CaptureServer() as server:
        yield server


def send(spool, smarthost, *args):
    """netsmtp-send in-process, TLS off unless asked; returns the exit code."""
    address = smarthost if isinstance(smarthost, str) else smarthost.address
    return run_cli(send_main, ["--smarthost", address, "--hostname", "mx.test",
                               "--smarthost-tls", "off", *args, spool.path])


def state_of(spool, queue_id):
    return Envelope.thaw(spool.entry_path(queue_id))


def bounces(spool):
    """The bounces in the spool: [(envelope, parsed message)]."""
    found = []
    for queue_id in spool.queue_ids():
        envelope = state_of(spool, queue_id)
        if envelope.sender == "":
            with envelope.open() as f:
                found.append((envelope, email.message_from_binary_file(f, policy=email.policy.default)))
    return found


def test_success_forwards_exact_bytes_and_removes_the_entry(spool, smarthost, capsys):
    """A delivered message arrives byte for byte (dots too), with its MAIL parameters; the entry goes."""
    body = b"Subject: dots\r\n\r\n.leading dot\r\n..two\r\nend\r\n"
    queue_id = put(spool, recipients=["u@x.test", "v@y.test"], body=body,
                   params={"BODY": "8BITMIME", "SMTPUTF8": True})
    assert send(spool, smarthost) == 0
    [message] = smarthost.messages
    assert message.data == b"Received: from c.test\r\n" + body
    assert message.recipients == ["u@x.test", "v@y.test"] and message.sender == "a@b.test"
    assert sorted(message.mail_args) == ["BODY=8BITMIME", "SIZE=%d" % len(message.data), "SMTPUTF8"]
    assert spool.queue_ids() == [] and os.listdir(spool.locks) == []
    assert capsys.readouterr().out == "%s: <u@x.test> delivered (250 2.0.0 queued); " \
        "<v@y.test> delivered (250 2.0.0 queued)\n" % queue_id


def test_deferral_backs_off_exponentially(spool, smarthost):
    """A 4xx keeps the entry with attempts, last error and a doubling next attempt; --due waits."""
    queue_id = put(spool)
    smarthost.rcpt_replies["u@x.test"] = "451 4.7.1 greylisted"
    started = time.time()
    assert send(spool, smarthost, "--retry-initial", "5m") == 75
    first = state_of(spool, queue_id)
    assert first.attempts == 1 and first.last_error == "451 4.7.1 greylisted"
    assert (first.status["u@x.test"].status, str(first.status["u@x.test"].reply)) == (
        "deferred", "451 4.7.1 greylisted")
    assert started + 300 <= first.next_attempt <= time.time() + 300
    assert send(spool, smarthost) == 75
    second = state_of(spool, queue_id)
    assert second.attempts == 2 and second.next_attempt - second.last_attempt == pytest.approx(600)
    commands = len(smarthost.commands)
    assert send(spool, smarthost, "--due") == 0  # not due yet: nothing is tried
    assert len(smarthost.commands) == commands and state_of(spool, queue_id).attempts == 2
    del smarthost.rcpt_replies["u@x.test"]
    assert send(spool, smarthost) == 0
    assert smarthost.delivered_to() == ["u@x.test"] and spool.queue_ids() == []


def test_backoff_is_capped(spool):
    """The delay doubles up to retry_max and never runs past the queue lifetime."""
    runner = QueueRunner(Options(spool=spool.path, hostname="mx.test", retry_initial="5m",
                                 retry_max="4h", max_queue_lifetime="5d"))
    envelope = state_of(spool, put(spool, arrival=1000.0))
    delays = []
    for attempts in range(1, 10):
        envelope.attempts = attempts
        delays.append(runner.next_attempt(envelope, 2000.0) - 2000.0)
    assert delays == [300, 600, 1200, 2400, 4800, 9600, 14400, 14400, 14400]
    assert runner.next_attempt(envelope, 1000.0 + 5 * 86400 - 60) == 1000.0 + 5 * 86400


def test_permanent_failure_is_bounced_with_a_dsn(spool, smarthost):
    """A 5xx spools an RFC 3464 report from <> to the sender and removes the original."""
    original = put(spool, recipients=["gone@x.test"], body=b"Subject: lost\r\nX-Tag: 7\r\n\r\nbody\r\n")
    smarthost.rcpt_replies["gone@x.test"] = "550 5.1.1 no such user"
    assert send(spool, smarthost) == 0
    [(envelope, dsn)] = bounces(spool)
    assert original not in spool.queue_ids()
    assert envelope.recipients == ["a@b.test"]
    assert dsn.get_content_type() == "multipart/report"
    assert dsn.get_param("report-type") == "delivery-status"
    text, status, headers = dsn.get_payload()
    assert "<gone@x.test>: 550 5.1.1 no such user" in text.get_content()
    assert status.get_content_type() == "message/delivery-status"
    per_message, per_recipient = status.get_payload()
    assert per_message["Reporting-MTA"] == "dns; mx.test"
    assert per_recipient["Final-Recipient"] == "rfc822; gone@x.test"
    assert per_recipient["Action"] == "failed" and per_recipient["Status"] == "5.1.1"
    assert per_recipient["Diagnostic-Code"] == "smtp; 550 5.1.1 no such user"
    assert headers.get_content_type() == "text/rfc822-headers"
    assert "X-Tag: 7" in headers.get_content() and "body" not in headers.get_content()


def test_bounce_about_a_utf8_address_is_smtputf8(spool, smarthost):
    """A DSN naming a non-ASCII address is SMTPUTF8 mail, message/global-delivery-status (RFC 6533)."""
    put(spool, recipients=["jürgen@x.test"], params={"SMTPUTF8": True})
    smarthost.rcpt_replies["jürgen@x.test"] = "550 5.1.1 unknown"
    assert send(spool, smarthost) == 0
    [(envelope, dsn)] = bounces(spool)
    assert envelope.params == {"SMTPUTF8": True}
    status = dsn.get_payload()[1]
    assert status.get_content_type() == "message/global-delivery-status"
    with envelope.open() as f:
        assert "Final-Recipient: utf-8; jürgen@x.test\r\n".encode() in f.read()
    assert send(spool, smarthost) == 0  # the bounce itself goes out with SMTPUTF8
    assert smarthost.messages[-1].sender == "" and "SMTPUTF8" in smarthost.messages[-1].mail_args


def test_bounce_is_itself_delivered_but_never_bounced(spool, smarthost):
    """A failing message from <> is dropped without a bounce, so bounces cannot loop."""
    put(spool, sender="", recipients=["gone@x.test"])
    smarthost.rcpt_replies["gone@x.test"] = "550 5.1.1 no such user"
    assert send(spool, smarthost) == 0
    assert spool.queue_ids() == [] and smarthost.messages == []


@pytest.mark.parametrize("pipelining", [False, True])
def test_mixed_outcomes_are_kept_per_recipient(spool, smarthost, pipelining):
    """One delivered, one deferred, one bounced: only the deferred one is tried again."""
    smarthost.pipelining = pipelining
    queue_id = put(spool, recipients=["ok@x.test", "later@x.test", "bad@x.test"])
    smarthost.rcpt_replies.update({"later@x.test": "451 4.2.0 full", "bad@x.test": "550 5.1.1 no"})
    assert send(spool, smarthost) == 75
    status = {r: s.status for r, s in state_of(spool, queue_id).status.items()}
    assert status == {"ok@x.test": "delivered", "later@x.test": "deferred", "bad@x.test": "bounced"}
    [(_, dsn)] = bounces(spool)
    assert "bad@x.test" in dsn.as_string() and "later@x.test" not in dsn.as_string()
    smarthost.rcpt_replies.clear()
    assert run_cli(send_main, ["--smarthost", smarthost.address, "--smarthost-tls", "off",
                               spool.entry_path(queue_id)]) == 0
    assert [m.recipients for m in smarthost.messages] == [["ok@x.test"], ["later@x.test"]]
    assert queue_id not in spool.queue_ids()


@pytest.mark.parametrize("pipelining", [False, True])
def test_refused_sender_fails_every_recipient(spool, smarthost, pipelining):
    """A 5xx to MAIL FROM is every recipient's outcome; nothing is sent, one bounce."""
    smarthost.pipelining = pipelining
    smarthost.mail_reply = "550 5.7.1 sender blocked"
    put(spool, recipients=["u@x.test", "v@x.test"])
    assert send(spool, smarthost) == 0
    assert smarthost.messages == []
    [(_, dsn)] = bounces(spool)
    blocks = dsn.get_payload()[1].get_payload()[1:]
    assert [b["Diagnostic-Code"] for b in blocks] == ["smtp; 550 5.7.1 sender blocked"] * 2


@pytest.mark.parametrize("pipelining", [False, True])
def test_one_connection_reused_and_a_dropped_one_replaced(spool, smarthost, pipelining):
    """A run uses one connection; if the smarthost hangs up between messages, it reconnects."""
    smarthost.pipelining = pipelining
    for _ in range(3):
        put(spool)
    assert send(spool, smarthost) == 0
    assert smarthost.connections == 1 and len(smarthost.messages) == 3
    smarthost.hang_up_after_data = True
    for _ in range(3):
        put(spool)
    assert send(spool, smarthost) == 0
    assert smarthost.connections == 1 + 3 and len(smarthost.messages) == 6


def test_smarthost_down_defers_everything(spool, capsys):
    """No smarthost listening: every message is deferred with the reason; exit 75."""
    ids = [put(spool) for _ in range(3)]
    assert send(spool, "127.0.0.1:%d" % free_port()) == 75
    for queue_id in ids:
        assert "unreachable" in state_of(spool, queue_id).last_error
    assert capsys.readouterr().out.count("deferred (451 4.4.1 smarthost") == 3


def test_expired_message_is_bounced(spool, smarthost):
    """Past the queue lifetime a still-deferred recipient is bounced with status 4.4.7."""
    put(spool, arrival=time.time() - 6 * 86400)
    smarthost.rcpt_replies["u@x.test"] = "451 4.3.0 later"
    assert send(spool, smarthost) == 0
    [(_, dsn)] = bounces(spool)
    per_recipient = dsn.get_payload()[1].get_payload()[1]
    assert per_recipient["Status"] == "4.4.7"
    assert "expired after 5 days" in per_recipient["Diagnostic-Code"]
    assert "451 4.3.0 later" in per_recipient["Diagnostic-Code"]


@pytest.fixture(scope="module")
def ca():
    return trustme.CA()


@pytest.fixture
def tls_smarthost(ca):
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(context)
    with CaptureServer(tls_context=context, auth=("relay", "s3cret")) as server:
        yield server


def test_starttls_with_a_test_ca(spool, tls_smarthost, ca, tmp_path):
    """STARTTLS is used when offered and the certificate checks out against --smarthost-ca."""
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    put(spool)
    assert send(spool, tls_smarthost, "--smarthost-tls", "opportunistic",
                "--smarthost-ca", tmp_path / "ca.pem") == 0
    assert [m.tls for m in tls_smarthost.messages] == [True]


def test_unverifiable_certificate_defers(spool, tls_smarthost):
    """Certificates are verified by default: an unknown CA defers, nothing goes in the clear."""
    queue_id = put(spool)
    assert send(spool, tls_smarthost, "--smarthost-tls", "opportunistic") == 75
    assert "TLS failed" in state_of(spool, queue_id).last_error
    assert tls_smarthost.messages == [] and not any(
        c.startswith("MAIL") for c in tls_smarthost.commands)


def test_required_tls_refuses_a_plaintext_smarthost(spool, smarthost):
    """--smarthost-tls required against a smarthost without STARTTLS defers before MAIL."""
    queue_id = put(spool)
    assert send(spool, smarthost, "--smarthost-tls", "required") == 75
    assert "does not offer STARTTLS" in state_of(spool, queue_id).last_error
    assert not any(c.startswith("MAIL") for c in smarthost.commands)


def test_auth_only_over_tls(spool, tls_smarthost, ca, tmp_path):
    """AUTH is never sent in the clear by default, and is used over STARTTLS."""
    secret = tmp_path / "password"
    secret.write_text("s3cret\n")
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    queue_id = put(spool)
    auth = ["--smarthost-user", "relay", "--smarthost-password-file", secret]
    assert send(spool, tls_smarthost, *auth) == 75
    assert "without TLS" in state_of(spool, queue_id).last_error
    assert not any(c.startswith("AUTH") for c in tls_smarthost.commands)
    assert send(spool, tls_smarthost, *auth, "--smarthost-tls", "required",
                "--smarthost-ca", tmp_path / "ca.pem") == 0
    assert [(m.tls, m.auth) for m in tls_smarthost.messages] == [(True, "relay")]


def test_maildir_delivery_for_local_domains(spool, smarthost, tmp_path):
    """Local domains go to MAILDIR_ROOT/<localpart>/new with Return-Path; others to the smarthost."""
    root = tmp_path / "mail"
    (root / "alice").mkdir(parents=True)  # Maildir delivers only to mailboxes that exist
    put(spool, recipients=["Alice@mx.test", "far@x.test", "../etc@mx.test", "nobody@mx.test"])
    assert send(spool, smarthost, "--maildir-root", root, "--local-domains", "mx.test") == 0
    [name] = os.listdir(root / "alice" / "new")
    content = (root / "alice" / "new" / name).read_bytes()
    assert content.startswith(b"Return-Path: <a@b.test>\nDelivered-To: Alice@mx.test\n"
                              b"Received: from c.test\n")
    assert content.endswith(b"\nhello\n")
    assert smarthost.delivered_to() == ["far@x.test"]
    assert sorted(os.listdir(root)) == ["alice"]  # "../etc" was refused, not followed
    [(_, dsn)] = bounces(spool)
    report = dsn.get_payload()[0].get_content()
    assert "../etc@mx.test" in report and "nobody@mx.test" in report


def test_route_table_from_config(spool, smarthost, tmp_path):
    """A TOML [routes] table picks the delivery per domain, with a * default."""
    config = tmp_path / "netsmtp.toml"
    config.write_text('maildir_root = "%s"\n[routes]\n"box.test" = "maildir"\n'
                      '"*" = "smarthost"\n' % (tmp_path / "mail"))
    (tmp_path / "mail" / "bob").mkdir(parents=True)
    put(spool, recipients=["bob@box.test", "bob@mx.test"])
    assert send(spool, smarthost, "--config", config) == 0
    assert os.listdir(tmp_path / "mail") == ["bob"]
    assert smarthost.delivered_to() == ["bob@mx.test"]


def start_sink(tmp_path, *flags):
    """Postfix smtp-sink on a free port, dumping each message to tmp_path/dump."""
    path = need_tool("smtp-sink")
    port = free_port()
    user = ["-u", "root"] if os.geteuid() == 0 else []
    sink = subprocess.Popen([path, *user, "-d", str(tmp_path / "dump" / "%M."), *flags,
                             "127.0.0.1:%d" % port, "50"], stderr=subprocess.PIPE)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), 1).close()
            return sink, "127.0.0.1:%d" % port
        except OSError:
            time.sleep(0.02)  # polling for readiness: smtp-sink prints nothing
    sink.kill()
    raise RuntimeError("smtp-sink did not start")


@pytest.fixture
def sink_factory(tmp_path):
    started = []

    def start(*flags):
        sink, address = start_sink(tmp_path, *flags)
        started.append(sink)
        return address

    yield start
    for sink in started:
        sink.kill()
        sink.wait()


def dumped(tmp_path):
    folder = tmp_path / "dump"
    return sorted(p.read_bytes() for p in folder.iterdir()) if folder.exists() else []


def test_smtp_sink_receives_each_message_once(spool, sink_factory, tmp_path):
    """Postfix's smtp-sink gets every message exactly once over one connection."""
    address = sink_factory()
    for n in range(5):
        put(spool, body=b"Subject: %d\r\n\r\nbody\r\n" % n)
    assert send(spool, address) == 0
    messages = dumped(tmp_path)
    assert len(messages) == 5 and all(b"X-Rcpt-Args: <u@x.test>" in m for m in messages)
    assert spool.queue_ids() == []


@pytest.mark.parametrize("flag, code, bounced", [("-r", 75, False), ("-f", 0, True)])
def test_smtp_sink_soft_and_hard_rejects(spool, sink_factory, tmp_path, flag, code, bounced):
    """smtp-sink rejecting RCPT with 4xx defers; with 5xx bounces."""
    address = sink_factory(flag, "RCPT")
    queue_id = put(spool)
    assert send(spool, address) == code
    assert dumped(tmp_path) == []
    assert (queue_id in spool.queue_ids()) is not bounced
    assert len(bounces(spool)) == int(bounced)


def test_large_message_is_streamed(spool, sink_factory, tmp_path):
    """An 8 MB message goes out without being read whole into memory."""
    address = sink_factory()
    line = b"x" * 998 + b"\r\n"
    put(spool, body=b"Subject: big\r\n\r\n" + line * 8000)
    tracemalloc.start()
    try:
        assert send(spool, address) == 0
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 2_000_000
    [message] = dumped(tmp_path)
    assert message.count(b"x" * 998) == 8000
