"""REQUIRETLS (RFC 8689): offered inside TLS only, kept with the message, enforced on relay."""

import email
import json
import smtplib
import ssl

import pytest
import trustme
from conftest import client_context, spooled
from smarthost import CaptureServer, put, run_cli

from netsmtp.envelope import Envelope
from netsmtp.queue_cli import queue_main, send_main

MESSAGE = b"Subject: secret\r\nX-Tag: 7\r\n\r\nthe body\r\n"


def tls_session(server_factory, tls_files):
    """An smtplib client after STARTTLS and a second EHLO, and the server."""
    ca, cert, key = tls_files
    server = server_factory("--tls-cert", cert, "--tls-key", key)
    client = smtplib.SMTP("127.0.0.1", server.port, timeout=10)
    client.ehlo("client.test")
    client.starttls(context=client_context(ca))
    client.ehlo("client.test")
    return server, client


def entries(spool_path, capsys):
    capsys.readouterr()
    assert queue_main(["--spool", spool_path, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_not_offered_in_plaintext_and_refused_there(converse):
    """R1, R3: no REQUIRETLS keyword without TLS; MAIL ... REQUIRETLS is 555 5.5.4."""
    replies = converse([b"EHLO client.test", b"MAIL FROM:<a@client.test> REQUIRETLS"])
    assert not any("REQUIRETLS" in line for line in replies[1][1])
    assert replies[2][0] == 555 and replies[2][1][0].startswith("555 5.5.4")


def test_offered_after_starttls_and_kept_with_the_message(server_factory, tls_files, capsys):
    """R2, R5: REQUIRETLS after STARTTLS; MAIL ... REQUIRETLS is stored ("requiretls": true)."""
    server, client = tls_session(server_factory, tls_files)
    with client:
        assert client.has_extn("requiretls")
        code, _ = client.docmd("MAIL FROM:<a@client.test> REQUIRETLS=yes")
        assert code == 501  # R4: the parameter takes no value
        client.sendmail("a@client.test", ["u@mx.test"], MESSAGE, mail_options=["REQUIRETLS"])
        client.sendmail("a@client.test", ["u@mx.test"], b"TLS-Required: No\r\n" + MESSAGE)
    first, second = entries(server.spool, capsys)
    assert first["requiretls"] is True and first["params"]["REQUIRETLS"] is True
    assert first["tls_required"] is None
    assert second["requiretls"] is False and second["tls_required"] == "no"


@pytest.mark.parametrize("header, expected", [
    (b"TLS-Required: No\r\n", "no"), (b"tls-required:   NO \r\n", "no"),
    (b"TLS-Required:\r\n no\r\n", "no"), (b"TLS-Required: No\r\nTLS-Required: No\r\n", None),
    (b"TLS-Required: yes\r\n", None), (b"", None),
])
def test_tls_required_no_is_recorded(spool, header, expected):
    """R6: one TLS-Required: No (any case, folded) is "no"; two, or another value, count as none."""
    queue_id = put(spool, body=header + MESSAGE)
    assert Envelope.thaw(spool.entry_path(queue_id)).tls_required == expected


def test_tls_required_is_ignored_with_requiretls(spool):
    """With REQUIRETLS the TLS-Required header is ignored (RFC 8689 section 4.1)."""
    queue_id = put(spool, body=b"TLS-Required: No\r\n" + MESSAGE, params={"REQUIRETLS": True})
    assert Envelope.thaw(spool.entry_path(queue_id)).tls_required is None


@pytest.fixture(scope="module")
def ca():
    return trustme.CA()


def tls_capture(ca, requiretls):
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(context)
    server = CaptureServer(tls_context=context)
    server.requiretls = requiretls
    return server


def send(spool, smarthost, *args):
    return run_cli(send_main, ["--smarthost", smarthost.address, "--hostname", "mx.test",
                               *args, spool.path])


def bounce_of(spool):
    """The one report in the spool: (per-recipient status fields, raw bytes)."""
    [queue_id] = [q for q in spool.queue_ids()
                  if Envelope.thaw(spool.entry_path(q)).sender == ""]
    envelope = Envelope.thaw(spool.entry_path(queue_id))
    assert not envelope.params.get("REQUIRETLS")
    with envelope.open() as f:
        raw = f.read()
    report = email.message_from_bytes(raw)
    return report.get_payload()[1].get_payload()[1], raw


def test_no_tls_at_the_smarthost_bounces_at_once_with_5_7_10(spool):
    """R7: a smarthost without STARTTLS: bounced now (5.7.10, headers only), never sent."""
    queue_id = put(spool, params={"REQUIRETLS": True, "RET": "FULL"}, body=MESSAGE)
    with CaptureServer() as smarthost:
        assert send(spool, smarthost) == 0
    assert not any(c.startswith("MAIL") for c in smarthost.commands)
    assert queue_id not in spool.queue_ids()
    fields, raw = bounce_of(spool)
    assert fields["Status"] == "5.7.10" and fields["Action"] == "failed"
    assert b"X-Tag: 7" in raw and b"the body" not in raw


def test_a_smarthost_without_requiretls_bounces_with_5_7_30(spool, ca, tmp_path):
    """R8: verified STARTTLS but no REQUIRETLS after it: bounced with 5.7.30, no MAIL sent."""
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    put(spool, params={"REQUIRETLS": True})
    with tls_capture(ca, requiretls=False) as smarthost:
        assert send(spool, smarthost, "--smarthost-ca", str(tmp_path / "ca.pem")) == 0
    assert not any(c.startswith("MAIL") for c in smarthost.commands)
    assert bounce_of(spool)[0]["Status"] == "5.7.30"


def test_an_unverified_certificate_bounces_requiretls_and_defers_the_rest(spool, ca):
    """R9: a certificate that does not verify: the REQUIRETLS message bounces (5.7.10), others wait."""
    tagged = put(spool, params={"REQUIRETLS": True})
    plain = put(spool)
    with tls_capture(ca, requiretls=True) as smarthost:
        assert send(spool, smarthost) == 75
    assert smarthost.messages == []
    assert tagged not in spool.queue_ids() and plain in spool.queue_ids()
    assert bounce_of(spool)[0]["Status"] == "5.7.10"


def test_a_verified_requiretls_smarthost_gets_mail_from_requiretls(spool, ca, tmp_path):
    """R10: TLS, a verified certificate and REQUIRETLS offered: MAIL FROM ... REQUIRETLS."""
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    put(spool, params={"REQUIRETLS": True})
    put(spool)
    with tls_capture(ca, requiretls=True) as smarthost:
        assert send(spool, smarthost, "--smarthost-ca", str(tmp_path / "ca.pem")) == 0
    tagged, plain = smarthost.messages
    assert tagged.tls and "REQUIRETLS" in tagged.mail_args
    assert "REQUIRETLS" not in plain.mail_args
    assert spooled(spool) == []


def test_maildir_delivery_needs_nothing_more(spool, tmp_path):
    """A REQUIRETLS message for a Maildir route is delivered as any other."""
    (tmp_path / "mail" / "bob").mkdir(parents=True)
    put(spool, recipients=["bob@mx.test"], params={"REQUIRETLS": True})
    assert run_cli(send_main, ["--hostname", "mx.test", "--local-domains", "mx.test",
                               "--maildir-root", str(tmp_path / "mail"), spool.path]) == 0
    assert len(list((tmp_path / "mail" / "bob" / "new").iterdir())) == 1
